"""Checking that dense experts can be combined, and fingerprinting what they share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from transformers.utils import (CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME as WEIGHTS_INDEX_NAME,
                                SAFE_WEIGHTS_NAME as WEIGHTS_NAME)

from dume.arch.table import ARCHITECTURES, MAY_DIFFER_FIELDS, MUST_MATCH_FIELDS, architecture, is_routed
from dume.checkpoint.fingerprint import require_finite
from dume.checkpoint.io import read_json
from dume.checkpoint.reader import CheckpointReader, canonical, load_config, majority_dtype, tokenizer_fingerprints
from dume.errors import DumeError


@dataclass(frozen=True)
class ExpertSet:
    """D checked experts: their directories, the shared config, the tensor layout.

    `tensors` maps each tensor name to (shape, dtype) as stored by expert 0. `notes` are harmless differences
    worth reporting (an expert without tokenizer files, ...)."""

    dirs: tuple[Path, ...]
    config: Any  # the dense config (LlamaConfig, Qwen3Config, ...)
    tokenizer_fingerprint: str | None
    tokenizer_dir: Path | None
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    notes: tuple[str, ...] = field(default_factory=tuple)
    fingerprints: tuple[str, ...] = field(default_factory=tuple)  # content fingerprints, what caches are keyed by
    arch: Any = None  # the experts' entry in dume.arch.table (what the MoE becomes)
    warnings: tuple[str, ...] = field(default_factory=tuple)  # not errors, likely mistakes (one checkpoint twice)

    @property
    def num_experts(self) -> int:
        return len(self.dirs)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The floating dtype most of expert 0's tensors are stored in (what `dtype: auto` computes in where the
        device can)."""
        return majority_dtype(dt for _, dt in self.tensors.values())

    # Fused tensors read as their parts (see `split_fused`).
    row_views: Mapping[str, tuple[str, int, int]] = field(default_factory=dict)

    def readers(self) -> list[CheckpointReader]:
        return [CheckpointReader(d, self.row_views) for d in self.dirs]

    def split_fused(self) -> "ExpertSet":
        """These experts with fused projections (Phi-3's qkv_proj, gate_up_proj) shown as their parts, in
        `tensors` and through `readers()`: the names a MoE is built from. `self` if nothing is fused."""
        views = self.arch.row_views(self.tensors, self.config)
        if not views:
            return self
        tensors = {}
        for name, (shape, dtype) in self.tensors.items():
            parts = {v: (b - a, *shape[1:]) for v, (stored, a, b) in views.items() if stored == name}
            if parts and max(b for stored, _, b in views.values() if stored == name) != shape[0]:
                raise DumeError(f"{self.dirs[0]}: tensor {name} has {shape[0]} rows, its parts "
                                f"{sorted(parts)} need {sum(s[0] for s in parts.values())}")
            tensors.update({v: (s, dtype) for v, s in parts.items()} if parts else {name: (shape, dtype)})
        return replace(self, tensors=tensors, row_views=views)


def open_dense(path: str | Path) -> CheckpointReader:
    """One dense expert's reader with fused projections shown as their parts (`ExpertSet.split_fused` for a
    single checkpoint)."""
    cfg = load_config(path, tuple(ARCHITECTURES))
    with CheckpointReader(path) as rd:
        views = architecture(cfg.model_type).row_views(rd.keys(), cfg)
    return CheckpointReader(path, views)


def _expert_label(i: int, path: Path) -> str:
    return f"expert {i} ({path})"


def check_experts(expert_dirs: Iterable[str | Path], require_moe_compatible: bool = False) -> ExpertSet:
    """Refuse experts that cannot be merged, reading configs, tokenizer files and headers only.

    Raises `DumeError` naming the expert and the field when: fewer than two experts are given; a directory is
    missing or incomplete; the model type is not in `dume.arch.table`; an architecture field, the tensor names or
    shapes, or the tokenizers differ; a tensor is not finite. With `require_moe_compatible`, what the MoE class
    cannot hold (`Architecture.moe_refusal`: biases, ...) is refused too."""
    dirs = tuple(Path(d) for d in expert_dirs)
    if len(dirs) < 2:
        raise DumeError(f"merging needs at least 2 experts, got {len(dirs)}")
    lab = [_expert_label(i, d) for i, d in enumerate(dirs)]
    for i, d in enumerate(dirs):
        if not d.is_dir():
            raise DumeError(f"{lab[i]}: directory does not exist")
        if not (d / CONFIG_NAME).is_file():
            raise DumeError(f"{lab[i]}: not a complete checkpoint (no {CONFIG_NAME})")
        if not ((d / WEIGHTS_NAME).is_file() or (d / WEIGHTS_INDEX_NAME).is_file()):
            raise DumeError(f"{lab[i]}: not a complete checkpoint (no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")

    def labelled(i: int, read):
        """`read()`, its DumeError prefixed with expert i's label."""
        try:
            return read()
        except DumeError as e:
            raise DumeError(f"{lab[i]}: {e}") from e

    notes: list[str] = []
    raw0 = read_json(dirs[0] / CONFIG_NAME)
    arch = labelled(0, lambda: architecture(raw0.get("model_type") if isinstance(raw0, dict) else None))
    configs = [labelled(i, lambda: load_config(d, arch.dense_type)) for i, d in enumerate(dirs)]
    ref = configs[0]
    why = arch.moe_refusal(ref) if require_moe_compatible else None
    if why:
        raise DumeError(f"{lab[0]}: {why}, so these experts cannot be MoErged (model averaging still works)")
    for i, cfg in enumerate(configs[1:], start=1):
        for f in MUST_MATCH_FIELDS:
            a, b = canonical(getattr(ref, f, None)), canonical(getattr(cfg, f, None))
            if a != b:
                raise DumeError(f"{lab[i]} differs from {lab[0]} in {f}: {b!r} != {a!r}")
        for f in MAY_DIFFER_FIELDS:
            a, b = getattr(ref, f, None), getattr(cfg, f, None)
            if a != b:
                notes.append(f"{lab[i]} has {f}={b!r}, expert 0 has {a!r}; using expert 0's")

    # Tokenizers: before tensors, since it is cheap and the most common user mistake.
    fps = [tokenizer_fingerprints(d) for d in dirs]
    with_tok = [i for i, fp in enumerate(fps) if fp]
    notes += [f"{lab[i]} has no tokenizer files; its tokenizer is assumed to match" for i in range(len(dirs))
              if not fps[i]]
    tok_fp: str | None = None
    tok_dir: Path | None = None
    if with_tok:
        r = with_tok[0]
        kind0 = next(iter(fps[r]))
        tok_fp = f"{kind0}:{fps[r][kind0][:16]}"
        tok_dir = dirs[r]
        for i in with_tok[1:]:
            check_same_tokenizer(fps[i], fps[r], lab[i], lab[r], f"{lab[r]}'s")

    def layout(d: Path) -> dict:
        with CheckpointReader(d) as rd:  # headers only
            return {n: (rd.shape(n), rd.dtype(n)) for n in rd.keys()}

    layouts = [labelled(i, lambda: layout(d)) for i, d in enumerate(dirs)]
    lay0 = layouts[0]
    for i, lay in enumerate(layouts[1:], start=1):
        missing = sorted(set(lay0) - set(lay))
        extra = sorted(set(lay) - set(lay0))
        if missing or extra:
            raise DumeError(f"{lab[i]} has different tensor names than {lab[0]}: missing {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''}, extra {extra[:5]}{'...' if len(extra) > 5 else ''}")
        for n, (shape, dtype) in lay.items():
            if shape != lay0[n][0]:
                raise DumeError(f"{lab[i]} differs from {lab[0]} in the shape of tensor {n}: "
                                f"{list(shape)} != {list(lay0[n][0])}")
        dt = sorted({str(dtype) for n, (s, dtype) in lay.items() if dtype != lay0[n][1]})
        if dt:
            notes.append(f"{lab[i]} stores some tensors as {', '.join(dt)}; merged tensors use expert 0's dtypes")
    fingerprints = tuple(require_finite(d, lab[i]).digest for i, d in enumerate(dirs))
    return ExpertSet(dirs=dirs, config=ref, tokenizer_fingerprint=tok_fp, tokenizer_dir=tok_dir, tensors=lay0,
                     notes=tuple(notes), fingerprints=fingerprints, arch=arch,
                     warnings=duplicate_warnings(dirs, fingerprints))


def check_same_tokenizer(fp: Mapping[str, str], ref_fp: Mapping[str, str], who: str, ref: str, refs: str) -> None:
    """Refuse tokenizer fingerprints (`tokenizer_fingerprints`) that differ from `ref`'s on the first kind of
    file both have, or that share no kind; `refs` is `ref` possessive."""
    common = [k for k in ref_fp if k in fp]
    if not common:
        raise DumeError(f"{who}: its tokenizer files ({', '.join(fp)}) cannot be compared with {refs} "
                        f"({', '.join(ref_fp)}); save both tokenizers the same way")
    k = common[0]
    if fp[k] != ref_fp[k]:
        raise DumeError(f"{who} has a different tokenizer than {ref} "
                        f"({k} fingerprint {fp[k][:16]} != {ref_fp[k][:16]})")


def duplicate_warnings(dirs, fingerprints) -> tuple[str, ...]:
    """One line per group of experts with identical contents: a router cannot tell them apart, so their
    routing shares (and any "own expert" figure) are arbitrary."""
    groups: dict[str, list[int]] = {}
    for i, fp in enumerate(fingerprints):
        groups.setdefault(fp, []).append(i)
    return tuple(
        "experts " + ", ".join(_expert_label(i, dirs[i]) for i in idx) + f" are the same checkpoint (content "
        f"fingerprint {fp[:12]}): the router cannot tell them apart and their routing between them is arbitrary"
        for fp, idx in groups.items() if len(idx) > 1)


def shared_weights_fingerprint(source: str | Path | Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """A short stable hash of the *shared* (non-MLP, non-router) parameters.

    Dense oracles, the averaged model and the MoE built from the same experts share these tensors, so they get
    the same fingerprint: statistics collected through an oracle can be checked against the MoE they are meant
    for. Accepts a checkpoint directory, a state dict or a module. Floating tensors are hashed as float32 (exact
    for bf16/fp16), so an upcast copy hashes the same. A tied `lm_head.weight` (in memory, not on disk) is skipped.
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
