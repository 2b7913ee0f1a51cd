"""An expert (or a PEFT adapter) given as a local directory or a hub id, as a local directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from dume.checkpoint.io import is_complete_checkpoint
from dume.errors import DumeError

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_PATTERNS = [ADAPTER_CONFIG, *ADAPTER_WEIGHTS]


def looks_like_hub_id(value: str) -> bool:
    """`owner/name`: what the hub accepts, and no local path spelling (`./x`, `/x`, `~/x`)."""
    return not value.startswith((".", "/", "~")) and value.count("/") == 1 and "\\" not in value


def hub_id_of(path: str | os.PathLike) -> str | None:
    """The hub id of a snapshot in the Hugging Face cache (`.../models--owner--name/snapshots/REV`), else None."""
    for part in Path(path).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def cached_snapshot(repo_id: str, patterns, cache_dir=None) -> Path | None:
    """The cached snapshot of `repo_id` holding `patterns`, without touching the network; None when not cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=True))
    except Exception:
        return None


def _download(repo_id: str, what: str, patterns, cache_dir, instead: str) -> Path:
    """The cache first (no network for what was downloaded before), then the hub, refused at once offline."""
    from huggingface_hub import snapshot_download

    from dume.runtime.hub import require_hub

    cached = cached_snapshot(repo_id, patterns, cache_dir)
    if cached is not None:
        return cached
    require_hub(f"{what} {repo_id}", instead)
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as e:
        raise DumeError(f"cannot get {what} {repo_id} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                        f"{instead}") from e


def resolve_expert(id_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local checkpoint directory, or a hub id downloaded (safetensors + config + tokenizer only) into the
    Hugging Face cache. Offline, a hub id that is not cached is a clear error."""
    p = Path(id_or_path).expanduser()
    if p.is_dir():
        if not is_complete_checkpoint(p):
            raise DumeError(f"{p} is not a complete checkpoint (config.json + safetensors weights)")
        return p.resolve()
    if p.exists() or not looks_like_hub_id(id_or_path):
        raise DumeError(f"expert {id_or_path!r}: no such checkpoint directory, and not a hub id (owner/name)")
    return _download(id_or_path, "expert", CHECKPOINT_PATTERNS, cache_dir,
                     "pass a local checkpoint directory instead")


def resolve_adapter(id_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors` or `.bin`), local or a hub id
    downloaded like an expert (those files only)."""
    p = Path(id_or_path).expanduser()
    if p.is_dir():
        folder = p.resolve()
    elif p.exists() or not looks_like_hub_id(id_or_path):
        raise DumeError(f"adapter {id_or_path!r}: no such adapter folder, and not a hub id (owner/name)")
    else:
        folder = _download(id_or_path, "adapter", ADAPTER_PATTERNS, cache_dir, "pass a local adapter folder instead")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise DumeError(f"adapter {id_or_path}: {folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    if not any((folder / w).is_file() for w in ADAPTER_WEIGHTS):
        raise DumeError(f"adapter {id_or_path}: {folder} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return folder


def resolve_experts(experts: Mapping[str, str], cache_dir=None) -> dict[str, Path]:
    return {d: resolve_expert(v, cache_dir) for d, v in experts.items()}
