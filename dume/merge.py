"""Merging D dense Llama experts: model averaging, MoErging into Mixtral, oracles.

Everything streams tensor by tensor (mergekit style): all experts are opened lazily,
each output tensor is computed from the D inputs read one at a time (float32
accumulation, cast back to the experts' dtype) and written into a safetensors shard,
so peak memory is about one output shard, not D models. The original code loaded all
experts at once.

A merge is a *plan*: a list of output tensors, each with a recipe (average over
experts, take one expert's tensor, a given constant). Which tensor gets which recipe
and which name comes from the name tables below, not from if-chains over
architectures.

The MoE is written as a standard `MixtralForCausalLM` checkpoint under the names
`save_pretrained` writes in transformers 5 (the legacy per-expert
`block_sparse_moe.experts.E.w{1,2,3}` names, converted to the fused in-memory
`mlp.experts.gate_up_proj` / `down_proj` by `from_pretrained`), so
`AutoModelForCausalLM.from_pretrained` and every tool built on it load it with no custom
code.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from safetensors.torch import save_file

from .checkpoints import (
    CONFIG_NAME,
    MAY_DIFFER_FIELDS,
    MUST_MATCH_FIELDS,
    GENERATION_CONFIG_NAME,
    TOKENIZER_FILES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointReader,
    ExpertSet,
    check_experts,
    load_config,
)
from .errors import DumeError
from .io import atomic_dir, atomic_write_json, is_complete_checkpoint, read_json

# ------------------------------------------------------------------ architecture tables

# The Llama -> Mixtral names used by the MoE-editing functions below (dynamic experts);
# the build path reads every name from the experts' dume.architectures record.
from .architectures import ARCHITECTURES, GATE_NAMES, moe_architecture  # noqa: E402

_LLAMA = ARCHITECTURES["llama"]
LLAMA_MLP = re.compile(_LLAMA.mlp_pattern)
LLAMA_TO_MIXTRAL_EXPERT = dict(_LLAMA.expert_proj)
MIXTRAL_EXPERT_NAME = _LLAMA.expert_name
MIXTRAL_GATE_NAME = _LLAMA.gate_name

# LlamaConfig fields copied verbatim into the MixtralConfig.
LLAMA_TO_MIXTRAL_FIELDS = (
    # Everything experts must share (less the biases Mixtral cannot hold), what may differ
    # (expert 0's value is used), and the training/runtime settings.
    *(f for f in MUST_MATCH_FIELDS if f not in ("attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
                                               "max_window_layers", "layer_types")),
    *MAY_DIFFER_FIELDS,
    "initializer_range",
    "attention_dropout",
    "use_cache",
)
# Output shards: peak memory is about twice one shard (safetensors serialises a shard
# into one buffer), whatever the model size.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
SAFETENSORS_METADATA = {"format": "pt"}


# ------------------------------------------------------------------------ plan/execute


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


def _normalised_weights(weights: Sequence[float] | None, n: int) -> list[float] | None:
    """None (plain mean) or n non-negative weights scaled to sum to 1."""
    if weights is None:
        return None
    w = [float(x) for x in weights]
    if len(w) != n:
        raise DumeError(f"got {len(w)} averaging weights for {n} experts")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise DumeError(f"averaging weights must be finite, non-negative and not all zero: {w}")
    s = sum(w)
    return [x / s for x in w]


def _average(readers: list[CheckpointReader], name: str, weights: list[float] | None, dtype: torch.dtype):
    """Mean (or weighted mean) of one tensor over the experts, reading one at a time."""

    def make() -> torch.Tensor:
        acc: torch.Tensor | None = None
        for i, rd in enumerate(readers):
            t = rd.get(name).to(torch.float32)
            if weights is not None:
                t = t * weights[i]
            acc = t if acc is None else acc.add_(t)
            del t
        if weights is None:
            acc.div_(len(readers))
        return acc.to(dtype)

    return make


def _take(reader: CheckpointReader, name: str, dtype: torch.dtype):
    return lambda: reader.get(name).to(dtype)


def _const(t: torch.Tensor):
    return lambda: t


def _plan_average(es: ExpertSet, readers, weights) -> list[OutTensor]:
    return [
        OutTensor(n, shape, dtype, _average(readers, n, weights, dtype))
        for n, (shape, dtype) in es.tensors.items()
    ]


def _plan_oracle(es: ExpertSet, readers, domain_index: int, weights) -> list[OutTensor]:
    out = []
    for n, (shape, dtype) in es.tensors.items():
        if es.arch.mlp_match(n):
            out.append(OutTensor(n, shape, dtype, _take(readers[domain_index], n, dtype)))
        else:
            out.append(OutTensor(n, shape, dtype, _average(readers, n, weights, dtype)))
    return out


def _check_moe_layout(es: ExpertSet) -> None:
    """Every tensor must have a place in the MoE checkpoint, every layer an MLP."""
    unknown = [n for n in es.tensors if es.arch.kind_of(n) == "unknown"]
    if unknown:
        raise DumeError(
            f"{es.dirs[0]}: tensors with no place in a {es.arch.moe_class} checkpoint: {unknown[:5]}"
            f"{'...' if len(unknown) > 5 else ''} (expected {es.arch.dense_class} tensor names)"
        )
    L = es.config.num_hidden_layers
    for layer in range(L):
        for proj in es.arch.expert_proj:
            n = f"model.layers.{layer}.mlp.{proj}.weight"
            if n not in es.tensors:
                raise DumeError(f"{es.dirs[0]}: missing MLP tensor {n}")


def _plan_moe(es: ExpertSet, readers, gates: list[torch.Tensor], weights) -> list[OutTensor]:
    """Shared tensors averaged; layer l's MLPs become its experts; then its gate."""
    out: list[OutTensor] = []
    mlp_by_layer: dict[int, list[tuple[str, str]]] = {}
    for n, (shape, dtype) in es.tensors.items():
        kind = es.arch.kind_of(n)
        if kind == "shared":
            out.append(OutTensor(n, shape, dtype, _average(readers, n, weights, dtype)))
        elif kind == "mlp":
            m = es.arch.mlp_match(n)
            mlp_by_layer.setdefault(int(m["layer"]), []).append((n, m["proj"]))
    for layer in sorted(mlp_by_layer):
        for e, rd in enumerate(readers):
            for n, proj in sorted(mlp_by_layer[layer], key=lambda x: x[1]):
                shape, dtype = es.tensors[n]
                out.append(OutTensor(es.arch.expert_tensor(layer, e, proj), shape, dtype, _take(rd, n, dtype)))
        g = gates[layer]
        out.append(OutTensor(es.arch.gate_name.format(layer=layer), tuple(g.shape), g.dtype, _const(g)))
    return out


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_safetensors(plan: list[OutTensor], out_dir: Path, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Compute the plan's tensors shard by shard and write them (+ index if sharded).

    Shards are planned from the known shapes first, so the file names are final and
    only one shard's tensors are in memory at a time.
    """
    if max_shard_size <= 0:
        raise DumeError(f"max_shard_size must be positive, got {max_shard_size}")
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    names = _shard_names(len(shards))
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for t in shard:
            v = t.make()
            if tuple(v.shape) != t.shape or v.dtype != t.dtype:
                raise DumeError(f"internal error: {t.name} computed as {tuple(v.shape)} {v.dtype}, planned {t.shape} {t.dtype}")
            tensors[t.name] = v.contiguous()
            weight_map[t.name] = fname
        save_file(tensors, str(out_dir / fname), metadata=dict(SAFETENSORS_METADATA))
        del tensors
    if len(names) > 1:
        total = sum(t.nbytes for t in plan)
        atomic_write_json(out_dir / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


# ------------------------------------------------------------------------- small helpers


def _check_out_dir(out_dir: str | Path, protected: Iterable[Path]) -> Path:
    """Refuse an output directory that would replace (or contain) an input."""
    out = Path(out_dir).resolve()
    for p in protected:
        p = Path(p).resolve()
        if out == p or out in p.parents:
            raise DumeError(f"output directory {out_dir} would overwrite the input checkpoint {p}")
    return Path(out_dir)


def _copy_side_files(es: ExpertSet, dst: Path) -> None:
    """Tokenizer files (from the first expert that has them) and generation config."""
    if es.tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = es.tokenizer_dir / name
            if src.is_file():
                shutil.copy2(src, dst / name)
    for d in es.dirs:
        src = d / GENERATION_CONFIG_NAME
        if src.is_file():
            shutil.copy2(src, dst / GENERATION_CONFIG_NAME)
            break


# Config keys `extra_config` may not set: they describe the weights (or have their own
# argument), so overriding them would make config and tensors disagree.
PROTECTED_CONFIG_KEYS = frozenset(
    (*MUST_MATCH_FIELDS, *LLAMA_TO_MIXTRAL_FIELDS, "model_type", "architectures", "num_local_experts", "num_experts_per_tok")
)


def _apply_extra(config, extra_config: dict | None) -> None:
    """Attach extra attributes (e.g. `dume={...}`); they round-trip through config.json."""
    bad = sorted(set(extra_config or {}) & PROTECTED_CONFIG_KEYS)
    if bad:
        raise DumeError(f"extra_config may not set {bad}: these fields must match the weights")
    for k, v in (extra_config or {}).items():
        setattr(config, k, v)


@contextlib.contextmanager
def _open_all(es: ExpertSet) -> Iterator[list[CheckpointReader]]:
    """All experts opened lazily (headers only) for the duration of a merge."""
    readers = es.readers()
    try:
        yield readers
    finally:
        for rd in readers:
            rd.close()


def _experts_dtype(es: ExpertSet) -> torch.dtype:
    """The experts' storage dtype (of their floating tensors; float32 if none)."""
    dts = [dt for _, dt in es.tensors.values() if dt.is_floating_point]
    return max(set(dts), key=dts.count) if dts else torch.float32


def _validate_gates(gates: Sequence[torch.Tensor], num_layers: int, num_experts: int, hidden: int, where: str) -> list[torch.Tensor]:
    gates = list(gates)
    if len(gates) != num_layers:
        raise DumeError(f"{where}: got {len(gates)} gates for {num_layers} layers")
    out = []
    for layer, g in enumerate(gates):
        if not isinstance(g, torch.Tensor):
            raise DumeError(f"{where}: gate {layer} is a {type(g).__name__}, not a tensor")
        if tuple(g.shape) != (num_experts, hidden):
            raise DumeError(
                f"{where}: gate {layer} has shape {list(g.shape)}, expected [num_experts={num_experts}, hidden={hidden}]"
            )
        if g.is_floating_point() and not torch.isfinite(g).all():
            raise DumeError(f"{where}: gate {layer} has non-finite values")
        out.append(g.detach().to("cpu"))
    return out


def _validate_k(k: int, num_experts: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
        raise DumeError(f"num_experts_per_tok must be an integer in [1, {num_experts}], got {k!r}")
    return k


# ------------------------------------------------------------------------- public API


def moe_config(dense_config, num_experts: int, num_experts_per_tok: int = 1, extra_config: dict | None = None):
    """The MoE config (Mixtral, Qwen3-MoE) whose model computes what the MoErged experts
    compute: every architectural field copied from the dense config (notably
    `rope_parameters`: Mixtral's default rope theta is 1e6, Llama's 1e4), plus the MoE
    fields (`dume.architectures`). `extra_config` entries (e.g. `dume={"domains": [...]}`)
    become config attributes and round-trip through save/load.
    """
    from .architectures import architecture

    _validate_k(num_experts_per_tok, num_experts)
    cfg = architecture(dense_config.model_type).moe_config(dense_config, num_experts, num_experts_per_tok)
    _apply_extra(cfg, extra_config)
    return cfg


def average_experts(
    expert_dirs: Sequence[str | Path],
    out_dir: str | Path,
    weights: Sequence[float] | None = None,
    *,
    extra_config: dict | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = True,
) -> Path:
    """Model averaging: every parameter (MLPs included) averaged into one Llama checkpoint."""
    es = check_experts(expert_dirs)
    w = _normalised_weights(weights, es.num_experts)
    out_dir = _check_out_dir(out_dir, es.dirs)
    config = load_config(es.dirs[0], es.arch.dense_type)
    config.architectures = [es.arch.dense_class]
    _apply_extra(config, extra_config)
    with _open_all(es) as readers, atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(_plan_average(es, readers, w), tmp, max_shard_size)
        config.save_pretrained(str(tmp))
        _copy_side_files(es, tmp)
    return out_dir


def moerge_experts(
    expert_dirs: Sequence[str | Path],
    out_dir: str | Path,
    gates: Sequence[torch.Tensor] | None = None,
    num_experts_per_tok: int = 1,
    extra_config: dict | None = None,
    *,
    weights: Sequence[float] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = True,
) -> Path:
    """MoErging: shared tensors averaged, layer l's D MLPs -> layer l's D experts.

    Expert e of every layer is `expert_dirs[e]`'s MLP. `gates` are the L router weights
    [D, H] (zeros when None: the caller sets them later with `set_gates`). `weights`
    re-weights the averaging of the shared tensors (plain mean by default).
    """
    es = check_experts(expert_dirs, require_mixtral_compatible=True)
    _check_moe_layout(es)
    w = _normalised_weights(weights, es.num_experts)
    cfg = es.config
    D, H, L = es.num_experts, cfg.hidden_size, cfg.num_hidden_layers
    _validate_k(num_experts_per_tok, D)
    dtype = _experts_dtype(es)
    if gates is None:
        gates = [torch.zeros(D, H, dtype=dtype) for _ in range(L)]
    else:
        gates = [g.to(dtype) for g in _validate_gates(gates, L, D, H, "moerge_experts")]
    mcfg = moe_config(load_config(es.dirs[0], es.arch.dense_type), D, num_experts_per_tok, extra_config)
    out_dir = _check_out_dir(out_dir, es.dirs)
    with _open_all(es) as readers, atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(_plan_moe(es, readers, gates, w), tmp, max_shard_size)
        mcfg.save_pretrained(str(tmp))
        _copy_side_files(es, tmp)
    return out_dir


def shared_state_dict(expert_dirs: Sequence[str | Path], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The averaged non-MLP tensors, computed once for building several oracles."""
    es = check_experts(expert_dirs)
    w = _normalised_weights(weights, es.num_experts)
    with _open_all(es) as readers:
        return {
            n: _average(readers, n, w, dtype)()
            for n, (shape, dtype) in es.tensors.items()
            if not es.arch.mlp_match(n)
        }


def oracle_state_dict(
    expert_dirs: Sequence[str | Path],
    domain_index: int,
    weights: Sequence[float] | None = None,
    shared: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Averaged non-MLP tensors + expert `domain_index`'s MLPs, as a Llama state dict.

    This dense model is exactly the MoE with every token routed to that expert, which
    is what DUME's statistics collection forwards domain d's text through. Pass
    `shared` (from `shared_state_dict`) to avoid re-averaging for every domain.
    """
    es = check_experts(expert_dirs)
    if not isinstance(domain_index, int) or not 0 <= domain_index < es.num_experts:
        raise DumeError(f"domain_index must be in [0, {es.num_experts}), got {domain_index!r}")
    if shared is None:
        shared = shared_state_dict(expert_dirs, weights)
    out: dict[str, torch.Tensor] = {}
    with CheckpointReader(es.dirs[domain_index]) as rd:
        for n, (shape, dtype) in es.tensors.items():
            if es.arch.mlp_match(n):
                out[n] = rd.get(n).to(dtype)
            elif n in shared:
                out[n] = shared[n]
            else:
                raise DumeError(f"the shared state dict lacks {n}; was it built from the same experts?")
    return out


def build_oracle_model(
    expert_dirs: Sequence[str | Path],
    domain_index: int,
    weights: Sequence[float] | None = None,
    shared: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
):
    """The oracle for one domain as an in-memory dense model of the experts' class (eval mode)."""
    from .architectures import ARCHITECTURES

    sd = oracle_state_dict(expert_dirs, domain_index, weights, shared)
    config = load_config(Path(expert_dirs[0]), tuple(ARCHITECTURES))
    model_class = ARCHITECTURES[config.model_type].model_class(moe=False)
    if dtype is None:
        dts = [t.dtype for t in sd.values() if t.is_floating_point()]
        dtype = max(set(dts), key=dts.count) if dts else torch.float32
    model = model_class.from_pretrained(None, config=config, state_dict=sd, dtype=dtype)
    return model.eval()


def write_oracle(
    expert_dirs: Sequence[str | Path],
    domain_index: int,
    out_dir: str | Path,
    weights: Sequence[float] | None = None,
    *,
    extra_config: dict | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = True,
) -> Path:
    """The oracle for one domain written as a Llama checkpoint (streamed)."""
    es = check_experts(expert_dirs)
    if not isinstance(domain_index, int) or not 0 <= domain_index < es.num_experts:
        raise DumeError(f"domain_index must be in [0, {es.num_experts}), got {domain_index!r}")
    w = _normalised_weights(weights, es.num_experts)
    out_dir = _check_out_dir(out_dir, es.dirs)
    config = load_config(es.dirs[0], es.arch.dense_type)
    config.architectures = [es.arch.dense_class]
    _apply_extra(config, extra_config)
    with _open_all(es) as readers, atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(_plan_oracle(es, readers, domain_index, w), tmp, max_shard_size)
        config.save_pretrained(str(tmp))
        _copy_side_files(es, tmp)
    return out_dir


# ---------------------------------------------------------------- existing MoE checkpoints


def _check_moe_dir(moe_dir: str | Path):
    moe_dir = Path(moe_dir)
    if not is_complete_checkpoint(moe_dir):
        raise DumeError(f"{moe_dir} is not a complete checkpoint (config.json + safetensors weights)")
    from .architectures import MOE_TYPES

    return moe_dir, load_config(moe_dir, tuple(MOE_TYPES))


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
    """The L router weights [D, H] of a Mixtral checkpoint, without loading the model."""
    moe_dir, cfg = _check_moe_dir(moe_dir)
    with CheckpointReader(moe_dir) as rd:
        return [rd.get(n) for n in _gate_names(rd, cfg.num_hidden_layers)]


def load_moe(moe_dir: str | Path, **kwargs):
    """The MoE class's `from_pretrained(moe_dir, **kwargs)` after checking the dir."""
    moe_dir, cfg = _check_moe_dir(moe_dir)
    return moe_architecture(cfg.model_type).model_class(moe=True).from_pretrained(str(moe_dir), **kwargs)


def _rewrite_file(rd: CheckpointReader, fname: str, replace: dict[str, torch.Tensor], dst: Path) -> None:
    """Write `fname`'s tensors with some replaced to `dst` (one file in memory)."""
    tensors = {n: rd.get(n) for n in rd.keys() if rd.file_of(n) == fname}
    tensors.update(replace)
    meta = rd.metadata(fname)
    meta.update(SAFETENSORS_METADATA)
    save_file(tensors, str(dst), metadata=meta)


def set_gates(
    moe_dir: str | Path,
    gates: Sequence[torch.Tensor],
    out_dir: str | Path | None = None,
    num_experts_per_tok: int | None = None,
) -> Path:
    """Replace the routers (and optionally k) of a Mixtral checkpoint.

    Only the files holding router weights are rewritten, each to a temporary sibling
    renamed into place, so an interrupted call leaves the old file. With `out_dir` the
    checkpoint is copied there (atomically) and `moe_dir` is left untouched. Gates are
    cast to the stored routers' dtype. Shapes ([D, H] per layer, L layers) are checked
    before anything is written.
    """
    moe_dir, cfg = _check_moe_dir(moe_dir)
    D = getattr(cfg, moe_architecture(cfg.model_type).num_experts_field)
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    gates = _validate_gates(gates, L, D, H, f"set_gates({moe_dir})")
    if num_experts_per_tok is not None:
        _validate_k(num_experts_per_tok, D)
    in_place = out_dir is None or Path(out_dir).resolve() == moe_dir.resolve()
    if not in_place:
        out_dir = _check_out_dir(out_dir, [moe_dir])

    rd = CheckpointReader(moe_dir)
    names = _gate_names(rd, L)
    replace_by_file: dict[str, dict[str, torch.Tensor]] = {}
    for n, g in zip(names, gates):
        replace_by_file.setdefault(rd.file_of(n), {})[n] = g.to(rd.dtype(n)).contiguous()
    raw_config = read_json(moe_dir / CONFIG_NAME)
    if num_experts_per_tok is not None:
        raw_config["num_experts_per_tok"] = num_experts_per_tok

    if in_place:
        tmps: list[tuple[Path, Path]] = []
        try:
            for fname, rep in replace_by_file.items():
                final = moe_dir / fname
                tmp = final.with_name(f".{fname}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
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


# ------------------------------------------------------- editing an existing MoE's experts
#
# Adding or removing an expert of a DUME MoE leaves every shared tensor where it is: the
# router is a closed-form function of statistics collected *through* those shared
# weights, so keeping them is what makes the edit exact (docs/design.md §5). An edit is a
# list of expert "slots": an int keeps that expert of the MoE (renumbered by its place
# in the list), a path takes a dense Llama's MLPs as a new expert.

# The Llama MLP projection each saved Mixtral expert matrix comes from.
MIXTRAL_TO_LLAMA_EXPERT = {w: proj for proj, w in LLAMA_TO_MIXTRAL_EXPERT.items()}
LLAMA_MLP_NAME = "model.layers.{layer}.mlp.{proj}.weight"


def llama_config_from_mixtral(mixtral_config):
    """The dense `LlamaConfig` of "shared weights + one expert's MLPs" of a MoErged Mixtral:
    the inverse of `mixtral_config_from_llama` (no biases: a Mixtral has none)."""
    from transformers import LlamaConfig

    kwargs = {f: getattr(mixtral_config, f) for f in LLAMA_TO_MIXTRAL_FIELDS if hasattr(mixtral_config, f)}
    if isinstance(kwargs.get("rope_parameters"), dict):
        kwargs["rope_parameters"] = dict(kwargs["rope_parameters"])
    cfg = LlamaConfig(**kwargs, attention_bias=False, mlp_bias=False)
    dtype = getattr(mixtral_config, "dtype", None)
    if dtype is not None:
        cfg.dtype = dtype
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _moe_expert_names(reader: CheckpointReader, num_layers: int, num_experts: int) -> None:
    """Refuse a Mixtral checkpoint whose experts are not stored one matrix per expert."""
    for layer in range(num_layers):
        for e in range(num_experts):
            for w in MIXTRAL_TO_LLAMA_EXPERT:
                n = MIXTRAL_EXPERT_NAME.format(layer=layer, expert=e, w=w)
                if n not in reader:
                    raise DumeError(
                        f"{reader.path}: missing expert tensor {n} (expected a MixtralForCausalLM checkpoint "
                        "saved with per-expert w1/w2/w3 matrices, as save_pretrained writes)"
                    )


def expert_mlp_state_dict(source: str | Path, expert: int | None = None) -> dict[str, torch.Tensor]:
    """One expert's MLPs under dense Llama names (`model.layers.L.mlp.gate_proj.weight`, ...).

    `source` is a dense Llama checkpoint (expert=None) or a Mixtral checkpoint (expert = the
    slot index). The same names either way, so an expert can be compared, hashed or put
    into a dense model whatever checkpoint it lives in."""
    source = Path(source)
    with CheckpointReader(source) as rd:
        if expert is None:
            cfg = load_config(source, "llama")
            names = {
                LLAMA_MLP_NAME.format(layer=layer, proj=proj): LLAMA_MLP_NAME.format(layer=layer, proj=proj)
                for layer in range(cfg.num_hidden_layers)
                for proj in LLAMA_TO_MIXTRAL_EXPERT
            }
        else:
            cfg = load_config(source, "mixtral")
            if not isinstance(expert, int) or not 0 <= expert < cfg.num_local_experts:
                raise DumeError(f"{source}: expert must be in [0, {cfg.num_local_experts}), got {expert!r}")
            _moe_expert_names(rd, cfg.num_hidden_layers, cfg.num_local_experts)
            names = {
                LLAMA_MLP_NAME.format(layer=layer, proj=proj):
                    MIXTRAL_EXPERT_NAME.format(layer=layer, expert=expert, w=w)
                for layer in range(cfg.num_hidden_layers)
                for proj, w in LLAMA_TO_MIXTRAL_EXPERT.items()
            }
        missing = [src for src in names.values() if src not in rd]
        if missing:
            raise DumeError(f"{source}: missing MLP tensor {missing[0]}")
        return {dst: rd.get(src) for dst, src in names.items()}


def moe_shared_state_dict(moe_dir: str | Path) -> dict[str, torch.Tensor]:
    """A Mixtral checkpoint's shared tensors (everything but experts and routers)."""
    from .checkpoints import is_routed

    moe_dir, _ = _check_moe_dir(moe_dir)
    with CheckpointReader(moe_dir) as rd:
        return {n: rd.get(n) for n in rd.keys() if not is_routed(n)}


def build_dense_from_moe(moe_dir: str | Path, expert: int | str | Path, shared: dict[str, torch.Tensor] | None = None):
    """The MoE with every token routed to one expert, as an in-memory dense Llama (eval mode).

    `expert` is a slot of the MoE (int) or a dense Llama checkpoint whose MLPs stand in for
    a new expert. This is the model DUME's statistics of that domain are collected through;
    it needs the MoE only (plus the new expert's checkpoint), not the experts it was built
    from. Pass `shared` (from `moe_shared_state_dict`) to read the shared tensors once."""
    from transformers import LlamaForCausalLM

    moe_dir, mcfg = _check_moe_dir(moe_dir)
    if shared is None:
        shared = moe_shared_state_dict(moe_dir)
    if isinstance(expert, int):
        mlp = expert_mlp_state_dict(moe_dir, expert)
    else:
        mlp = expert_mlp_state_dict(expert, None)
    cfg = llama_config_from_mixtral(mcfg)
    dtypes = [t.dtype for t in shared.values() if t.is_floating_point()]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    sd = {**shared, **{n: t.to(dtype) for n, t in mlp.items()}}
    return LlamaForCausalLM.from_pretrained(None, config=cfg, state_dict=sd, dtype=dtype).eval()


def check_expert_fits_moe(moe_dir: str | Path, expert_dir: str | Path) -> list[str]:
    """Refuse a dense Llama that cannot become one more expert of this MoE; return notes.

    `check_experts` compares Llama checkpoints with each other; here one side is a Mixtral,
    so the architecture fields both configs share are compared, then the tokenizers, then
    the MLP tensors' shapes (headers only). Every error names the field and both values."""
    from .checkpoints import _canonical, tokenizer_fingerprints

    moe_dir, mcfg = _check_moe_dir(moe_dir)
    expert_dir = Path(expert_dir)
    if not is_complete_checkpoint(expert_dir):
        raise DumeError(f"new expert {expert_dir}: not a complete checkpoint (config.json + safetensors weights)")
    try:
        lcfg = load_config(expert_dir, "llama")
    except DumeError as e:
        raise DumeError(f"new expert: {e}") from e
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(lcfg, flag, False):
            raise DumeError(f"new expert {expert_dir}: {flag}=True, which a Mixtral expert cannot hold")
    for f in MUST_MATCH_FIELDS:
        if f not in LLAMA_TO_MIXTRAL_FIELDS:
            continue
        a, b = _canonical(getattr(mcfg, f, None)), _canonical(getattr(lcfg, f, None))
        if a != b:
            raise DumeError(f"new expert {expert_dir} differs from the MoE {moe_dir} in {f}: {b!r} != {a!r}")
    notes = []
    fa, fb = tokenizer_fingerprints(moe_dir), tokenizer_fingerprints(expert_dir)
    common = [k for k in fa if k in fb]
    if not fa or not fb:
        notes.append(f"{moe_dir if not fa else expert_dir} has no tokenizer files; the tokenizers are assumed to match")
    elif not common:
        raise DumeError(
            f"new expert {expert_dir}: its tokenizer files ({', '.join(fb)}) cannot be compared with the MoE's "
            f"({', '.join(fa)}); save both tokenizers the same way"
        )
    elif fa[common[0]] != fb[common[0]]:
        raise DumeError(
            f"new expert {expert_dir} has a different tokenizer than the MoE {moe_dir} "
            f"({common[0]} fingerprint {fb[common[0]][:16]} != {fa[common[0]][:16]})"
        )
    with CheckpointReader(moe_dir) as moe, CheckpointReader(expert_dir) as rd:
        for layer in range(mcfg.num_hidden_layers):
            for proj, w in LLAMA_TO_MIXTRAL_EXPERT.items():
                n = LLAMA_MLP_NAME.format(layer=layer, proj=proj)
                ref = MIXTRAL_EXPERT_NAME.format(layer=layer, expert=0, w=w)
                if n not in rd:
                    raise DumeError(f"new expert {expert_dir}: missing MLP tensor {n}")
                if ref in moe and rd.shape(n) != moe.shape(ref):
                    raise DumeError(
                        f"new expert {expert_dir}: tensor {n} has shape {list(rd.shape(n))}, "
                        f"the MoE's experts {list(moe.shape(ref))}"
                    )
    return notes


def _check_slots(slots: Sequence, num_experts: int) -> list:
    slots = list(slots)
    if not slots:
        raise DumeError("a MoE needs at least one expert; refusing to write one with none")
    kept = [s for s in slots if isinstance(s, int) and not isinstance(s, bool)]
    bad = [s for s in kept if not 0 <= s < num_experts]
    if bad:
        raise DumeError(f"expert index {bad[0]} out of range: the MoE has {num_experts} experts")
    if len(set(kept)) != len(kept):
        raise DumeError(f"expert slots {kept} name an expert twice")
    return [s if isinstance(s, int) and not isinstance(s, bool) else Path(s) for s in slots]


def _plan_moe_edit(
    moe: CheckpointReader, mcfg, slots: list, new_readers: dict, gates: list[torch.Tensor]
) -> list[OutTensor]:
    """Shared tensors copied; layer l's experts taken slot by slot; then its new gate."""
    from .checkpoints import is_routed

    L, D = mcfg.num_hidden_layers, mcfg.num_local_experts
    gate_names = set(_gate_names(moe, L))
    expert_names = {MIXTRAL_EXPERT_NAME.format(layer=layer, expert=e, w=w)
                    for layer in range(L) for e in range(D) for w in MIXTRAL_TO_LLAMA_EXPERT}
    out: list[OutTensor] = []
    for n in moe.keys():
        if not is_routed(n):
            out.append(OutTensor(n, moe.shape(n), moe.dtype(n), _take(moe, n, moe.dtype(n))))
        elif n not in gate_names and n not in expert_names:
            raise DumeError(f"{moe.path}: tensor {n} is neither shared, an expert nor a router; cannot edit this MoE")
    for layer in range(L):
        for new_e, slot in enumerate(slots):
            for w, proj in sorted(MIXTRAL_TO_LLAMA_EXPERT.items()):
                ref = MIXTRAL_EXPERT_NAME.format(layer=layer, expert=0, w=w)
                shape, dtype = moe.shape(ref), moe.dtype(ref)
                name = MIXTRAL_EXPERT_NAME.format(layer=layer, expert=new_e, w=w)
                if isinstance(slot, int):
                    src = MIXTRAL_EXPERT_NAME.format(layer=layer, expert=slot, w=w)
                    out.append(OutTensor(name, shape, dtype, _take(moe, src, dtype)))
                else:
                    src = LLAMA_MLP_NAME.format(layer=layer, proj=proj)
                    out.append(OutTensor(name, shape, dtype, _take(new_readers[slot], src, dtype)))
        g = gates[layer]
        out.append(OutTensor(MIXTRAL_GATE_NAME.format(layer=layer), tuple(g.shape), g.dtype, _const(g)))
    return out


def write_moe_experts(
    moe_dir: str | Path,
    slots: Sequence,
    dst: str | Path,
    gates: Sequence[torch.Tensor] | None = None,
    num_experts_per_tok: int | None = None,
    extra_config: dict | None = None,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a Mixtral checkpoint into the existing directory `dst` whose experts are `slots`.

    An int slot keeps that expert of `moe_dir`; a path takes that dense Llama's MLPs (check
    it first with `check_expert_fits_moe`). Shared tensors are copied bit for bit, gates
    are `gates` (zeros if None, cast to the stored routers' dtype), config.json is the
    MoE's with `num_local_experts`, k and `extra_config` updated. Not atomic by itself:
    `extend_moe` / `drop_experts`, or a caller writing more files beside it, wrap it in
    `atomic_dir`."""
    moe_dir, mcfg = _check_moe_dir(moe_dir)
    slots = _check_slots(slots, mcfg.num_local_experts)
    D, H, L = len(slots), mcfg.hidden_size, mcfg.num_hidden_layers
    k = mcfg.num_experts_per_tok if num_experts_per_tok is None else num_experts_per_tok
    _validate_k(k, D)
    bad = sorted(set(extra_config or {}) & PROTECTED_CONFIG_KEYS)
    if bad:
        raise DumeError(f"extra_config may not set {bad}: these fields must match the weights")
    dst = Path(dst)
    with CheckpointReader(moe_dir) as moe, contextlib.ExitStack() as stack:
        _moe_expert_names(moe, L, mcfg.num_local_experts)
        gate_dtype = moe.dtype(_gate_names(moe, L)[0])
        if gates is None:
            gates = [torch.zeros(D, H, dtype=gate_dtype) for _ in range(L)]
        else:
            gates = [g.to(gate_dtype) for g in _validate_gates(gates, L, D, H, "write_moe_experts")]
        new_readers = {s: stack.enter_context(CheckpointReader(s)) for s in slots if isinstance(s, Path)}
        write_safetensors(_plan_moe_edit(moe, mcfg, slots, new_readers, gates), dst, max_shard_size)
    raw = read_json(moe_dir / CONFIG_NAME)
    raw.update(extra_config or {})
    raw.update(num_local_experts=D, num_experts_per_tok=k)
    atomic_write_json(dst / CONFIG_NAME, raw)
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG_NAME):
        if (moe_dir / name).is_file():
            shutil.copy2(moe_dir / name, dst / name)
    return dst


def extend_moe(
    moe_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    out_dir: str | Path,
    gates: Sequence[torch.Tensor] | None = None,
    num_experts_per_tok: int | None = None,
    extra_config: dict | None = None,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = True,
) -> Path:
    """The MoE plus the dense experts' MLPs as experts D, D+1, ... (shared tensors kept as
    they are, not re-averaged), written atomically to `out_dir`, streamed tensor by tensor."""
    moe_dir, mcfg = _check_moe_dir(moe_dir)
    if not expert_dirs:
        raise DumeError("extend_moe needs at least one new expert")
    for d in expert_dirs:
        check_expert_fits_moe(moe_dir, d)
    out_dir = _check_out_dir(out_dir, [moe_dir, *map(Path, expert_dirs)])
    slots = [*range(mcfg.num_local_experts), *map(Path, expert_dirs)]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_moe_experts(moe_dir, slots, tmp, gates, num_experts_per_tok, extra_config, max_shard_size=max_shard_size)
    return out_dir


def drop_experts(
    moe_dir: str | Path,
    drop: Sequence[int],
    out_dir: str | Path,
    gates: Sequence[torch.Tensor] | None = None,
    num_experts_per_tok: int | None = None,
    extra_config: dict | None = None,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = True,
) -> Path:
    """The MoE without the experts `drop` (the others renumbered in order, shared tensors
    kept), written atomically to `out_dir`. Dropping every expert is refused."""
    moe_dir, mcfg = _check_moe_dir(moe_dir)
    D = mcfg.num_local_experts
    bad = [e for e in drop if not isinstance(e, int) or not 0 <= e < D]
    if bad:
        raise DumeError(f"expert index {bad[0]!r} out of range: the MoE has {D} experts")
    keep = [e for e in range(D) if e not in set(drop)]
    if not keep:
        raise DumeError(f"cannot drop all {D} experts of {moe_dir}: a MoE needs at least one")
    out_dir = _check_out_dir(out_dir, [moe_dir])
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_moe_experts(moe_dir, keep, tmp, gates, num_experts_per_tok, extra_config, max_shard_size=max_shard_size)
    return out_dir
