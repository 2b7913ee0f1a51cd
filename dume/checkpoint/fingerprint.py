"""Content fingerprints of checkpoints: what every cached artefact is keyed by.

A cached artefact (DUME statistics, a merged base model, a results file) is only valid for the exact weights it
was computed from. Paths are not enough (an expert retrained in place keeps its path), nor is
`experts.shared_weights_fingerprint` (shared weights only: an MLP-only change leaves it equal). So every tensor
is hashed, once:

- one SHA-256 per tensor over its raw bytes, name, dtype and shape, plus the hash of `config.json` (the same
  tensors under another config compute something else);
- each tensor is checked for NaN/inf while in memory, so a non-finite expert is caught by name at no extra read;
- the record is stored beside the checkpoint (`dume_fingerprint.json`) with each weight file's size and mtime,
  and reused while those stay the same (rewritten files -- retrained, edited, copied without their times -- are
  hashed again). It is stored only when every weight is finite (a broken checkpoint is an error: nothing is
  written beside it); where the directory is read-only it is kept in memory, for the process's life only.

Cost: one read of the weights per change (disk speed; sha256 runs at ~1 GB/s), then a `stat` per weight file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from dume.checkpoint.io import atomic_write_json, is_complete_checkpoint, read_json
from dume.checkpoint.reader import CheckpointReader
from dume.errors import DumeError

FINGERPRINT_FILE = "dume_fingerprint.json"
FORMAT_VERSION = 1
_MEMO: dict[tuple, "ContentFingerprint"] = {}


@dataclass(frozen=True)
class ContentFingerprint:
    """`digest`: 16 hex digits over config + every tensor; `tensors`: name -> hash; `nonfinite`: names of
    floating tensors holding NaN or inf."""

    digest: str
    tensors: dict
    nonfinite: tuple


def _weight_files(path: Path) -> list[str]:
    """The checkpoint's safetensors files (single file or the shards an index names)."""
    with CheckpointReader(path) as rd:  # validates the layout; headers only
        return list(rd.files)


def _stamps(path: Path, files: Iterable[str]) -> dict:
    out = {}
    for name in ("config.json", *files):
        st = (path / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def _tensor_hash(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{name}|{t.dtype}|{list(t.shape)}\0".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _compute(path: Path, files: list[str]) -> ContentFingerprint:
    tensors: dict[str, str] = {}
    nonfinite: list[str] = []
    with CheckpointReader(path) as rd:
        for name in sorted(rd.keys()):
            t = rd.get(name)
            tensors[name] = _tensor_hash(name, t)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                nonfinite.append(name)
            del t
    h = hashlib.sha256()
    h.update(hashlib.sha256((path / "config.json").read_bytes()).digest())
    for name in sorted(tensors):
        h.update(f"{name}={tensors[name]}\n".encode())
    return ContentFingerprint(h.hexdigest()[:16], tensors, tuple(nonfinite))


def content_fingerprint(path: str | os.PathLike, *, store: bool = True) -> ContentFingerprint:
    """The checkpoint's content fingerprint, from its stored record when still valid."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DumeError(f"{path} is not a checkpoint directory (no config.json)")
    files = _weight_files(path)
    stamps = _stamps(path, files)
    key = (str(path.resolve()), json.dumps(stamps, sort_keys=True))
    if key in _MEMO:
        return _MEMO[key]
    record_path = path / FINGERPRINT_FILE
    fp = None
    if record_path.is_file():
        try:
            rec = json.loads(record_path.read_text(encoding="utf-8"))
            if rec.get("version") == FORMAT_VERSION and rec.get("stamps") == stamps:
                fp = ContentFingerprint(rec["digest"], dict(rec["tensors"]), tuple(rec["nonfinite"]))
        except (OSError, ValueError, KeyError, TypeError):
            fp = None  # an unreadable record is recomputed, never trusted
    if fp is None:
        fp = _compute(path, files)
        if store and not fp.nonfinite:  # a broken checkpoint is an error path: nothing written beside it
            _store(record_path, {"version": FORMAT_VERSION, "stamps": stamps, "digest": fp.digest,
                                 "nonfinite": list(fp.nonfinite), "tensors": fp.tensors})
    _MEMO[key] = fp
    return fp


def _store(record_path: Path, record: dict) -> None:
    try:
        atomic_write_json(record_path, record)
    except OSError:
        pass  # read-only checkpoint (a shared cache): the in-process memo still holds it


def fingerprint(path: str | os.PathLike) -> str:
    """Short form: the 16-hex-digit digest."""
    return content_fingerprint(path).digest


def require_finite(path: str | os.PathLike, label: str | None = None) -> ContentFingerprint:
    """The fingerprint, after refusing a checkpoint with NaN/inf weights (names the tensor)."""
    fp = content_fingerprint(path)
    if fp.nonfinite:
        more = f" (and {len(fp.nonfinite) - 1} more)" if len(fp.nonfinite) > 1 else ""
        raise DumeError(f"{label or path}: tensor {fp.nonfinite[0]} has non-finite values (NaN or inf){more}; "
                        "refusing to merge or evaluate it")
    return fp


def stale_because(recorded: dict[str, tuple[str | os.PathLike, str | None]]) -> str | None:
    """Why a stored result no longer belongs to what it was computed from, or None.

    `recorded` maps a label ("model", "code expert", ...) to (checkpoint path, the fingerprint the result
    recorded for it). The one check behind every "skip what is done" (the CLM scripts' `Run.done`,
    reasoning_eval.py)."""
    for label, (path, then) in recorded.items():
        if not is_complete_checkpoint(Path(path)):
            return f"its {label} {path} is missing"
        now = fingerprint(path)
        if now != then:
            return f"it was computed from another {label} (fingerprint {then} != {now} now)"
    return None


def built_from(model_dir: str | os.PathLike, made_from: dict) -> bool:
    """A reusable built checkpoint: complete, and its config.json records the same `made_from` attributes (e.g.
    the experts' content fingerprints) it would be built from now -- a moved run reuses it, an edited expert
    rebuilds it."""
    return is_complete_checkpoint(Path(model_dir)) and all(
        read_json(Path(model_dir) / "config.json").get(k) == v for k, v in made_from.items())
