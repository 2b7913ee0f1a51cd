"""Atomic file and checkpoint writes.

Every artefact is written next to its final place under a temporary name and renamed
into place only when complete, so an interrupted run never leaves a half-written file
or checkpoint that a rerun would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import DumeError

CHECKPOINT_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def nonfinite_paths(obj: Any, where: str = "") -> list[str]:
    """Where in a JSON-like object a float is NaN or ±inf (as 'results.math.perplexity')."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "<value>"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite_paths(v, f"{where}[{i}]")]
    return []


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON only: NaN/inf (which `json` would write as invalid tokens) are an error
    naming where they are, and nothing is written."""
    bad = nonfinite_paths(obj)
    if bad:
        raise DumeError(f"refusing to write {path}: non-finite value at {', '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}")
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DumeError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DumeError(f"corrupted JSON file {path}: {e}") from e


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` in one rename.

    On an exception (or a kill) the temporary directory is removed (or left under a
    hidden `.name.tmp-*` name that `cleanup_stale_tmp` removes), and `path` keeps
    whatever it held before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise DumeError(f"{path} exists; refusing to overwrite it")
    cleanup_stale_tmp(path)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def portable_path(target: str | os.PathLike, base: str | os.PathLike) -> str:
    """`target` relative to the directory `base` (a recipe's own directory), so that a run
    directory copied or moved as a whole still resolves it; see `resolve_stored_path`."""
    return os.path.relpath(Path(target).resolve(), Path(base).resolve())


def resolve_stored_path(stored: str, base: str | os.PathLike, absolute: str | None = None) -> Path:
    """A path written by `portable_path` (relative to `base`), or an absolute one. When the
    relative form does not exist but the recorded `absolute` one does (the recipe's
    directory was moved alone), that one is used."""
    p = Path(stored)
    if not p.is_absolute():
        p = Path(base) / p
    if not p.exists() and absolute and Path(absolute).exists():
        return Path(absolute)
    return Path(os.path.normpath(p))


def cleanup_stale_tmp(path: str | os.PathLike) -> None:
    """Remove temporaries left by an interrupted write of `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A Hugging Face checkpoint directory with a config and weights."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / f).is_file() for f in CHECKPOINT_WEIGHT_FILES)


def save_pretrained_atomic(model, path: str | os.PathLike, tokenizer=None) -> Path:
    """`model.save_pretrained` (safetensors) into `path`, atomically."""
    from .fingerprint import content_fingerprint

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        content_fingerprint(tmp)  # stored beside the weights now, while they are in the page cache
    return Path(path)
