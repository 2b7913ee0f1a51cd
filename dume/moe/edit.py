"""Editing an existing MoE checkpoint: its routers, and which experts it holds.

A MoE built by `dume.moe.merge` is edited without its source experts: routers are replaced in the files that
hold them (`set_gates`), experts are kept, renumbered, dropped or taken from a new dense checkpoint
(`write_moe_experts`, `extend_moe`, `drop_experts`), and "shared weights + one expert" is rebuilt as a dense
model (`build_dense_from_moe`). An edit is a list of expert "slots": an int keeps that expert of the MoE
(renumbered by its place in the list), a path takes a dense checkpoint's MLPs as a new expert.

Adding or removing an expert leaves every shared tensor where it is: the router is a closed-form function of
statistics collected *through* them, which makes the edit exact (docs/design.md §5). Tensor names and config
fields come from the MoE's architecture record (`dume.arch.table.moe_architecture`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME

from dume.arch.table import (ARCHITECTURES, GATE_NAMES, MOE_TYPES, MUST_MATCH_FIELDS, Architecture, architecture,
                             is_routed, moe_architecture)
from dume.checkpoint.config_files import with_v4_keys
from dume.checkpoint.experts import check_same_tokenizer, open_dense
from dume.checkpoint.io import atomic_dir, atomic_write_json, is_complete_checkpoint, read_json, tmp_sibling
from dume.checkpoint.outputs import require_free_space
from dume.checkpoint.reader import CheckpointReader, load_config, majority_dtype
from dume.checkpoint.shards import (DEFAULT_MAX_SHARD_BYTES, SAFETENSORS_METADATA, OutTensor, const, take,
                                    write_safetensors)
from dume.checkpoint.tokenizer_files import copy_tokenizer_files
from dume.errors import DumeError
from dume.moe.merge import check_extra_config, check_out_dir, validate_gates, validate_k


def open_moe(moe_dir: str | Path):
    """(path, config, architecture record) of a complete MoE checkpoint, or a clear error."""
    moe_dir = Path(moe_dir)
    if not is_complete_checkpoint(moe_dir):
        raise DumeError(f"{moe_dir} is not a complete checkpoint (config.json + safetensors weights)")
    cfg = load_config(moe_dir, tuple(MOE_TYPES))
    return moe_dir, cfg, moe_architecture(cfg)


def num_experts(cfg) -> int:
    return getattr(cfg, moe_architecture(cfg).num_experts_field)


def _gate_names(reader: CheckpointReader, num_layers: int) -> list[str]:
    names = []
    for layer in range(num_layers):
        for tpl in GATE_NAMES:
            n = tpl.format(layer=layer)
            if n in reader:
                names.append(n)
                break
        else:
            raise DumeError(f"{reader.path}: no router weight for layer {layer}")
    return names


def read_gates(moe_dir: str | Path) -> list[torch.Tensor]:
    """The L router weights [D, H] of a MoE checkpoint, without loading the model."""
    moe_dir, cfg, _ = open_moe(moe_dir)
    with CheckpointReader(moe_dir) as rd:
        return [rd.get(n) for n in _gate_names(rd, cfg.num_hidden_layers)]


def load_moe(moe_dir: str | Path, **kwargs):
    """The MoE class's `from_pretrained(moe_dir, **kwargs)` after checking the dir."""
    moe_dir, _, arch = open_moe(moe_dir)
    return arch.model_class(moe=True).from_pretrained(str(moe_dir), **kwargs)


_FUSED_EXPERTS = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<which>gate_up_proj|down_proj)$")
_IN_MEMORY_ROUTER = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.gate\.weight$")


def load_moe_streamed(moe_dir: str | Path, dtype: torch.dtype | None = None):
    """The MoE model (eval mode, CPU) filled one checkpoint tensor at a time; `dtype` defaults to the stored one.

    Why not `from_pretrained`: on the CPU, transformers fuses the per-expert matrices while the checkpoint is
    memory-mapped and peaks at about twice the MoE's size (797 MB for a 377 MB Mixtral; a 146 MB dense checkpoint
    loads in 148 MB). Here the model is made on the meta device, given uninitialised storage, and each parameter
    is filled from the checkpoint, the fused experts (`gate_up_proj[e]` = expert e's gate then up projection,
    `down_proj[e]`) expert by expert: the peak is the model plus one tensor. `tests/test_architectures.py` checks
    the state dict equals `from_pretrained`'s for every architecture, so a layout change cannot pass unnoticed."""
    from transformers import AutoModelForCausalLM

    moe_dir, cfg, arch = open_moe(moe_dir)
    with CheckpointReader(moe_dir) as rd:
        if dtype is None:
            dtype = majority_dtype(rd.dtype(n) for n in rd.keys())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        # meta -> empty storage unties shared parameters: re-tie before filling
        model.to_empty(device="cpu")
        model.tie_weights()
        fill_parameters(model.named_parameters(), rd, moe_dir, cfg, arch)
    # ... and leaves buffers uninitialised: rebuild the rotary embedding's computed ones
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    return model.eval()


@torch.no_grad()
def fill_parameters(named_parameters, rd: CheckpointReader, moe_dir: Path, cfg, arch) -> None:
    """Copy each (name, parameter) of a MoE model in memory from the checkpoint `rd` reads: the fused experts
    (`gate_up_proj[e]` = expert e's gate then up projection, `down_proj[e]`) expert by expert, the routers from
    the architecture's gate name, everything else by its own name (everything, for a dense model: `arch` None)."""
    D = num_experts(cfg) if arch is not None else 0
    for name, p in named_parameters:
        fused = _FUSED_EXPERTS.match(name)
        if fused:
            layer = int(fused["layer"])
            for e in range(D):
                if fused["which"] == "down_proj":
                    parts = [rd.get(arch.expert_tensor(layer, e, "down_proj"))]
                else:
                    parts = [rd.get(arch.expert_tensor(layer, e, proj)) for proj in ("gate_proj", "up_proj")]
                if sum(t.shape[0] for t in parts) != p.shape[1] or parts[0].shape[1:] != p.shape[2:]:
                    raise DumeError(f"{moe_dir}: expert {e} of layer {layer} does not fit {name} "
                                    f"{list(p.shape)}: transformers' in-memory expert layout changed?")
                p[e].copy_(torch.cat(parts) if len(parts) > 1 else parts[0])
            continue
        router = _IN_MEMORY_ROUTER.match(name)
        src = arch.gate_name.format(layer=int(router["layer"])) if router else name
        if src not in rd:
            raise DumeError(f"{moe_dir}: no tensor {src} for the model's {name}")
        t = rd.get(src)
        if tuple(t.shape) != tuple(p.shape):
            raise DumeError(f"{moe_dir}: {src} has shape {list(t.shape)}, the model's {name} {list(p.shape)}")
        p.copy_(t)


def _rewrite_file(rd: CheckpointReader, fname: str, replace: dict[str, torch.Tensor], dst: Path) -> None:
    """Write `fname`'s tensors with some replaced to `dst` (one file in memory: only the files that hold routers
    are rewritten, and routers sit with their layer's tensors)."""
    tensors = {n: rd.get(n) for n in rd.keys() if rd.file_of(n) == fname}
    tensors.update(replace)
    meta = rd.metadata(fname)
    meta.update(SAFETENSORS_METADATA)
    save_file(tensors, str(dst), metadata=meta)


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (for free-space checks before copying or rewriting it)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def set_gates(moe_dir: str | Path, gates: Sequence[torch.Tensor], out_dir: str | Path | None = None,
              num_experts_per_tok: int | None = None) -> Path:
    """Replace the routers (and optionally k) of a MoE checkpoint.

    Only the files holding router weights are rewritten, each to a temporary sibling renamed into place, so an
    interrupted call leaves the old file. With `out_dir` the checkpoint is copied there (atomically), `moe_dir`
    untouched. Gates are cast to the stored routers' dtype; shapes ([D, H] × L layers) are checked first."""
    moe_dir, cfg, _ = open_moe(moe_dir)
    D, H, L = num_experts(cfg), cfg.hidden_size, cfg.num_hidden_layers
    gates = validate_gates(gates, L, D, H, f"set_gates({moe_dir})")
    if num_experts_per_tok is not None:
        validate_k(num_experts_per_tok, D)
    in_place = out_dir is None or Path(out_dir).resolve() == moe_dir.resolve()
    if not in_place:
        out_dir = check_out_dir(out_dir, [moe_dir])

    rd = CheckpointReader(moe_dir)
    names = _gate_names(rd, L)
    replace_by_file: dict[str, dict[str, torch.Tensor]] = {}
    for n, g in zip(names, gates):
        replace_by_file.setdefault(rd.file_of(n), {})[n] = g.to(rd.dtype(n)).contiguous()
    raw_config = with_v4_keys(read_json(moe_dir / CONFIG_NAME))
    if num_experts_per_tok is not None:
        raw_config["num_experts_per_tok"] = num_experts_per_tok

    if in_place:
        tmps: list[tuple[Path, Path]] = []
        try:
            for fname, rep in replace_by_file.items():
                final = moe_dir / fname
                tmp = tmp_sibling(final)
                _rewrite_file(rd, fname, rep, tmp)
                tmps.append((tmp, final))
            rd.close()
            for tmp, final in tmps:
                os.replace(tmp, final)
        finally:
            for tmp, _ in tmps:
                tmp.unlink(missing_ok=True)
        if num_experts_per_tok is not None:
            atomic_write_json(moe_dir / CONFIG_NAME, raw_config)
        return moe_dir
    out_dir = Path(out_dir)
    require_free_space(out_dir.parent, dir_bytes(moe_dir), f"the copy {out_dir} of {moe_dir}")
    with atomic_dir(out_dir) as tmp_dir:
        for src in moe_dir.iterdir():
            if src.name in replace_by_file:
                _rewrite_file(rd, src.name, replace_by_file[src.name], tmp_dir / src.name)
            elif src.is_file():
                shutil.copy2(src, tmp_dir / src.name)
            elif src.is_dir():
                shutil.copytree(src, tmp_dir / src.name)
        atomic_write_json(tmp_dir / CONFIG_NAME, raw_config)
    rd.close()
    return out_dir


def _check_expert_names(reader: CheckpointReader, arch: Architecture, num_layers: int, num_exp: int) -> None:
    """Refuse a MoE checkpoint whose experts are not stored one matrix per expert."""
    for layer in range(num_layers):
        for e in range(num_exp):
            for proj in arch.expert_proj:
                n = arch.expert_tensor(layer, e, proj)
                if n not in reader:
                    raise DumeError(f"{reader.path}: missing expert tensor {n} (expected a {arch.moe_class} "
                                    "checkpoint with one matrix per expert and projection, as save_pretrained writes)")


def expert_mlp_state_dict(source: str | Path, expert: int | None = None) -> dict[str, torch.Tensor]:
    """One expert's MLPs under dense names (`model.layers.L.mlp.gate_proj.weight`, ...).

    `source` is a dense checkpoint (expert=None) or a MoE checkpoint (expert = the slot index). The same names
    either way, so an expert can be compared, hashed or put into a dense model whatever checkpoint it lives in."""
    source = Path(source)
    with (open_dense(source) if expert is None else CheckpointReader(source)) as rd:
        if expert is None:
            cfg = load_config(source, tuple(ARCHITECTURES))
            arch = architecture(cfg.model_type)
            names = {arch.dense_mlp_name(layer, proj): arch.dense_mlp_name(layer, proj)
                     for layer in range(cfg.num_hidden_layers) for proj in arch.expert_proj}
        else:
            source, cfg, arch = open_moe(source)
            D = num_experts(cfg)
            if not isinstance(expert, int) or isinstance(expert, bool) or not 0 <= expert < D:
                raise DumeError(f"{source}: expert must be in [0, {D}), got {expert!r}")
            _check_expert_names(rd, arch, cfg.num_hidden_layers, D)
            names = {arch.dense_mlp_name(layer, proj): arch.expert_tensor(layer, expert, proj)
                     for layer in range(cfg.num_hidden_layers) for proj in arch.expert_proj}
        missing = [src for src in names.values() if src not in rd]
        if missing:
            raise DumeError(f"{source}: missing MLP tensor {missing[0]}")
        return {dst: rd.get(src) for dst, src in names.items()}


def moe_shared_state_dict(moe_dir: str | Path) -> dict[str, torch.Tensor]:
    """A MoE checkpoint's shared tensors (everything but experts and routers)."""
    moe_dir, _, _ = open_moe(moe_dir)
    with CheckpointReader(moe_dir) as rd:
        return {n: rd.get(n) for n in rd.keys() if not is_routed(n)}


def build_dense_from_moe(moe_dir: str | Path, expert: int | str | Path, shared: dict[str, torch.Tensor] | None = None):
    """The MoE with every token routed to one expert, as an in-memory dense model (experts' class, eval mode).

    `expert` is a slot of the MoE (int) or a dense checkpoint whose MLPs stand in for a new expert. This is the
    model DUME's statistics of that domain are collected through; it needs the MoE only (plus the new expert's
    checkpoint), not the experts it was built from. Pass `shared` (`moe_shared_state_dict`) to read them once."""
    moe_dir, mcfg, arch = open_moe(moe_dir)
    if shared is None:
        shared = moe_shared_state_dict(moe_dir)
    mlp = expert_mlp_state_dict(moe_dir, expert) if isinstance(expert, int) else expert_mlp_state_dict(expert, None)
    dtype = majority_dtype(t.dtype for t in shared.values())
    sd = {**shared, **{n: t.to(dtype) for n, t in mlp.items()}}
    model_class = arch.model_class(moe=False)
    return model_class.from_pretrained(None, config=arch.dense_config(mcfg), state_dict=sd, dtype=dtype).eval()


def check_expert_fits_moe(moe_dir: str | Path, expert_dir: str | Path) -> list[str]:
    """Refuse a dense checkpoint that cannot become one more expert of this MoE; return notes.

    `check_experts` compares dense checkpoints with each other; here one side is a MoE, so the new expert's config
    is compared with the dense config the MoE reads back as (`Architecture.dense_config`), then the tokenizers,
    then the MLP tensors' shapes (headers only). Every error names the field and both values."""
    from dume.checkpoint.reader import canonical, tokenizer_fingerprints

    moe_dir, mcfg, arch = open_moe(moe_dir)
    expert_dir = Path(expert_dir)
    if not is_complete_checkpoint(expert_dir):
        raise DumeError(f"new expert {expert_dir}: not a complete checkpoint (config.json + safetensors weights)")
    compatible = tuple(t for t, a in ARCHITECTURES.items() if a.moe_type == arch.moe_type)
    try:
        lcfg = load_config(expert_dir, compatible)
    except DumeError as e:
        raise DumeError(f"new expert: {e}") from e
    why = architecture(lcfg.model_type).moe_refusal(lcfg)
    if why:
        raise DumeError(f"new expert {expert_dir}: {why}, so it cannot be an expert of this MoE")
    dense = arch.dense_config(mcfg)
    for f in MUST_MATCH_FIELDS:
        if f in arch.incompatible_flags or not hasattr(lcfg, f):  # Phi-3 configs derive head_dim
            continue
        a, b = canonical(getattr(dense, f, None)), canonical(getattr(lcfg, f))
        if a != b:
            raise DumeError(f"new expert {expert_dir} differs from the MoE {moe_dir} in {f}: {b!r} != {a!r}")
    notes = []
    fa, fb = tokenizer_fingerprints(moe_dir), tokenizer_fingerprints(expert_dir)
    if not fa or not fb:
        notes.append(f"{moe_dir if not fa else expert_dir} has no tokenizer files; the tokenizers are assumed to match")
    else:
        check_same_tokenizer(fb, fa, f"new expert {expert_dir}", f"the MoE {moe_dir}", "the MoE's")
    with CheckpointReader(moe_dir) as moe, open_dense(expert_dir) as rd:
        for layer in range(mcfg.num_hidden_layers):
            for proj in arch.expert_proj:
                n = arch.dense_mlp_name(layer, proj)
                ref = arch.expert_tensor(layer, 0, proj)
                if n not in rd:
                    raise DumeError(f"new expert {expert_dir}: missing MLP tensor {n}")
                if ref in moe and rd.shape(n) != moe.shape(ref):
                    raise DumeError(f"new expert {expert_dir}: tensor {n} has shape {list(rd.shape(n))}, "
                                    f"the MoE's experts {list(moe.shape(ref))}")
    return notes


def _check_slots(slots: Sequence, num_exp: int) -> list:
    slots = list(slots)
    if not slots:
        raise DumeError("a MoE needs at least one expert; refusing to write one with none")
    kept = [s for s in slots if isinstance(s, int) and not isinstance(s, bool)]
    bad = [s for s in kept if not 0 <= s < num_exp]
    if bad:
        raise DumeError(f"expert index {bad[0]} out of range: the MoE has {num_exp} experts")
    if len(set(kept)) != len(kept):
        raise DumeError(f"expert slots {kept} name an expert twice")
    return [s if isinstance(s, int) and not isinstance(s, bool) else Path(s) for s in slots]


def _plan_moe_edit(moe: CheckpointReader, arch: Architecture, num_layers: int, slots: list, new_readers: dict,
                   gates: list[torch.Tensor]) -> list[OutTensor]:
    """Shared tensors copied; layer l's experts taken slot by slot; then its new gate."""
    out: list[OutTensor] = []
    for n in moe.keys():
        kind = arch.moe_kind_of(n)[0]
        if kind == "shared":
            if is_routed(n):
                raise DumeError(f"{moe.path}: tensor {n} is neither shared, an expert nor a router; "
                                "cannot edit this MoE")
            out.append(OutTensor(n, moe.shape(n), moe.dtype(n), take(moe, n, moe.dtype(n))))
    for layer in range(num_layers):
        for new_e, slot in enumerate(slots):
            for proj in sorted(arch.expert_proj):
                ref = arch.expert_tensor(layer, 0, proj)
                shape, dtype = moe.shape(ref), moe.dtype(ref)
                name = arch.expert_tensor(layer, new_e, proj)
                if isinstance(slot, int):
                    out.append(OutTensor(name, shape, dtype, take(moe, arch.expert_tensor(layer, slot, proj), dtype)))
                else:
                    out.append(OutTensor(name, shape, dtype, take(new_readers[slot], arch.dense_mlp_name(layer, proj),
                                                                  dtype)))
        g = gates[layer]
        out.append(OutTensor(arch.gate_name.format(layer=layer), tuple(g.shape), g.dtype, const(g)))
    return out


def write_moe_experts(moe_dir: str | Path, slots: Sequence, dst: str | Path,
                      gates: Sequence[torch.Tensor] | None = None, num_experts_per_tok: int | None = None,
                      extra_config: dict | None = None, *, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a MoE checkpoint into the existing directory `dst` whose experts are `slots`.

    An int slot keeps that expert of `moe_dir`; a path takes that dense checkpoint's MLPs (check it first with
    `check_expert_fits_moe`). Shared tensors are copied bit for bit, gates are `gates` (zeros if None, cast to the
    stored routers' dtype), config.json is the MoE's with the number of experts, k and `extra_config` updated.
    Not atomic by itself: `extend_moe`, `drop_experts` or a caller adding files wrap it in `atomic_dir`."""
    moe_dir, mcfg, arch = open_moe(moe_dir)
    slots = _check_slots(slots, num_experts(mcfg))
    D, H, L = len(slots), mcfg.hidden_size, mcfg.num_hidden_layers
    k = mcfg.num_experts_per_tok if num_experts_per_tok is None else num_experts_per_tok
    validate_k(k, D)
    extra = check_extra_config(extra_config)
    dst = Path(dst)
    # about the MoE's size scaled to the new number of experts (the MLPs dominate)
    require_free_space(dst, int(dir_bytes(moe_dir) * max(1.0, D / num_experts(mcfg))), f"a MoE in {dst.parent}")
    with CheckpointReader(moe_dir) as moe, contextlib.ExitStack() as stack:
        _check_expert_names(moe, arch, L, num_experts(mcfg))
        gate_dtype = moe.dtype(_gate_names(moe, L)[0])
        if gates is None:
            gates = [torch.zeros(D, H, dtype=gate_dtype) for _ in range(L)]
        else:
            gates = [g.to(gate_dtype) for g in validate_gates(gates, L, D, H, "write_moe_experts")]
        new_readers = {s: stack.enter_context(open_dense(s)) for s in slots if isinstance(s, Path)}
        write_safetensors(_plan_moe_edit(moe, arch, L, slots, new_readers, gates), dst, max_shard_size)
    raw = with_v4_keys(read_json(moe_dir / CONFIG_NAME))
    raw.update(extra)
    # the count is saved under the config class's own key (Qwen3-MoE's `num_experts` is stored as
    # `num_local_experts` in transformers 5): update the key(s) present
    keys = [key for key in ("num_local_experts", arch.num_experts_field) if key in raw] or [arch.num_experts_field]
    raw.update({**{key: D for key in keys}, "num_experts_per_tok": k})
    atomic_write_json(dst / CONFIG_NAME, raw)
    copy_tokenizer_files(moe_dir, dst, extra=(GENERATION_CONFIG_NAME,))
    return dst


def extend_moe(moe_dir: str | Path, expert_dirs: Sequence[str | Path], out_dir: str | Path,
               gates: Sequence[torch.Tensor] | None = None, num_experts_per_tok: int | None = None,
               extra_config: dict | None = None, *, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
               overwrite: bool = True) -> Path:
    """The MoE plus the dense experts' MLPs as experts D, D+1, ... (shared tensors kept as they are, not
    re-averaged), written atomically to `out_dir`, streamed tensor by tensor."""
    moe_dir, mcfg, _ = open_moe(moe_dir)
    if not expert_dirs:
        raise DumeError("extend_moe needs at least one new expert")
    for d in expert_dirs:
        check_expert_fits_moe(moe_dir, d)
    out_dir = check_out_dir(out_dir, [moe_dir, *map(Path, expert_dirs)])
    slots = [*range(num_experts(mcfg)), *map(Path, expert_dirs)]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_moe_experts(moe_dir, slots, tmp, gates, num_experts_per_tok, extra_config, max_shard_size=max_shard_size)
    return out_dir


def drop_experts(moe_dir: str | Path, drop: Sequence[int], out_dir: str | Path,
                 gates: Sequence[torch.Tensor] | None = None, num_experts_per_tok: int | None = None,
                 extra_config: dict | None = None, *, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
                 overwrite: bool = True) -> Path:
    """The MoE without the experts `drop` (the others renumbered in order, shared tensors kept), written
    atomically to `out_dir`. Dropping every expert is refused."""
    moe_dir, mcfg, _ = open_moe(moe_dir)
    D = num_experts(mcfg)
    bad = [e for e in drop if not isinstance(e, int) or not 0 <= e < D]
    if bad:
        raise DumeError(f"expert index {bad[0]!r} out of range: the MoE has {D} experts")
    keep = [e for e in range(D) if e not in set(drop)]
    if not keep:
        raise DumeError(f"cannot drop all {D} experts of {moe_dir}: a MoE needs at least one")
    out_dir = check_out_dir(out_dir, [moe_dir])
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_moe_experts(moe_dir, keep, tmp, gates, num_experts_per_tok, extra_config, max_shard_size=max_shard_size)
    return out_dir
