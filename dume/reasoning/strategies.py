"""The reasoning setting's checkpoints (paper §3.1, Table 3): four dense Llama experts (math, multilingual,
coding, instruction following), ten strategies, each a plain Hugging Face checkpoint built with the core:

| strategy              | checkpoint                                                         |
|-----------------------|--------------------------------------------------------------------|
| `<domain>_expert`     | the expert itself (its directory, or its hub snapshot)             |
| `model_averaging`     | `merge.average_experts`                                            |
| `oracle`              | `merge.write_oracle` for the evaluated task's domain               |
| `random_routing`      | MoErged (`moerge_experts`) + `routers.random_gates`, k = 1         |
| `DUME`                | MoErged + `routers.dume_gates` (λ 0.01, T 0.1, k 1, 1024 tokens)   |
| `BTX`                 | random gates trained on the tasks' mixed data (k 2, lr 1e-4)       |
| `DUMEplus`            | DUME gates trained likewise (k 1, lr 1e-5)                         |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from dume.checkpoint.fingerprint import built_from
from dume.checkpoint.io import atomic_write_json
from dume.errors import DumeError
from dume.reasoning.flags import check_router_settings
from dume.reasoning.settings import EXPERT_STRATEGIES, PAPER, ROUTER_TRAINING, SEEDED_STRATEGIES, STRATEGIES
from dume.reasoning.statistics import statistics_documents
from dume.reasoning.tasks import DOMAINS
from dume.routers.registry import REGISTRY as _REGISTRY


def base_made_from(es) -> dict:
    """What the shared zero-gate MoE is keyed by (`es`: the experts' `check_experts`): the experts' contents
    (an expert replaced in place rebuilds it, a moved one does not) and the domains."""
    return {"dume_domains": list(DOMAINS), "dume_expert_fingerprints": list(es.fingerprints)}


def router_training(docs: Mapping[str, list[str]], tokenizer, *, steps: int, lr: float, seq_len: int,
                    batch_size: int, seed: int = 0, mixed_precision: str | None = None, val_fraction: float = 0.1,
                    desc: str = "routers"):
    """BTX / DUME+ training on the tasks' mixed text, as the original did it: each task's prompts packed into
    `seq_len` blocks, the first `val_fraction` held for validation."""
    from dume.routers.training import mixed_blocks
    from dume.text.batches import pack_documents
    from dume.train.loop import TrainConfig
    from dume.upcycle.pipeline import RouterTraining

    train_blocks, val_blocks = [], []
    for d in DOMAINS:
        ids, mask = pack_documents(docs[d], tokenizer, seq_len)
        n_val = max(1, int(len(ids) * val_fraction)) if len(ids) > 1 else 0
        train_blocks.append((ids[n_val:] if n_val else ids, mask[n_val:] if n_val else mask))
        val_blocks.append((ids[:n_val] if n_val else ids, mask[:n_val] if n_val else mask))
    cfg = TrainConfig(lr=lr, steps=steps, warmup=max(1, steps // 10), batch_size=batch_size,
                      eval_every=max(1, steps // 4), seed=seed, mixed_precision=mixed_precision)
    return RouterTraining(mixed_blocks(train_blocks), mixed_blocks(val_blocks), cfg, desc=desc)


def build_strategy(strategy: str, experts: Mapping[str, Path], work_dir: str | os.PathLike, *,
                   task: str | None = None, stats=None, train_docs: Mapping[str, list[str]] | None = None,
                   tokenizer=None, lam: float = PAPER["lam"], temperature: float = PAPER["temperature"],
                   k: int | None = None, seed: int = 0, train_steps: int | None = None, train_lr: float | None = None,
                   seq_len: int = 512, batch_size: int = 4, mixed_precision: str | None = None,
                   redo: bool = False) -> Path:
    """The checkpoint directory of `strategy` (built under `work_dir` unless an expert; complete ones reused).
    `task` picks the oracle's domain; DUME / DUME+ need `stats`, BTX / DUME+ `train_docs` and `tokenizer`."""
    from dume.moe.merge import average_experts, write_oracle

    if strategy not in STRATEGIES:
        raise DumeError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    missing = [d for d in DOMAINS if d not in experts]
    if missing:
        raise DumeError(f"no expert for {missing}")
    work_dir = Path(work_dir)
    dirs = [Path(experts[d]) for d in DOMAINS]
    if strategy in EXPERT_STRATEGIES:
        return Path(experts[strategy[: -len("_expert")]])
    from dume.checkpoint.io import atomic_dir

    made_from = experts_made_from(experts)
    if strategy == "model_averaging":
        out = work_dir / "model_averaging"
        if redo or not built_from(out, made_from):
            average_experts(dirs, out, extra_config=made_from)
        return out
    if strategy == "oracle":
        if task not in DOMAINS:
            raise DumeError(f"the oracle needs the evaluated task's domain (one of {', '.join(DOMAINS)}), got {task!r}")
        out = work_dir / "oracle" / task
        if redo or not built_from(out, made_from):
            write_oracle(dirs, DOMAINS.index(task), out, extra_config=made_from)
        return out

    out = work_dir / strategy / f"seed{seed}" if strategy in SEEDED_STRATEGIES else work_dir / strategy
    # A routed model is reused only if complete (recipe written last) and built from these experts; else it is
    # rebuilt in a hidden sibling replacing `out` when done, so a killed BTX training keeps the old model.
    from dume.moe.recipe import RECIPE_FILE, write_recipe
    from dume.upcycle.pipeline import RouterSettings, build_routed, shared_zero_gate_base

    if not redo and (out / RECIPE_FILE).is_file() and built_from(out, made_from):
        return out
    defaults = ROUTER_TRAINING.get(strategy, {})
    k = k if k is not None else defaults.get("k", PAPER["k"])
    spec = _REGISTRY[strategy]
    if spec.needs_statistics and stats is None:
        raise DumeError(f"{strategy} needs DUME statistics (reasoning_generate_dume_params.py)")
    if spec.trains_router and (train_docs is None or tokenizer is None):
        raise DumeError(f"{strategy} trains its routers on the tasks' mixed data: give train_docs and tokenizer")
    training, recipe = None, {"temperature": temperature if spec.needs_statistics else None, "seed": seed}
    if spec.trains_router:
        steps = train_steps if train_steps is not None else defaults["steps"]
        lr = train_lr if train_lr is not None else defaults["lr"]
        training = router_training(train_docs, tokenizer, steps=steps, lr=lr, seq_len=seq_len,
                                   batch_size=batch_size, seed=seed, mixed_precision=mixed_precision, desc=strategy)
        recipe["lr"] = lr
    from dume.checkpoint.experts import check_experts

    es = check_experts(dirs, require_moe_compatible=True)  # once for the base and the build
    base = work_dir / "_moe_base"
    with shared_zero_gate_base(dirs, base, base_made_from(es), redo=redo), atomic_dir(out) as stage:
        built = build_routed(strategy, dirs, DOMAINS, stage, base_dir=base, stats=stats, training=training,
                             expert_set=es,
                             settings=RouterSettings(k=k, lam=lam, temperature=temperature, seed=seed),
                             recipe=recipe)
        if built.history is not None:  # the recipe also says how training ended
            write_recipe(stage, {**built.recipe, "final_val": (built.history.get("val") or [{}])[-1].get("loss")})
    return out


def experts_made_from(experts: Mapping[str, Path]) -> dict:
    """The config attribute that ties a built model to the experts' contents."""
    from dume.checkpoint.experts import check_experts

    es = check_experts([Path(experts[d]) for d in DOMAINS])
    return {"dume_expert_fingerprints": list(es.fingerprints)}


def load_tokenizer_of(expert_dir: Path):
    from dume.text.tokenizer import load_tokenizer

    return load_tokenizer(expert_dir)


def generate_dume_params(experts: Mapping[str, Path], out_dir: str | os.PathLike, *, ood: bool = False,
                         data_dir=None, ood_data_dir=None, max_num_samples: int | None = PAPER["max_num_samples"],
                         statistics_text: str = "prompt", balance_languages: bool = True,
                         num_dume_tokens: int | None = PAPER["num_dume_tokens"], lam: float = PAPER["lam"],
                         k: int = PAPER["k"], temperature: float = PAPER["temperature"], batch_size: int = 8,
                         device: str = "cpu", dtype=None, languages=None, work_dir=None, log=print) -> dict:
    """DUME's router for the four experts: statistics (tasks' data, or with `ood` the experts' training sets),
    the solved gates, and in `out_dir` the MoE, its statistics and `dume_params.json`; returns the metadata."""
    from dume.checkpoint.experts import check_experts, shared_weights_fingerprint
    from dume.checkpoint.io import atomic_dir
    from dume.checkpoint.reader import load_config
    from dume.upcycle.pipeline import Collection, RouterSettings, build_routed, shared_zero_gate_base

    check_router_settings(lam=lam, k=k, temperature=temperature, num_dume_tokens=num_dume_tokens,
                          max_num_samples=max_num_samples)
    out_dir = Path(out_dir)
    experts = {d: Path(experts[d]) for d in DOMAINS}
    es = check_experts([experts[d] for d in DOMAINS], require_moe_compatible=True)
    for n in es.notes:
        log(f"note: {n}")
    docs, sources, what, selection = statistics_documents(
        ood=ood, data_dir=data_dir, ood_data_dir=ood_data_dir, max_num_samples=max_num_samples,
        languages=languages, text=statistics_text, balance=balance_languages)
    log(what)
    for d in DOMAINS:
        log(f"  {d}: {len(docs[d])} documents from {sources[d]}")
    tokenizer = load_tokenizer_of(experts["math"])
    work_dir = Path(work_dir) if work_dir is not None else out_dir.parent
    cfg = load_config(experts["math"], es.arch.dense_type)
    # the statistics read the first num_dume_tokens tokens of each text: no longer window
    max_len = min(num_dume_tokens or cfg.max_position_embeddings, cfg.max_position_embeddings)
    statistics_from = "ood" if ood else "tasks"
    meta = {"statistics_from": statistics_from, "description": what, "sources": sources,
            "experts": {d: str(experts[d]) for d in DOMAINS}, "lambda": lam, "k": k, "temperature": temperature,
            "num_dume_tokens": num_dume_tokens, "max_num_samples": max_num_samples,
            "statistics_text": statistics_text, "balanced_languages": balance_languages,
            "texts": selection, "model": str(out_dir)}
    base = work_dir / "_moe_base"
    dirs = [experts[d] for d in DOMAINS]
    with shared_zero_gate_base(dirs, base, base_made_from(es)):
        collection = Collection(
            docs, tokenizer, max_len=max_len, batch_size=batch_size, device=device, dtype=dtype,
            data_source=statistics_from, model_fingerprint=shared_weights_fingerprint(base), log=lambda *_: None,
            extra_meta={"sources": sources, "max_num_samples": max_num_samples, "statistics_text": statistics_text,
                        "texts_sha256": {d: selection[d]["sha256"] for d in DOMAINS},
                        "experts_by_domain": {d: str(p) for d, p in experts.items()}})
        with atomic_dir(out_dir) as stage:  # the model appears with its statistics and recipe, or not at all
            built = build_routed("DUME", dirs, DOMAINS, stage, base_dir=base, collection=collection, expert_set=es,
                                 settings=RouterSettings(k=k, lam=lam, temperature=temperature,
                                                         num_dume_tokens=num_dume_tokens),
                                 recipe={"method": "DUME_OOD" if ood else "DUME",
                                         "statistics_from": statistics_from})
            counts = meta["token_counts"] = built.counts
            atomic_write_json(stage / "dume_params.json", meta)
    log(f"DUME MoE written to {out_dir} (tokens per domain: {counts})")
    return meta
