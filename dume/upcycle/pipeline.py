"""The one pipeline that builds a routed checkpoint from dense experts.

Every recipe that makes a MoE with routers comes here (`dume build`, the CLM strategies script for Table 2, the
reasoning strategies for Table 3), so a change to the build (devices, memory, multi-process safety) is made once:

    statistics (given, or collected by the strategy's collector, `dume.stats.collectors`)
    -> the strategy's initial gates (`dume.routers.registry`)
    -> the MoE written once with them: MoErged, or copied from the shared zero-gate MoE (`shared_zero_gate_base`)
    -> the context-routed class, if the strategy routes by context
    -> router training (BTX, DUME+), the trained gates written back
    -> the statistics (`dume_stats/`) and the router recipe (`dume_router.json`).

`build_routed` writes into `out` in place: callers wrap it in `dume.checkpoint.io.atomic_dir` (and hold
`dume.checkpoint.outputs.output_lock`), so a run killed halfway leaves the previous model as it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from dume.checkpoint.shards import DEFAULT_MAX_SHARD_BYTES
from dume.errors import DumeError
from dume.stats.ridge import STATS_SUBDIR


@dataclass(frozen=True)
class RouterSettings:
    """What the gates depend on besides the statistics."""

    k: int = 1
    lam: float = 0.01
    temperature: float = 1.0
    relative_lambda: bool = False
    seed: int = 0
    num_dume_tokens: int | None = None


@dataclass
class Collection:
    """How to collect the statistics when they are not given: each domain's documents (any iterable of texts,
    read once) through the strategy's collector."""

    docs: Mapping[str, Iterable[str]]
    tokenizer: Any
    max_len: int
    batch_size: int
    device: str = "cpu"
    dtype: Any = None
    data_source: str = ""
    extra_meta: dict | None = None
    max_batches: int | None = None
    model_fingerprint: str | None = None
    log: Callable = print


@dataclass
class RouterTraining:
    """BTX / DUME+: the gates trained on mixed text (`dume.routers.training`)."""

    train_data: Any
    val_data: Any
    config: Any  # dume.train.loop.TrainConfig
    alpha: float = 0.0
    desc: str = "routers"


@dataclass
class Built:
    path: Path
    stats: Any = None               # RidgeStats, when the strategy has statistics
    counts: dict | None = None      # {domain: tokens per layer}, when collected here
    history: dict | None = None     # router training's history
    recipe: dict = field(default_factory=dict)


def strategy_for_build(name: str):
    """The registry's entry, checked to be a routed strategy this pipeline can build."""
    from dume.routers.registry import get

    entry = get(name)
    if not entry.routed:
        raise DumeError(f"{name} is not a routed MoE (the oracle is one dense model per domain: dume.moe.merge)")
    return entry


def collect_statistics_for(strategy: str, expert_dirs, domains, collection: Collection, settings: RouterSettings,
                           moe_dir=None):
    """The (RidgeStats, counts) `strategy` needs, from its collector (`statistics=` in the registry). Sequential
    statistics are collected through the MoE at `moe_dir`, earlier layers routed by DUME's gates (λ, T)."""
    from dume.routers.closed_form import layer_solver
    from dume.stats.collectors import collect_for

    entry = strategy_for_build(strategy)
    sequential = entry.statistics == "sequential"
    return collect_for(
        entry.statistics, list(expert_dirs), list(domains), collection.docs, collection.tokenizer, moe_dir=moe_dir,
        k=settings.k, solve_layer=layer_solver(settings.lam, settings.temperature, settings.relative_lambda)
        if sequential else None, num_dume_tokens=settings.num_dume_tokens, max_len=collection.max_len,
        batch_size=collection.batch_size, device=collection.device, dtype=collection.dtype,
        model_fingerprint=collection.model_fingerprint, data_source=collection.data_source,
        extra_meta=collection.extra_meta, max_batches=collection.max_batches, log=collection.log)


@contextlib.contextmanager
def shared_zero_gate_base(expert_dirs, base_dir, made_from: dict, *, redo: bool = False,
                          extra_config: dict | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES):
    """The MoErged experts with zero gates at `base_dir`, built once per expert set and reused by every strategy
    (rebuilt when `made_from` -- the experts' content fingerprints, the domains -- differs from what it was built
    from). Read under a shared lock, so strategies built in parallel use it together; checked again and rebuilt
    under the exclusive lock only when it is missing or stale, and a rebuild waits for every reader."""
    from dume.checkpoint.fingerprint import built_from
    from dume.checkpoint.outputs import output_lock, reading_lock, share_lock
    from dume.moe.merge import moerge_experts

    base_dir = Path(base_dir)
    if not redo:
        with reading_lock(base_dir):
            if built_from(base_dir, made_from):
                yield base_dir
                return
    with output_lock(base_dir, wait=True):
        if redo or not built_from(base_dir, made_from):
            moerge_experts(list(expert_dirs), base_dir, gates=None, num_experts_per_tok=1,
                           extra_config={**made_from, **(extra_config or {})}, max_shard_size=max_shard_size)
        share_lock(base_dir)
        yield base_dir


def build_routed(strategy: str, expert_dirs, domains, out, *, settings: RouterSettings, stats=None,
                 collection: Collection | None = None, base_dir=None, training: RouterTraining | None = None,
                 gate_inputs: Mapping[str, Any] | None = None, extra_config: dict | None = None,
                 max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, recipe: Mapping[str, Any] | None = None,
                 expert_set=None) -> Built:
    """`strategy`'s routed checkpoint of `expert_dirs` (expert j = `domains[j]`) in `out`.

    `stats`: the statistics when the caller has them (a cache); else `collection` says how to collect them.
    `base_dir`: a zero-gate MoE of these experts to copy the weights from (`shared_zero_gate_base`); without it
    the experts are MoErged straight into `out` with their gates, one streamed pass -- except for layer-sequential
    statistics, collected through the MoE itself, so it is written with zero routers first. `training`: router
    training's data and settings (required when the strategy trains). `gate_inputs`: extra `GateContext` fields
    (a prompt gate's base model, tokenizer, prompts). `recipe`: entries added to (or replacing) the recipe."""
    from dume.checkpoint.experts import check_experts, shared_weights_fingerprint
    from dume.moe.edit import set_gates
    from dume.moe.merge import moerge_experts
    from dume.moe.recipe import write_recipe
    from dume.routers.registry import GateContext, make_gates
    from dume.runtime.memory import release_memory

    entry = strategy_for_build(strategy)
    dirs, domains, out = list(expert_dirs), list(domains), Path(out)
    if len(dirs) != len(domains):
        raise DumeError(f"{len(dirs)} experts for {len(domains)} domains")
    if entry.trains_router and training is None:
        raise DumeError(f"{strategy} trains its routers: give the training data and settings (RouterTraining)")
    if entry.needs_statistics and stats is None and collection is None:
        raise DumeError(f"{strategy} needs DUME statistics: give them, or the documents to collect them from")
    if stats is not None and list(stats.domains) != domains:
        raise DumeError(f"the statistics are for domains {list(stats.domains)}, the MoE's experts are {domains}")
    es = expert_set or check_experts(dirs)
    cfg = es.config
    context = GateContext(num_layers=cfg.num_hidden_layers, num_experts=len(dirs), hidden_size=cfg.hidden_size,
                          lam=settings.lam, temperature=settings.temperature,
                          relative_lambda=settings.relative_lambda, seed=settings.seed, expert_dirs=tuple(dirs),
                          **dict(gate_inputs or {}))
    k = settings.k
    counts = None
    collect_here = entry.needs_statistics and stats is None
    if collect_here and entry.statistics == "sequential" and base_dir is None:
        # collected through the MoE itself: write it with zero routers, then set them
        moerge_experts(dirs, out, gates=None, num_experts_per_tok=k, extra_config=extra_config,
                       max_shard_size=max_shard_size, overwrite=True)
        stats, counts = collect_statistics_for(strategy, dirs, domains, collection, settings, moe_dir=out)
        set_gates(out, make_gates(strategy, stats, context))
    else:
        if collect_here:
            stats, counts = collect_statistics_for(strategy, dirs, domains, collection, settings, moe_dir=base_dir)
        gates = make_gates(strategy, stats if entry.needs_statistics else None, context)
        if base_dir is not None:
            set_gates(base_dir, gates, out_dir=out, num_experts_per_tok=k)
        else:
            moerge_experts(dirs, out, gates=gates, num_experts_per_tok=k, extra_config=extra_config,
                           max_shard_size=max_shard_size, overwrite=True)
    if entry.context_routing:
        from dume.moe.context_moe import make_context_moe

        make_context_moe(out)
    history = train_gates(out, training, k) if entry.trains_router else None
    if stats is not None and entry.needs_statistics:
        if base_dir is None and collect_here:
            stats.model_fingerprint = shared_weights_fingerprint(out)  # the sums belong to this MoE's shared weights
        stats.save(out / STATS_SUBDIR)
    full_recipe = {"method": strategy, "domains": domains, "experts": [str(d) for d in dirs],
                   "lambda": settings.lam, "relative_lambda": settings.relative_lambda,
                   "temperature": settings.temperature, "k": k,
                   # tokens per document of the statistics: the settings', else those the given sums counted
                   "num_dume_tokens": settings.num_dume_tokens if settings.num_dume_tokens is not None or stats is None
                   else stats.num_dume_tokens,
                   "trained_steps": training.config.steps if entry.trains_router else 0, **dict(recipe or {})}
    write_recipe(out, full_recipe)
    release_memory()
    return Built(out, stats if entry.needs_statistics else None, counts, history, full_recipe)


def train_gates(moe_dir, training: RouterTraining, k: int) -> dict:
    """Train the routers of the MoE at `moe_dir` and write the trained gates back in place (in the checkpoint's
    dtype). The model is loaded in float32 whatever the checkpoint stores: float32 master weights, so that small
    updates are not rounded away (`TrainConfig.param_dtype` = bfloat16, `--pure-bf16`, casts it for the
    original's pure-bf16 training). It is dropped before returning, so its memory is free for what comes next."""
    import gc

    import torch

    from dume.moe.edit import load_moe, set_gates
    from dume.routers.training import train_routers

    model = load_moe(moe_dir, dtype=torch.float32)
    model, history = train_routers(model, training.train_data, training.val_data, training.config,
                                   alpha=training.alpha, desc=training.desc)
    trained = [layer.mlp.gate.weight.detach().float().cpu().clone() for layer in model.model.layers]
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    set_gates(moe_dir, trained, num_experts_per_tok=k)
    return history


def build_moe(expert_dirs, domains, docs, out, tokenizer, *, strategy: str = "DUME", k: int = 1, lam: float = 0.01,
              temperature: float = 1.0, num_dume_tokens: int | None = None, max_len: int = 1024,
              batch_size: int = 8, device: str = "cpu", dtype=None, seed: int = 0, relative_lambda: bool = False,
              max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, data_source: str = "", extra_meta: dict | None = None,
              expert_set=None, log=print):
    """A training-free stock-checkpoint MoE from experts + text (the library call under `dume build`):
    `build_routed` with the statistics collected from `docs`, the experts MoErged straight into `out` with their
    gates, and the statistics stamped with the MoE's shared-weight fingerprint, so `dume.upcycle.dynamic` can
    edit it. Returns (RidgeStats or None, {domain: tokens})."""
    from dume.checkpoint.experts import check_experts

    entry = strategy_for_build(strategy)
    if entry.trains_router or not entry.stock_checkpoint or entry.needs_prompts:
        raise DumeError(f"{strategy}: build_moe makes training-free stock-checkpoint MoEs from experts and text "
                        "(no router training, no prompts, no custom model class)")
    es = expert_set or check_experts(expert_dirs, require_moe_compatible=True)
    built = build_routed(
        strategy, expert_dirs, domains, out, expert_set=es, max_shard_size=max_shard_size,
        settings=RouterSettings(k=k, lam=lam, temperature=temperature, relative_lambda=relative_lambda, seed=seed,
                                num_dume_tokens=num_dume_tokens),
        collection=Collection(docs, tokenizer, max_len=max_len, batch_size=batch_size, device=device, dtype=dtype,
                              data_source=data_source, extra_meta=extra_meta, log=log),
        extra_config={"dume_domains": list(domains)})
    return built.stats, built.counts
