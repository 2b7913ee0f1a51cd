"""Atomic file and checkpoint writes.

Every artefact is written next to its final place under a temporary name and renamed
into place only when complete, so an interrupted run never leaves a half-written file
or checkpoint that a rerun would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
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


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)
