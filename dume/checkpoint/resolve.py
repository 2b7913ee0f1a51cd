"""An expert given as a local directory or a hub id, as a local checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from dume.checkpoint.io import is_complete_checkpoint
from dume.errors import DumeError


def resolve_expert(id_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local checkpoint directory, or a hub id downloaded (safetensors + config + tokenizer only) into the
    Hugging Face cache. Offline, a hub id that is not cached is a clear error."""
    p = Path(id_or_path).expanduser()
    if p.is_dir():
        if not is_complete_checkpoint(p):
            raise DumeError(f"{p} is not a complete checkpoint (config.json + safetensors weights)")
        return p.resolve()
    if p.exists() or id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") != 1:
        raise DumeError(f"expert {id_or_path!r}: no such checkpoint directory, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    from dume.runtime.hub import require_hub

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    try:  # the cache first: no network needed for what was downloaded before
        return Path(snapshot_download(id_or_path, cache_dir=cache_dir, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:
        pass
    require_hub(f"expert {id_or_path}", "pass a local checkpoint directory instead")
    try:
        path = snapshot_download(id_or_path, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as e:
        raise DumeError(f"cannot get expert {id_or_path} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                        f"pass a local checkpoint directory instead") from e
    return Path(path)


def resolve_experts(experts: Mapping[str, str], cache_dir=None) -> dict[str, Path]:
    return {d: resolve_expert(v, cache_dir) for d, v in experts.items()}
