"""Reading checkpoints lazily: configs, tokenizer fingerprints, safetensors tensors one at a time.

MoErging needs D experts of one architecture and one tokenizer (fine-tuned from one seed). The original code
loaded all D experts into memory and silently truncated mismatched tensors; here the checks
(`dume.checkpoint.experts.check_experts`) read `config.json`, the tokenizer files and the safetensors *headers*
only, before any tensor, and tensors are then read one at a time through `CheckpointReader`, so a merge holds
the tensor it computes plus one input.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from transformers.utils import (CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME as WEIGHTS_INDEX_NAME,
                                SAFE_WEIGHTS_NAME as WEIGHTS_NAME)

from dume.checkpoint.io import read_json
from dume.checkpoint.shards import SAFETENSORS_DTYPE
from dume.errors import DumeError

# Every file a Hugging Face tokenizer may be saved as; copied verbatim into merged models.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")

# What identifies a vocabulary, by preference: kind -> files (two experts compared on the first kind both have).
TOKENIZER_FINGERPRINT_SOURCES: dict[str, tuple[str, ...]] = {
    "tokenizer.json": ("tokenizer.json",), "sentencepiece": ("tokenizer.model",),
    "bpe": ("vocab.json", "merges.txt"), "wordpiece": ("vocab.txt",)}
# tokenizer.json's runtime settings (the truncation/padding enabled at save), left out of the fingerprint.
TOKENIZER_JSON_RUNTIME_KEYS = ("truncation", "padding")

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {code: dt for dt, code in SAFETENSORS_DTYPE.items()}


def _config_class(model_type: str) -> type:
    from dume.arch.table import ARCHITECTURES, MOE_TYPES

    for arch in ARCHITECTURES.values():
        if model_type == arch.dense_type:
            return arch.config_class(moe=False)
    if model_type in MOE_TYPES:
        return MOE_TYPES[model_type].config_class(moe=True)
    raise DumeError(f"no config class for model_type {model_type!r}")


def load_config(path: str | Path, model_type: str | tuple[str, ...] = "llama"):
    """The checkpoint's config (`LlamaConfig`, `MixtralConfig`, `Qwen3Config`, ...), after checking the directory
    exists and holds the expected model type (one of them, for a tuple).

    `from_pretrained`, not the raw JSON, so that legacy fields (`rope_theta`/`rope_scaling`) are normalised into
    transformers 5's `rope_parameters` and derived ones (`head_dim`) filled in before configs are compared."""
    path = Path(path)
    if not path.is_dir():
        raise DumeError(f"checkpoint directory does not exist: {path}")
    raw = read_json(path / CONFIG_NAME)
    found = raw.get("model_type") if isinstance(raw, dict) else None
    allowed = (model_type,) if isinstance(model_type, str) else tuple(model_type)
    if found not in allowed:
        want = repr(allowed[0]) if len(allowed) == 1 else "one of " + ", ".join(map(repr, allowed))
        raise DumeError(f"{path}: model_type is {found!r}, expected {want}")
    cls = _config_class(found)
    try:
        return cls.from_pretrained(str(path))
    except Exception as e:  # strict dataclass validation raises several types
        raise DumeError(f"{path}/{CONFIG_NAME} is not a valid {model_type} config: {e}") from e


def canonical(value: Any) -> Any:
    """Comparable form of a config value (dicts compared key by key, JSON-style)."""
    if isinstance(value, Mapping):
        return {k: canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def tokenizer_fingerprints(path: str | Path) -> dict[str, str]:
    """kind -> sha256 of the vocabulary, for every kind of tokenizer file present. `tokenizer.json` is hashed as
    canonical JSON without its runtime settings, so re-saving the same tokenizer does not change it."""
    path = Path(path)
    out: dict[str, str] = {}
    for kind, names in TOKENIZER_FINGERPRINT_SOURCES.items():
        if not all((path / n).is_file() for n in names):
            continue
        h = hashlib.sha256()
        for n in names:
            data = (path / n).read_bytes()
            if n == "tokenizer.json":
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError as e:
                    raise DumeError(f"corrupted tokenizer file {path / n}: {e}") from e
                for key in TOKENIZER_JSON_RUNTIME_KEYS:
                    obj.pop(key, None)
                data = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()
            h.update(n.encode() + b"\0" + data + b"\0")
        out[kind] = h.hexdigest()
    return out


def majority_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """A checkpoint's storage dtype: the most common of its floating tensors' (float32 if none)."""
    dts = [dt for dt in dtypes if dt.is_floating_point]
    return max(set(dts), key=dts.count) if dts else torch.float32


class CheckpointReader:
    """Lazy, one-tensor-at-a-time access to a safetensors checkpoint directory.

    A single `model.safetensors` or a sharded `model.safetensors.index.json`. Only headers are read on
    construction; `get` reads one tensor. Corrupted or missing files raise `DumeError` naming the file.

    `row_views` maps a name the file does not hold to (stored name, first row, end row): the view is shown in
    place of the stored tensor and only its rows are read. This is how fused projections (`dume.arch.table`'s
    `split`) are read under the separate names every other module uses.
    """

    def __init__(self, path: str | Path, row_views: Mapping[str, tuple[str, int, int]] | None = None):
        self.path = Path(path)
        self.row_views = dict(row_views or {})
        if not self.path.is_dir():
            raise DumeError(f"checkpoint directory does not exist: {self.path}")
        self._handles: dict[str, Any] = {}
        self.weight_map: dict[str, str] = {}
        index = self.path / WEIGHTS_INDEX_NAME
        single = self.path / WEIGHTS_NAME
        if single.is_file():
            self.files = [WEIGHTS_NAME]
        elif index.is_file():
            data = read_json(index)
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise DumeError(f"corrupted index {index}: no weight_map")
            self.files = sorted(set(wm.values()))
            for f in self.files:
                if not (self.path / f).is_file():
                    raise DumeError(f"{index} names shard {f}, which is missing")
        else:
            raise DumeError(f"{self.path} holds no safetensors weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")
        for f in self.files:
            for name in self._handle(f).keys():
                if name in self.weight_map:
                    raise DumeError(f"{self.path}: tensor {name} appears in two shards")
                self.weight_map[name] = f
        if self.row_views:
            hidden = {stored for stored, _, _ in self.row_views.values()}
            missing = sorted(hidden - set(self.weight_map))
            if missing:
                raise DumeError(f"{self.path}: no tensor named {missing[0]} to split")
            shown: dict[str, str] = {}
            for name, f in self.weight_map.items():
                if name in hidden:
                    shown.update({v: f for v, (stored, _, _) in self.row_views.items() if stored == name})
                else:
                    shown[name] = f
            self.weight_map = shown

    def _handle(self, fname: str):
        if fname not in self._handles:
            p = self.path / fname
            try:
                self._handles[fname] = safe_open(str(p), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise DumeError(f"corrupted or unreadable safetensors file {p}: {e}") from e
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    def _slice(self, name: str):
        fname = self.weight_map[name]
        name = self.row_views.get(name, (name,))[0]
        try:
            return self._handle(fname).get_slice(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise DumeError(f"corrupted safetensors file {self.path / fname}: {e}") from e

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self._slice(name).get_shape())
        if name in self.row_views:
            _, a, b = self.row_views[name]
            return (b - a, *shape[1:])
        return shape

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise DumeError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as a private copy.

        `safe_open(...).get_tensor` returns a view of a memory map of the whole file, and the pages a read touches
        count in the process's resident memory while the map lives: a reader kept open over a merge held every
        expert's file. So the map is opened for this one read and closed after the copy (`bench/build_memory.py`:
        a 3-expert build's peak fell by the experts' total size). The copy is also the caller's own (an in-place
        `add_` cannot reach the file's pages). Headers are read once, by the handles `keys`/`shape` use.
        """
        fname = self.weight_map.get(name)
        if fname is None:
            raise DumeError(f"{self.path}: no tensor named {name}")
        try:
            with safe_open(str(self.path / fname), framework="pt", device="cpu") as f:
                if name in self.row_views:
                    stored, a, b = self.row_views[name]
                    return f.get_slice(stored)[a:b].clone()
                return f.get_tensor(name).clone()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DumeError(f"corrupted safetensors file {self.path / fname}: {e}") from e

    def metadata(self, fname: str) -> dict[str, str]:
        return dict(self._handle(fname).metadata() or {})

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.weight_map:
            yield name, self.get(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
