"""Reading and checking dense Llama expert checkpoints, lazily.

MoErging is only meaningful when the D experts share one architecture and one tokenizer
(they were fine-tuned from one seed). The original code loaded all D experts into memory
and silently truncated mismatched tensors; here every check runs on `config.json`, the
tokenizer files and the safetensors *headers* only, before any tensor is read, and a
mismatch is a `DumeError` naming the expert and the field.

Tensors are then read one at a time through `CheckpointReader`, so a merge never holds
more than the tensor it is computing plus one input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME  # noqa: F401 (transformers' own file names)
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as WEIGHTS_INDEX_NAME
from transformers.utils import SAFE_WEIGHTS_NAME as WEIGHTS_NAME

# Which config fields must match across experts, and which may differ, live with the
# architectures (re-exported here for the merge).
from .architectures import MAY_DIFFER_FIELDS, MUST_MATCH_FIELDS, is_routed  # noqa: F401
from .errors import DumeError
from .io import read_json

# Every file a Hugging Face tokenizer may be saved as; copied verbatim into merged models.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# What identifies a tokenizer's vocabulary, in order of preference: kind -> files.
# Two experts are compared on the first kind both have.
TOKENIZER_FINGERPRINT_SOURCES: dict[str, tuple[str, ...]] = {
    "tokenizer.json": ("tokenizer.json",),
    "sentencepiece": ("tokenizer.model",),
    "bpe": ("vocab.json", "merges.txt"),
    "wordpiece": ("vocab.txt",),
}
# Keys of tokenizer.json that are runtime settings (whatever truncation/padding was last
# enabled when it was saved), not part of the vocabulary: left out of the fingerprint.
TOKENIZER_JSON_RUNTIME_KEYS = ("truncation", "padding")


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _config_class(model_type: str) -> type:
    from .architectures import ARCHITECTURES, MOE_TYPES

    for arch in ARCHITECTURES.values():
        if model_type == arch.dense_type:
            return arch.config_class(moe=False)
    if model_type in MOE_TYPES:
        return MOE_TYPES[model_type].config_class(moe=True)
    raise DumeError(f"no config class for model_type {model_type!r}")


# ----------------------------------------------------------------------------- configs


def load_config(path: str | Path, model_type: str | tuple[str, ...] = "llama"):
    """The checkpoint's config (`LlamaConfig`, `MixtralConfig`, `Qwen3Config`, ...), after
    checking the directory exists and holds the expected model type (one of them, when
    a tuple is given).

    `from_pretrained` is used (not the raw JSON) so that legacy fields such as
    `rope_theta`/`rope_scaling` are normalised into transformers 5's `rope_parameters`
    and derived fields (`head_dim`) are filled in before configs are compared.
    """
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


def _canonical(value: Any) -> Any:
    """Comparable form of a config value (dicts compared key by key, JSON-style)."""
    if isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


# -------------------------------------------------------------------------- tokenizers


def tokenizer_fingerprints(path: str | Path) -> dict[str, str]:
    """kind -> sha256 of the vocabulary, for every kind of tokenizer file present.

    `tokenizer.json` is hashed as canonical JSON without its runtime settings
    (truncation, padding), so re-saving the same tokenizer does not change it.
    """
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


# ---------------------------------------------------------------------- lazy reading


class CheckpointReader:
    """Lazy, one-tensor-at-a-time access to a safetensors checkpoint directory.

    Handles a single `model.safetensors` and a sharded `model.safetensors.index.json`.
    Only headers are read on construction; `get` reads one tensor. Corrupted or missing
    files raise `DumeError` naming the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
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
            raise DumeError(
                f"{self.path} holds no safetensors weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})"
            )
        for f in self.files:
            for name in self._handle(f).keys():
                if name in self.weight_map:
                    raise DumeError(f"{self.path}: tensor {name} appears in two shards")
                self.weight_map[name] = f

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
        try:
            return self._handle(fname).get_slice(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise DumeError(f"corrupted safetensors file {self.path / fname}: {e}") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise DumeError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as a private copy.

        `safe_open(...).get_tensor` returns a view of a memory map of the whole file. The
        map is opened for this one read and closed after the copy: the file pages a read
        touches count in the process's resident memory for as long as the map lives, so
        a reader kept open over a merge held every expert's file (measured with
        `bench/build_memory.py`: a 3-expert build's peak fell by the experts' total size).
        The copy also makes the result the caller's (an in-place `add_` cannot reach the
        file's pages). Headers are read once, by the handles `keys`/`shape` use.
        """
        fname = self.weight_map.get(name)
        if fname is None:
            raise DumeError(f"{self.path}: no tensor named {name}")
        try:
            with safe_open(str(self.path / fname), framework="pt", device="cpu") as f:
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


# ------------------------------------------------------------------------ expert sets


@dataclass(frozen=True)
class ExpertSet:
    """D checked experts: their directories, the shared config, the tensor layout.

    `tensors` maps each tensor name to (shape, dtype) as stored by expert 0. `notes` are
    harmless differences worth reporting (an expert without tokenizer files, ...).
    """

    dirs: tuple[Path, ...]
    config: Any  # LlamaConfig
    tokenizer_fingerprint: str | None
    tokenizer_dir: Path | None
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Content fingerprints (dume.fingerprint), one per expert: what caches are keyed by.
    fingerprints: tuple[str, ...] = field(default_factory=tuple)
    # The experts' entry in dume.architectures (what the MoE becomes).
    arch: Any = None
    # Not errors, but likely mistakes the user should see (the same checkpoint twice).
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_experts(self) -> int:
        return len(self.dirs)

    def readers(self) -> list[CheckpointReader]:
        return [CheckpointReader(d) for d in self.dirs]


def _expert_label(i: int, path: Path) -> str:
    return f"expert {i} ({path})"


def check_experts(expert_dirs: Iterable[str | Path], require_mixtral_compatible: bool = False) -> ExpertSet:
    """Refuse experts that cannot be merged, reading configs and headers only.

    Raises `DumeError` naming the expert and the differing field when: fewer than two
    experts are given; a directory is missing or incomplete; a config is not Llama; an
    architecture field differs; the tensor names, shapes differ; the tokenizers differ.
    With `require_mixtral_compatible`, Llama features Mixtral cannot hold (biases) are
    refused too.
    """
    dirs = tuple(Path(d) for d in expert_dirs)
    if len(dirs) < 2:
        raise DumeError(f"merging needs at least 2 experts, got {len(dirs)}")
    for i, d in enumerate(dirs):
        if not d.is_dir():
            raise DumeError(f"{_expert_label(i, d)}: directory does not exist")
        if not (d / CONFIG_NAME).is_file():
            raise DumeError(f"{_expert_label(i, d)}: not a complete checkpoint (no {CONFIG_NAME})")
        if not ((d / WEIGHTS_NAME).is_file() or (d / WEIGHTS_INDEX_NAME).is_file()):
            raise DumeError(
                f"{_expert_label(i, d)}: not a complete checkpoint (no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})"
            )

    from .architectures import architecture

    notes: list[str] = []
    configs = []
    raw0 = read_json(dirs[0] / CONFIG_NAME)
    try:
        arch = architecture(raw0.get("model_type") if isinstance(raw0, dict) else None)
    except DumeError as e:
        raise DumeError(f"{_expert_label(0, dirs[0])}: {e}") from e
    for i, d in enumerate(dirs):
        try:
            configs.append(load_config(d, arch.dense_type))
        except DumeError as e:
            raise DumeError(f"{_expert_label(i, d)}: {e}") from e
    ref = configs[0]
    if require_mixtral_compatible:
        for flag in arch.incompatible_flags:
            if getattr(ref, flag, False):
                raise DumeError(
                    f"{_expert_label(0, dirs[0])}: {flag}=True; a {arch.moe_class} has no such biases, so "
                    f"these experts cannot be MoErged (model averaging still works)"
                )
    for i, cfg in enumerate(configs[1:], start=1):
        for f in MUST_MATCH_FIELDS:
            a, b = _canonical(getattr(ref, f, None)), _canonical(getattr(cfg, f, None))
            if a != b:
                raise DumeError(
                    f"{_expert_label(i, dirs[i])} differs from {_expert_label(0, dirs[0])} in {f}: {b!r} != {a!r}"
                )
        for f in MAY_DIFFER_FIELDS:
            a, b = getattr(ref, f, None), getattr(cfg, f, None)
            if a != b:
                notes.append(f"{_expert_label(i, dirs[i])} has {f}={b!r}, expert 0 has {a!r}; using expert 0's")

    # Tokenizers: before tensors, since it is cheap and the most common user mistake.
    fps = [tokenizer_fingerprints(d) for d in dirs]
    with_tok = [i for i, fp in enumerate(fps) if fp]
    for i, fp in enumerate(fps):
        if not fp:
            notes.append(f"{_expert_label(i, dirs[i])} has no tokenizer files; its tokenizer is assumed to match")
    tok_fp: str | None = None
    tok_dir: Path | None = None
    if with_tok:
        r = with_tok[0]
        kind0 = next(iter(fps[r]))
        tok_fp = f"{kind0}:{fps[r][kind0][:16]}"
        tok_dir = dirs[r]
        for i in with_tok[1:]:
            common = [k for k in fps[r] if k in fps[i]]
            if not common:
                raise DumeError(
                    f"{_expert_label(i, dirs[i])}: its tokenizer files ({', '.join(fps[i])}) cannot be compared "
                    f"with {_expert_label(r, dirs[r])}'s ({', '.join(fps[r])}); save both tokenizers the same way"
                )
            k = common[0]
            if fps[i][k] != fps[r][k]:
                raise DumeError(
                    f"{_expert_label(i, dirs[i])} has a different tokenizer than {_expert_label(r, dirs[r])} "
                    f"({k} fingerprint {fps[i][k][:16]} != {fps[r][k][:16]})"
                )

    # Tensor layout from the headers.
    layouts = []
    for i, d in enumerate(dirs):
        try:
            with CheckpointReader(d) as rd:
                layouts.append({n: (rd.shape(n), rd.dtype(n)) for n in rd.keys()})
        except DumeError as e:
            raise DumeError(f"{_expert_label(i, d)}: {e}") from e
    lay0 = layouts[0]
    for i, lay in enumerate(layouts[1:], start=1):
        missing = sorted(set(lay0) - set(lay))
        extra = sorted(set(lay) - set(lay0))
        if missing or extra:
            raise DumeError(
                f"{_expert_label(i, dirs[i])} has different tensor names than {_expert_label(0, dirs[0])}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"extra {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        for n, (shape, dtype) in lay.items():
            if shape != lay0[n][0]:
                raise DumeError(
                    f"{_expert_label(i, dirs[i])} differs from {_expert_label(0, dirs[0])} in the shape of "
                    f"tensor {n}: {list(shape)} != {list(lay0[n][0])}"
                )
        dt = sorted({str(dtype) for n, (s, dtype) in lay.items() if dtype != lay0[n][1]})
        if dt:
            notes.append(
                f"{_expert_label(i, dirs[i])} stores some tensors as {', '.join(dt)}; merged tensors use expert 0's dtypes"
            )
    from .fingerprint import require_finite

    fingerprints = tuple(require_finite(d, _expert_label(i, d)).digest for i, d in enumerate(dirs))
    warnings = duplicate_warnings(dirs, fingerprints)
    return ExpertSet(
        dirs=dirs,
        config=ref,
        tokenizer_fingerprint=tok_fp,
        tokenizer_dir=tok_dir,
        tensors=lay0,
        notes=tuple(notes),
        fingerprints=fingerprints,
        arch=arch,
        warnings=warnings,
    )


def duplicate_warnings(dirs, fingerprints) -> tuple[str, ...]:
    """One line per group of experts with identical contents: a router cannot tell them
    apart, so their routing shares (and any "own expert" figure) are arbitrary."""
    groups: dict[str, list[int]] = {}
    for i, fp in enumerate(fingerprints):
        groups.setdefault(fp, []).append(i)
    return tuple(
        "experts " + ", ".join(_expert_label(i, dirs[i]) for i in idx) + f" are the same checkpoint (content "
        f"fingerprint {fp[:12]}): the router cannot tell them apart and their routing between them is arbitrary"
        for fp, idx in groups.items() if len(idx) > 1)


# ----------------------------------------------------------------------- fingerprints


def model_fingerprint(source: str | Path | Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """A short stable hash of the *shared* (non-MLP, non-router) parameters.

    Dense oracles, the averaged model and the MoE built from the same experts all share
    these tensors, so they get the same fingerprint: DUME statistics collected through
    an oracle can be checked against the MoE they are meant for. Accepts a checkpoint
    directory, a state dict or a module. Floating tensors are hashed as float32 (exact
    for bf16/fp16), so an upcast copy of a checkpoint hashes the same. A tied
    `lm_head.weight` (present in memory, absent on disk) is skipped.
    """
    h = hashlib.sha256()

    def feed(name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        t = t.contiguous()
        h.update(f"{name}|{str(t.dtype)}|{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    if isinstance(source, (str, Path)):
        with CheckpointReader(source) as rd:
            _fingerprint_state(rd.keys(), rd.get, feed)
    else:
        state = source.state_dict() if isinstance(source, torch.nn.Module) else source
        _fingerprint_state(list(state), state.__getitem__, feed)
    return h.hexdigest()[:16]


def _fingerprint_state(names, get, feed) -> None:
    names = sorted(n for n in names if not is_routed(n))
    if "lm_head.weight" in names and "model.embed_tokens.weight" in names:
        lm, emb = get("lm_head.weight"), get("model.embed_tokens.weight")
        if lm.shape == emb.shape and torch.equal(lm, emb):
            names.remove("lm_head.weight")  # tied: absent on disk, present in memory
    for n in names:
        feed(n, get(n))
