"""Building checkpoints from D dense experts: model averaging, MoErging, oracles (docs/design.md §1, §6).

Everything streams tensor by tensor (mergekit style): the experts are opened lazily and each output tensor is
computed from the D inputs read one at a time (float32 accumulation for averages, cast back to the experts'
dtype), then written and dropped (`dume.checkpoint.shards`).

A merge is a plan of output tensors (`dume.checkpoint.shards.OutTensor`); which tensor is averaged, taken from one
expert or set to a router, and under which name, comes from the experts' architecture record (`dume.arch.table`).
The MoE has the names its class's `save_pretrained` writes, so `AutoModelForCausalLM` loads it with no custom code.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from transformers.utils import GENERATION_CONFIG_NAME

from dume.arch.table import ARCHITECTURES, MAY_DIFFER_FIELDS, MUST_MATCH_FIELDS, RUNTIME_FIELDS, architecture
from dume.checkpoint.config_files import make_config_portable
from dume.checkpoint.experts import ExpertSet, check_experts
from dume.checkpoint.io import atomic_dir
from dume.checkpoint.outputs import check_output_path, require_free_space
from dume.checkpoint.reader import CheckpointReader, load_config, majority_dtype
from dume.checkpoint.shards import DEFAULT_MAX_SHARD_BYTES, OutTensor, const, take, write_safetensors
from dume.checkpoint.tokenizer_files import copy_tokenizer_files
from dume.errors import DumeError


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


def _plan_average(es: ExpertSet, readers, weights) -> list[OutTensor]:
    return [OutTensor(n, shape, dtype, _average(readers, n, weights, dtype))
            for n, (shape, dtype) in es.tensors.items()]


def _plan_oracle(es: ExpertSet, readers, domain_index: int, weights) -> list[OutTensor]:
    out = []
    for n, (shape, dtype) in es.tensors.items():
        if es.arch.mlp_match(n):
            out.append(OutTensor(n, shape, dtype, take(readers[domain_index], n, dtype)))
        else:
            out.append(OutTensor(n, shape, dtype, _average(readers, n, weights, dtype)))
    return out


def _check_moe_layout(es: ExpertSet) -> None:
    """Every tensor must have a place in the MoE checkpoint, every layer an MLP."""
    unknown = [n for n in es.tensors if es.arch.kind_of(n) == "unknown"]
    if unknown:
        raise DumeError(f"{es.dirs[0]}: tensors with no place in a {es.arch.moe_class} checkpoint: {unknown[:5]}"
                        f"{'...' if len(unknown) > 5 else ''} (expected {es.arch.dense_class} tensor names)")
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
                out.append(OutTensor(es.arch.expert_tensor(layer, e, proj), shape, dtype, take(rd, n, dtype)))
        g = gates[layer]
        out.append(OutTensor(es.arch.gate_name.format(layer=layer), tuple(g.shape), g.dtype, const(g)))
    return out


def check_out_dir(out_dir: str | Path, protected: Iterable[Path]) -> Path:
    """Refuse an output directory that is, contains or lies inside an input checkpoint."""
    return check_output_path(out_dir, protected, "output directory")


def moe_size_bytes(es: ExpertSet) -> int:
    """Bytes of the MoE these experts make: shared tensors once, MLP tensors once per expert, plus the routers
    (for the free-space check before writing it)."""
    copies = {"mlp": es.num_experts, "shared": 1}  # routers are added below, unknown tensors are not written
    total = sum(math.prod(shape) * dtype.itemsize * copies.get(es.arch.kind_of(name), 0)
                for name, (shape, dtype) in es.tensors.items())
    cfg = es.config
    return total + cfg.num_hidden_layers * es.num_experts * cfg.hidden_size * 4


def _copy_side_files(es: ExpertSet, dst: Path) -> None:
    """Tokenizer files (from the first expert that has them, named so transformers 4.x reads them too) and
    generation config."""
    if es.tokenizer_dir is not None:
        copy_tokenizer_files(es.tokenizer_dir, dst)
    for d in es.dirs:
        src = d / GENERATION_CONFIG_NAME
        if src.is_file():
            shutil.copy2(src, dst / GENERATION_CONFIG_NAME)
            break


# Config keys `extra_config` may not set: they describe the weights (or have their own argument), so overriding
# them would make config and tensors disagree.
PROTECTED_CONFIG_KEYS = frozenset((*MUST_MATCH_FIELDS, *MAY_DIFFER_FIELDS, *RUNTIME_FIELDS, "model_type",
                                   "architectures", "num_local_experts", "num_experts", "num_experts_per_tok"))


def check_extra_config(extra_config: dict | None) -> dict:
    bad = sorted(set(extra_config or {}) & PROTECTED_CONFIG_KEYS)
    if bad:
        raise DumeError(f"extra_config may not set {bad}: these fields must match the weights")
    return dict(extra_config or {})


def _apply_extra(config, extra_config: dict | None) -> None:
    """Attach extra attributes (e.g. `dume={...}`); they round-trip through config.json."""
    for k, v in check_extra_config(extra_config).items():
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


def _dense_config(es: ExpertSet, extra_config: dict | None):
    """Expert 0's config, for a dense checkpoint made from the experts (average, oracle)."""
    config = load_config(es.dirs[0], es.arch.dense_type)
    config.architectures = [es.arch.dense_class]
    _apply_extra(config, extra_config)
    return config


def _write(es: ExpertSet, out_dir: Path, plan, config, max_shard_size, overwrite: bool) -> Path:
    """Stream `plan(readers)` into `out_dir` atomically, with `config` and the side files."""
    with _open_all(es) as readers, atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(plan(readers), tmp, max_shard_size)
        config.save_pretrained(str(tmp))
        make_config_portable(tmp)
        _copy_side_files(es, tmp)
    return out_dir


def _check_domain_index(es: ExpertSet, domain_index: int) -> None:
    if not isinstance(domain_index, int) or not 0 <= domain_index < es.num_experts:
        raise DumeError(f"domain_index must be in [0, {es.num_experts}), got {domain_index!r}")


def validate_gates(gates: Sequence[torch.Tensor], num_layers: int, num_experts: int, hidden: int, where: str) -> list[torch.Tensor]:
    gates = list(gates)
    if len(gates) != num_layers:
        raise DumeError(f"{where}: got {len(gates)} gates for {num_layers} layers")
    out = []
    for layer, g in enumerate(gates):
        if not isinstance(g, torch.Tensor):
            raise DumeError(f"{where}: gate {layer} is a {type(g).__name__}, not a tensor")
        if tuple(g.shape) != (num_experts, hidden):
            raise DumeError(f"{where}: gate {layer} has shape {list(g.shape)}, "
                            f"expected [num_experts={num_experts}, hidden={hidden}]")
        if g.is_floating_point() and not torch.isfinite(g).all():
            raise DumeError(f"{where}: gate {layer} has non-finite values")
        out.append(g.detach().to("cpu"))
    return out


def validate_k(k: int, num_experts: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
        raise DumeError(f"num_experts_per_tok must be an integer in [1, {num_experts}], got {k!r}")
    return k


def moe_config(dense_config, num_experts: int, num_experts_per_tok: int = 1, extra_config: dict | None = None):
    """The MoE config whose model computes what the MoErged experts compute (`Architecture.moe_config`): every
    architectural field copied (notably `rope_parameters`: Mixtral's default rope theta is 1e6, Llama's 1e4), plus
    the MoE fields. `extra_config` entries become config attributes and round-trip through save/load."""
    validate_k(num_experts_per_tok, num_experts)
    cfg = architecture(dense_config.model_type).moe_config(dense_config, num_experts, num_experts_per_tok)
    _apply_extra(cfg, extra_config)
    return cfg


def average_experts(expert_dirs: Sequence[str | Path], out_dir: str | Path, weights: Sequence[float] | None = None, *,
                    extra_config: dict | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
                    overwrite: bool = True) -> Path:
    """Model averaging: every parameter (MLPs included) averaged into one Llama checkpoint."""
    es = check_experts(expert_dirs)
    w = _normalised_weights(weights, es.num_experts)
    out_dir = check_out_dir(out_dir, es.dirs)
    return _write(es, out_dir, lambda readers: _plan_average(es, readers, w), _dense_config(es, extra_config),
                  max_shard_size, overwrite)


def moerge_experts(expert_dirs: Sequence[str | Path], out_dir: str | Path, gates: Sequence[torch.Tensor] | None = None,
                   num_experts_per_tok: int = 1, extra_config: dict | None = None, *,
                   weights: Sequence[float] | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
                   overwrite: bool = True) -> Path:
    """MoErging: shared tensors averaged, layer l's D MLPs -> layer l's D experts.

    Expert e of every layer is `expert_dirs[e]`'s MLP. `gates` are the L router weights [D, H] (zeros when None:
    the caller sets them later with `set_gates`). `weights` re-weights the averaging of the shared tensors."""
    es = check_experts(expert_dirs, require_moe_compatible=True).split_fused()
    _check_moe_layout(es)
    w = _normalised_weights(weights, es.num_experts)
    cfg = es.config
    D, H, L = es.num_experts, cfg.hidden_size, cfg.num_hidden_layers
    validate_k(num_experts_per_tok, D)
    dtype = es.stored_dtype
    if gates is None:
        gates = [torch.zeros(D, H, dtype=dtype) for _ in range(L)]
    else:
        gates = [g.to(dtype) for g in validate_gates(gates, L, D, H, "moerge_experts")]
    mcfg = moe_config(load_config(es.dirs[0], es.arch.dense_type), D, num_experts_per_tok, extra_config)
    out_dir = check_out_dir(out_dir, es.dirs)
    require_free_space(out_dir.parent, moe_size_bytes(es), f"the MoE {out_dir}")
    return _write(es, out_dir, lambda readers: _plan_moe(es, readers, gates, w), mcfg, max_shard_size, overwrite)


def shared_state_dict(expert_dirs: Sequence[str | Path], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The averaged non-MLP tensors, computed once for building several oracles."""
    es = check_experts(expert_dirs)
    w = _normalised_weights(weights, es.num_experts)
    with _open_all(es) as readers:
        return {n: _average(readers, n, w, dtype)() for n, (shape, dtype) in es.tensors.items()
                if not es.arch.mlp_match(n)}


def oracle_state_dict(expert_dirs: Sequence[str | Path], domain_index: int, weights: Sequence[float] | None = None,
                      shared: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Averaged non-MLP tensors + expert `domain_index`'s MLPs, as a Llama state dict.

    This dense model is exactly the MoE with every token routed to that expert, which is what DUME's statistics
    collection forwards domain d's text through. Pass `shared` (from `shared_state_dict`) to average only once."""
    es = check_experts(expert_dirs)
    _check_domain_index(es, domain_index)
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


def build_oracle_model(expert_dirs: Sequence[str | Path], domain_index: int, weights: Sequence[float] | None = None,
                       shared: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None):
    """The oracle for one domain as an in-memory dense model of the experts' class (eval mode)."""
    sd = oracle_state_dict(expert_dirs, domain_index, weights, shared)
    config = load_config(Path(expert_dirs[0]), tuple(ARCHITECTURES))
    model_class = architecture(config.model_type).model_class(moe=False)
    if dtype is None:
        dtype = majority_dtype(t.dtype for t in sd.values())
    model = model_class.from_pretrained(None, config=config, state_dict=sd, dtype=dtype)
    return model.eval()


def write_oracle(expert_dirs: Sequence[str | Path], domain_index: int, out_dir: str | Path,
                 weights: Sequence[float] | None = None, *, extra_config: dict | None = None,
                 max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = True) -> Path:
    """The oracle for one domain written as a Llama checkpoint (streamed)."""
    es = check_experts(expert_dirs)
    _check_domain_index(es, domain_index)
    w = _normalised_weights(weights, es.num_experts)
    out_dir = check_out_dir(out_dir, es.dirs)
    return _write(es, out_dir, lambda readers: _plan_oracle(es, readers, domain_index, w),
                  _dense_config(es, extra_config), max_shard_size, overwrite)


