"""Atomic file and checkpoint writes, and strict readers of users' text and JSON files.

Every artefact is written beside its final place under a temporary name and renamed into place only when
complete, so an interrupted run never leaves a half-written file or checkpoint a rerun would take for finished.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from dume.checkpoint.outputs import output_lock
from dume.errors import DumeError

CHECKPOINT_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a sibling, then rename it over `path`, holding `path`'s writer lock (waiting for another
    writer's moment, never interleaving with it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path, wait=True):
        tmp = tmp_sibling(path)
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
    """Strict JSON only: NaN/inf (which `json` would write as invalid tokens) are an error naming where they
    are, and nothing is written."""
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
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DumeError(f"corrupted JSON file {path}: {e}") from e


def decode_text(raw: bytes, path: str | os.PathLike) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped), or one line saying what the bytes are instead and how
    to convert them: binary data, UTF-16/32, another encoding."""
    head = raw[:4]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head in (b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00"):
        kind = "UTF-32" if head in (b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00") else "UTF-16"
        raise DumeError(f"{path} is {kind} text, not UTF-8: convert it (iconv -f {kind} -t UTF-8 {path} > new) "
                        "and point to the new file")
    if b"\x00" in raw[:8192]:
        raise DumeError(f"{path} is binary data, not text (it holds NUL bytes): give a UTF-8 text, JSON Lines, JSON "
                        "or Parquet file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DumeError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): convert it "
                        "to UTF-8 (iconv -f <its encoding> -t UTF-8)") from None


def read_text(path: str | os.PathLike) -> str:
    """A user's text file, decoded strictly (`decode_text`); `.gz` files are decompressed first. OS errors
    name the file."""
    import gzip
    import zlib

    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DumeError(f"{path} is not a readable gzip file ({e}): recompress it or give the plain file") from None
    except IsADirectoryError:
        raise DumeError(f"{path} is a folder, not a file") from None
    except OSError as e:
        raise DumeError(f"cannot read {path}: {e.strerror}") from None
    return decode_text(raw, path)


def read_records(path: str | os.PathLike) -> list:
    """The records of a JSON Lines file (one JSON value per non-empty line) or a JSON file (a list of records,
    or one record); `.gz` allowed. Bad text or JSON is one line naming the file and the line."""
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".json" or path.name.endswith(".json.gz"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DumeError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        return data if isinstance(data, list) else [data]
    out = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DumeError(f"{path} line {i + 1} is not JSON ({e.msg}): a JSON Lines file holds one JSON "
                                "record per line") from None
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it takes `path`'s place in one rename.

    - One writer: `path`'s `output_lock` is held from here to the rename; a second process refuses at once,
      naming the first one's pid.
    - `path` is never absent: an existing directory is swapped with the new one in one
      `renameat2(RENAME_EXCHANGE)` and removed after (without it, two renames: a gap one rename long).
    - Without `overwrite`, `path` existing is refused here *and* again at the rename.
    - A directory holding another checkpoint below it (an output nested in an expert, say) is never replaced:
      that would delete a model this write did not make.
    - On an exception (or a kill) the temporary directory is removed (or left as a hidden `.name.tmp-PID-*`
      that a later write removes once PID is gone), and `path` keeps what it held.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        if path.exists() and not overwrite:
            raise DumeError(f"{path} exists; refusing to overwrite it")
        _refuse_nested_checkpoints(path)
        cleanup_stale_tmp(path)
        tmp = tmp_sibling(path)
        tmp.mkdir()
        try:
            yield tmp
            if path.exists():
                if not overwrite:
                    raise DumeError(f"{path} appeared while it was being written (another program made it); "
                                    "kept it and discarded this output")
                _replace_dir(tmp, path)
            else:
                _rename_no_replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _refuse_nested_checkpoints(path: Path) -> None:
    if not path.is_dir():
        return
    for cfg in path.glob("*/**/config.json"):
        if is_complete_checkpoint(cfg.parent):
            raise DumeError(f"{path} holds another checkpoint ({cfg.parent}); refusing to replace it -- move that "
                            "checkpoint out first, or choose another output")


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


@functools.lru_cache(maxsize=1)
def _libc_renameat2():
    import ctypes

    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) with `flags`; False where libc or the filesystem lacks it."""
    import ctypes
    import errno

    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _replace_dir(new: Path, path: Path) -> None:
    """Put directory `new` in `path`'s place; `path` stays present throughout."""
    if _renameat2(new, path, _RENAME_EXCHANGE):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old directory
        return
    old = tmp_sibling(path)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _rename_no_replace(src: Path, dst: Path) -> None:
    if not _renameat2(src, dst, _RENAME_NOREPLACE):
        if dst.exists():
            raise DumeError(f"{dst} appeared while it was being written; kept it and discarded this output")
        os.rename(src, dst)


def portable_path(target: str | os.PathLike, base: str | os.PathLike) -> str:
    """`target` relative to the directory `base` (a recipe's own directory), so that a run directory copied or
    moved as a whole still resolves it; see `resolve_stored_path`."""
    return os.path.relpath(Path(target).resolve(), Path(base).resolve())


def resolve_stored_path(stored: str, base: str | os.PathLike, absolute: str | None = None) -> Path:
    """A path written by `portable_path` (relative to `base`), or an absolute one; the recorded `absolute` one
    when only it exists (the recipe's directory was moved alone)."""
    p = Path(stored)
    if not p.is_absolute():
        p = Path(base) / p
    if not p.exists() and absolute and Path(absolute).exists():
        return Path(absolute)
    return Path(os.path.normpath(p))


def _owner_alive(stale: Path) -> bool:
    """Whether the process that named a temporary `.NAME.tmp-PID-xxxx` still runs."""
    pid = stale.name.rsplit(".tmp-", 1)[-1].split("-", 1)[0]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, under another user
    return True


def cleanup_stale_tmp(path: str | os.PathLike) -> None:
    """Remove temporaries left by an interrupted write of `path` -- only those whose writer is gone (a live
    process's staging directory is never touched)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if _owner_alive(stale):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A Hugging Face checkpoint directory with a config and weights."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / f).is_file() for f in CHECKPOINT_WEIGHT_FILES)
