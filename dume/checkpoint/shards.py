"""Writing a checkpoint's safetensors shards one tensor at a time.

A write is a *plan*: the output tensors' names, shapes and dtypes, each with a function that computes it
(average the experts' tensor, take one expert's, a constant). Shapes are known first, so the shard boundaries,
file names and every file's header are final before the first tensor is read.

Why not `safetensors.torch.save_file`: it takes a dict of every tensor of the file, so a shard of S bytes needs
S bytes of tensors in memory at once (`bench/build_memory.py`: the merge's peak was one whole shard above the
rest of the build). Here the header is written from the plan, then each tensor is computed, written and
dropped: the merge holds about one tensor (plus the D inputs of an average). The bytes follow the format exactly
(8-byte header length, JSON header space-padded to a multiple of 8, tensors in safetensors' own order so each
is aligned to its element size); `tests/test_shards.py` checks the file equals `save_file`'s byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from dume.checkpoint.io import atomic_write_json
from dume.errors import DumeError

# A few GB keeps every file loadable by tools that memory-map one at a time ("5GB", `dume build`'s default).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SAFETENSORS_METADATA = {"format": "pt"}
SAFETENSORS_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                     torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its name, shape, dtype and how to compute it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def take(reader, name: str, dtype: torch.dtype):
    """Plan step: one checkpoint's tensor, cast to `dtype`."""
    return lambda: reader.get(name).to(dtype)


def const(t: torch.Tensor):
    """Plan step: a tensor already in memory (a router)."""
    return lambda: t


def parse_size(value) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (transformers' units)."""
    if isinstance(value, bool):
        raise DumeError(f"max_shard_size must be a size like 5GB, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise DumeError(f"max_shard_size must be positive, got {value}")
        return value
    from transformers.utils.hub import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(str(value).strip())
    except (ValueError, TypeError):
        n = None
    if not isinstance(n, int) or n <= 0:
        raise DumeError(f"max_shard_size must be a size like 5GB or 500MB, got {value!r}")
    return n


def shard_names(n: int) -> list[str]:
    """transformers' file names: one `model.safetensors`, or `model-0000i-of-0000n`."""
    if n == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _file_order(shard: list[OutTensor]) -> list[OutTensor]:
    """safetensors' own order: larger element size first, then by name."""
    return sorted(shard, key=lambda t: (-torch.empty((), dtype=t.dtype).element_size(), t.name))


def _header(shard: list[OutTensor], metadata: dict[str, str]) -> bytes:
    entries: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in shard:
        if t.dtype not in SAFETENSORS_DTYPE:
            raise DumeError(f"{t.name}: dtype {t.dtype} cannot be stored in safetensors")
        entries[t.name] = {"dtype": SAFETENSORS_DTYPE[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(shard: list[OutTensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, each tensor computed, checked, written and dropped in turn."""
    shard = _file_order(shard)
    with open(path, "wb") as f:
        f.write(_header(shard, SAFETENSORS_METADATA if metadata is None else metadata))
        for t in shard:
            v = t.make()
            if tuple(v.shape) != t.shape or v.dtype != t.dtype:
                raise DumeError(f"internal error: {t.name} computed as {tuple(v.shape)} {v.dtype}, "
                                f"planned {t.shape} {t.dtype}")
            v = v.detach().to("cpu").contiguous()
            f.write(v.reshape(-1).view(torch.uint8).numpy().data if v.numel() else b"")
            del v
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(plan: list[OutTensor], out_dir: Path, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write the plan as shards of at most `max_shard_size` bytes (a larger tensor gets a shard of its own),
    plus transformers' index when there are several."""
    max_shard_size = parse_size(max_shard_size)
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    names = shard_names(len(shards))
    for fname, shard in zip(names, shards):
        write_file(shard, Path(out_dir) / fname)
    if len(names) > 1:
        weight_map = {t.name: fname for fname, shard in zip(names, shards) for t in shard}
        total = sum(t.nbytes for t in plan)
        atomic_write_json(Path(out_dir) / SAFE_WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total},
                                                                    "weight_map": weight_map})
    return names
