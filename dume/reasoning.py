"""The reasoning setting (paper §3.1, Table 3): four dense Llama experts (math,
multilingual, coding, instruction following), ten strategies, four lm-eval tasks.

Every strategy's model is a plain Hugging Face checkpoint built with the core:

| strategy              | checkpoint                                                         |
|-----------------------|--------------------------------------------------------------------|
| `<domain>_expert`     | the expert itself (its directory, or its hub snapshot)             |
| `model_averaging`     | `merge.average_experts`                                            |
| `oracle`              | `merge.write_oracle` for the evaluated task's domain               |
| `random_routing`      | MoErged (`moerge_experts`) + `routers.random_gates`, k = 1         |
| `DUME`                | MoErged + `routers.dume_gates` (λ 0.01, T 0.1, k 1, 1024 tokens)   |
| `BTX`                 | random gates trained on the tasks' mixed data (k 2, lr 1e-4)       |
| `DUMEplus`            | DUME gates trained likewise (k 1, lr 1e-5)                         |

DUME's statistics come, by default, from the evaluation tasks' own data (train split
where one exists, else test) — what the original code did for Table 3. With `ood` they
come from the experts' training sets (Magicoder-OSS-Instruct-75K, dart-math-hard,
aya_dataset, tulu-3-sft-personas-instruction-following): Table 3's "DUME OOD" row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from .errors import DumeError
from .fingerprint import built_from
from .io import atomic_write_json, is_complete_checkpoint, read_json
from .strategies import REGISTRY as _REGISTRY
from .tasks import DOMAINS

DEFAULT_EXPERTS = {
    "math": "MergeBench/Llama-3.2-3B_math",
    "multilingual": "MergeBench/Llama-3.2-3B_multilingual",
    "coding": "MergeBench/Llama-3.2-3B_coding",
    "instruction": "MergeBench/Llama-3.2-3B_instruction",
}
EXPERT_STRATEGIES = tuple(f"{d}_expert" for d in DOMAINS)
STRATEGIES = EXPERT_STRATEGIES + ("model_averaging", "oracle", "random_routing", "DUME", "BTX", "DUMEplus")
# Strategies whose checkpoint depends on the seed (random gates, the router training's
# data order): built once per seed; the others once for all seeds (dume.strategies).
SEEDED_STRATEGIES = tuple(s for s in STRATEGIES if s in _REGISTRY and _REGISTRY[s].seeded)

# The paper's reasoning settings (§3.1), and the original code's statistics cap.
PAPER = {"lam": 0.01, "k": 1, "temperature": 0.1, "num_dume_tokens": 1024, "max_num_samples": 2048}
ROUTER_TRAINING = {s.name: {"k": s.k, "lr": s.lr, "steps": s.steps} for s in _REGISTRY.values()
                   if s.trains_router and s.name in STRATEGIES}

# DUME OOD: the experts' training sets (hub id, config, fields joined into one text).
# The first field is the prompt side, all the original used (for tulu, the first
# message); statistics_text="full" joins them all.
OOD_DATASETS = {
    "coding": ("ise-uiuc/Magicoder-OSS-Instruct-75K", None, ("problem", "solution")),
    "math": ("hkust-nlp/dart-math-hard", None, ("query", "response")),
    "multilingual": ("CohereForAI/aya_dataset", None, ("inputs", "targets")),
    "instruction": ("allenai/tulu-3-sft-personas-instruction-following", None, ("messages",)),
}
# Prompt-side fields tried, in order, when reading local OOD files.
PROMPT_TEXT_FIELDS = ("text", "problem", "query", "inputs", "prompt", "question", "instruction", "messages")
# Fields tried, in order, when reading local OOD files.
TEXT_FIELDS = ("text", "problem", "solution", "query", "response", "inputs", "targets", "prompt", "messages",
               "question", "answer", "instruction", "output", "content")


def parse_experts(spec: str | Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """`math=PATH,coding=ID,...` (or a mapping, or four values in DOMAINS order) ->
    {domain: hub id or local path}, in DOMAINS order; missing domains get the paper's id."""
    out = dict(DEFAULT_EXPERTS)
    if spec is None:
        return out
    if isinstance(spec, Mapping):
        items = dict(spec)
    else:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        if all("=" in p for p in parts):
            items = dict(p.split("=", 1) for p in parts)
        elif len(parts) == len(DOMAINS):
            items = dict(zip(DOMAINS, parts))
        else:
            raise DumeError(f"--experts: give {len(DOMAINS)} values ({', '.join(DOMAINS)}) or domain=path pairs")
    for d in items:
        if d not in DOMAINS:
            raise DumeError(f"--experts: unknown domain {d!r}; domains are {', '.join(DOMAINS)}")
    out.update({d: str(v).strip() for d, v in items.items()})
    return {d: out[d] for d in DOMAINS}


def resolve_expert(id_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local checkpoint directory, or a hub id downloaded (safetensors + config +
    tokenizer only) into the Hugging Face cache. Offline, a hub id that is not cached
    is a clear error."""
    p = Path(id_or_path).expanduser()
    if p.is_dir():
        if not is_complete_checkpoint(p):
            raise DumeError(f"{p} is not a complete checkpoint (config.json + safetensors weights)")
        return p.resolve()
    if p.exists() or id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") != 1:
        raise DumeError(f"expert {id_or_path!r}: no such checkpoint directory, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    from .hub import require_hub

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    try:  # the cache first: no network needed for what was downloaded before
        return Path(snapshot_download(id_or_path, cache_dir=cache_dir, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:
        pass
    require_hub(f"expert {id_or_path}", "pass a local checkpoint directory instead")
    try:
        path = snapshot_download(id_or_path, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as e:
        raise DumeError(f"cannot get expert {id_or_path} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                        f"pass a local checkpoint directory instead") from e
    return Path(path)


def resolve_experts(experts: Mapping[str, str], cache_dir=None) -> dict[str, Path]:
    return {d: resolve_expert(v, cache_dir) for d, v in experts.items()}


# --------------------------------------------------------------------------- statistics


def _record_text(rec: dict, fields: Sequence[str], prompt_only: bool = False) -> str:
    """The record's text: with `prompt_only`, the first field present (of chat messages,
    the first message's content); else every field joined."""
    parts = []
    for f in fields:
        v = rec.get(f)
        if isinstance(v, list):  # chat messages
            msgs = v[:1] if prompt_only else v
            v = "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in msgs)
        if v:
            parts.append(str(v))
            if prompt_only:
                break
    return "\n".join(parts)


def ood_documents(domain: str, ood_data_dir: str | os.PathLike | None = None,
                  max_num_samples: int | None = None, text: str = "prompt") -> tuple[list[str], str]:
    """Text from the expert's training set: local files OOD_DATA_DIR/<domain>/*.jsonl|*.json|*.txt
    (fields tried: TEXT_FIELDS), else the hub dataset of OOD_DATASETS."""
    from .io import read_text
    from .tasks import _read_jsonl

    if ood_data_dir is not None:
        root = Path(ood_data_dir) / domain
        files = sorted(f for f in root.glob("*") if f.suffix in (".jsonl", ".json", ".txt", ".gz")) if root.is_dir() else []
        if not files:
            raise DumeError(f"--ood-data-dir: no files for {domain} in {root} (*.jsonl, *.json or *.txt)")
        texts: list[str] = []
        for f in files:
            if f.suffix == ".txt":
                texts += [t for t in read_text(f).split("\n\n") if t.strip()]
            else:
                fields = PROMPT_TEXT_FIELDS if text == "prompt" else TEXT_FIELDS
                texts += [_record_text(r, fields, text == "prompt") for r in _read_jsonl(f) if isinstance(r, dict)]
            if max_num_samples is not None and len(texts) >= max_num_samples:
                break
        source = f"local:{root}"
    else:
        import datasets

        path, name, fields = OOD_DATASETS[domain]
        try:
            split = f"train[:{max_num_samples}]" if max_num_samples else "train"
            ds = datasets.load_dataset(path, name, split=split)
        except Exception as e:
            raise DumeError(f"DUME OOD: cannot load {path} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                            f"pass --ood-data-dir with local files") from e
        texts = [_record_text(r, fields, text == "prompt") for r in ds]
        source = f"hub:{path} (train)"
    from .tasks import finish_texts

    return finish_texts(texts, max_num_samples, f"DUME OOD: no text for {domain} ({source})"), source


def statistics_documents(*, ood: bool, data_dir=None, ood_data_dir=None,
                         max_num_samples: int | None = PAPER["max_num_samples"], languages=None,
                         text: str = "prompt", balance: bool = True
                         ) -> tuple[dict[str, list[str]], dict[str, str], str, dict[str, dict]]:
    """{domain: texts}, {domain: source}, a one-line description of where they came
    from, and {domain: exactly which texts} (ids, count, SHA-256 of the texts).

    Defaults are the original's: the prompt side of each record only, at most 2048 texts
    per domain, m_arc spread evenly over its languages."""
    from .tasks import task_selection, texts_sha256

    docs, sources, selection = {}, {}, {}
    for d in DOMAINS:
        if ood:
            docs[d], sources[d] = ood_documents(d, ood_data_dir, max_num_samples, text)
            selection[d] = {"source": sources[d], "text": text, "count": len(docs[d]),
                            "ids": [str(i) for i in range(len(docs[d]))],
                            "sha256": texts_sha256(docs[d])}
        else:
            docs[d], sources[d], selection[d] = task_selection(d, data_dir, max_num_samples, languages, text,
                                                               balance)
    cap = "all" if max_num_samples is None else f"at most {max_num_samples}"
    side = "prompt side only" if text == "prompt" else "prompt and answer"
    what = ((f"DUME OOD: statistics from the experts' training datasets (not the evaluation tasks), {side}, "
             f"{cap} texts per domain") if ood else
            f"DUME statistics from the evaluation tasks' own data (train split where one exists, else test), "
            f"{side}, {cap} texts per domain" + (", m_arc balanced over its languages" if balance else "")
            + " - the paper's default for Table 3")
    return docs, sources, what, selection


def router_training_documents(*, data_dir=None, languages=None, per_task: int | None = None, seed: int = 0,
                              text: str = "prompt") -> tuple[dict[str, list[str]], dict]:
    """BTX / DUME+ training text as the original built it: `per_task` (820) prompts of
    each task -- all of a smaller task, repeated to fill; m_arc balanced over its
    languages -- shuffled with `seed`. Returns ({domain: texts}, a record of it)."""
    import random

    from .tasks import ROUTER_TRAINING_PER_TASK, task_selection

    per_task = per_task or ROUTER_TRAINING_PER_TASK
    rng = random.Random(seed)
    docs, record = {}, {}
    for d in DOMAINS:
        texts, source, _ = task_selection(d, data_dir, None if d != "multilingual" else per_task, languages, text)
        pool = list(texts)
        if d != "multilingual":
            rng.shuffle(pool)
        filled = (pool * (per_task // len(pool) + 1))[:per_task]
        rng.shuffle(filled)
        docs[d] = filled
        record[d] = {"source": source, "available": len(texts), "used": len(filled), "text": text}
    return docs, {"per_task": per_task, "seed": seed, "tasks": record}


def collect_statistics(experts: Mapping[str, Path], docs: Mapping[str, list[str]], tokenizer, *,
                       num_dume_tokens: int | None = PAPER["num_dume_tokens"], batch_size: int = 8,
                       max_len: int | None = None, base_dir: Path | None = None, device: str = "cpu",
                       dtype=None, data_source: str = "", extra_meta: dict | None = None):
    """Ridge statistics of the four domains (`dume.collect.collect_statistics`): domain
    d's texts through the oracle d, the first `num_dume_tokens` tokens of each."""
    from .checkpoints import load_config, model_fingerprint
    from .collect import collect_statistics as collect

    from .architectures import ARCHITECTURES

    cfg = load_config(Path(experts[DOMAINS[0]]), tuple(ARCHITECTURES))
    max_len = max_len or min(num_dume_tokens or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return collect([experts[d] for d in DOMAINS], list(DOMAINS), docs, tokenizer, num_dume_tokens=num_dume_tokens,
                   max_len=max_len, batch_size=batch_size, device=device, dtype=dtype,
                   model_fingerprint=model_fingerprint(base_dir) if base_dir else None, data_source=data_source,
                   extra_meta={**(extra_meta or {}), "experts_by_domain": {d: str(p) for d, p in experts.items()}},
                   log=lambda *_: None)


# ---------------------------------------------------------------------------- building


def moe_base(experts: Mapping[str, Path], out_dir: Path, redo: bool = False) -> Path:
    """The MoErged model (zero gates), built once per expert set."""
    from .checkpoints import check_experts
    from .merge import moerge_experts

    es = check_experts([experts[d] for d in DOMAINS], require_mixtral_compatible=True)
    # Keyed by the experts' contents, not their paths: an expert replaced in place
    # rebuilds the base, a moved one does not.
    made_from = {"dume_domains": list(DOMAINS), "dume_expert_fingerprints": list(es.fingerprints)}
    if redo or not is_complete_checkpoint(out_dir) or any(
            read_json(out_dir / "config.json").get(k) != v for k, v in made_from.items()):
        moerge_experts([experts[d] for d in DOMAINS], out_dir, gates=None, num_experts_per_tok=1,
                       extra_config=made_from)
    return out_dir


def write_router_recipe(model_dir: Path, strategy: str, experts, **settings) -> None:
    """The recipe beside the model (`dume.recipe`)."""
    from .recipe import write_recipe

    write_recipe(model_dir, {"method": strategy, "domains": list(DOMAINS),
                             "experts": [str(experts[d]) for d in DOMAINS], **settings})


def train_router_model(model_dir: Path, base_dir: Path, strategy: str, docs: Mapping[str, list[str]], tokenizer, *,
                       steps: int, lr: float, k: int, seq_len: int, batch_size: int, seed: int = 0,
                       mixed_precision: str | None = None, val_fraction: float = 0.1) -> dict:
    """BTX / DUME+: train only the gates of `model_dir` on the tasks' mixed text, then
    write the trained gates back into `model_dir`. Returns the training history."""
    import torch

    from .data import pack_documents
    from .moe_edit import load_moe, set_gates
    from .router_training import mixed_blocks, train_routers
    from .train import TrainConfig

    train_blocks, val_blocks = [], []
    for d in DOMAINS:
        ids, mask = pack_documents(docs[d], tokenizer, seq_len)
        n_val = max(1, int(len(ids) * val_fraction)) if len(ids) > 1 else 0
        train_blocks.append((ids[n_val:] if n_val else ids, mask[n_val:] if n_val else mask))
        val_blocks.append((ids[:n_val] if n_val else ids, mask[:n_val] if n_val else mask))
    model = load_moe(model_dir, dtype=torch.float32)
    cfg = TrainConfig(lr=lr, steps=steps, warmup=max(1, steps // 10), batch_size=batch_size,
                      eval_every=max(1, steps // 4), seed=seed, mixed_precision=mixed_precision)
    model, history = train_routers(model, mixed_blocks(train_blocks), mixed_blocks(val_blocks), cfg,
                                   desc=strategy)
    trained = [layer.mlp.gate.weight.detach().float().cpu().clone() for layer in model.model.layers]
    del model
    set_gates(model_dir, trained, num_experts_per_tok=k)
    return history


def build_strategy(strategy: str, experts: Mapping[str, Path], work_dir: str | os.PathLike, *,
                   task: str | None = None, stats=None, train_docs: Mapping[str, list[str]] | None = None,
                   tokenizer=None, lam: float = PAPER["lam"], temperature: float = PAPER["temperature"],
                   k: int | None = None, seed: int = 0, train_steps: int | None = None, train_lr: float | None = None,
                   seq_len: int = 512, batch_size: int = 4, mixed_precision: str | None = None,
                   redo: bool = False) -> Path:
    """The checkpoint directory of `strategy` (built under `work_dir` unless it is an
    expert). `task` picks the oracle's domain. DUME / DUME+ need `stats`; BTX / DUME+
    need `train_docs` and `tokenizer`. Existing complete checkpoints are reused."""
    from .merge import average_experts, write_oracle
    from .moe_edit import set_gates

    if strategy not in STRATEGIES:
        raise DumeError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    missing = [d for d in DOMAINS if d not in experts]
    if missing:
        raise DumeError(f"no expert for {missing}")
    work_dir = Path(work_dir)
    dirs = [Path(experts[d]) for d in DOMAINS]
    if strategy in EXPERT_STRATEGIES:
        return Path(experts[strategy[: -len("_expert")]])
    from .io import atomic_dir

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
    # A routed model is reused only when complete (its recipe is written last) and built
    # from these very experts; otherwise it is rebuilt in a hidden sibling that replaces
    # `out` when finished, so a killed BTX training leaves the previous model in place.
    from .recipe import RECIPE_FILE

    if not redo and (out / RECIPE_FILE).is_file() and built_from(out, made_from):
        return out
    defaults = ROUTER_TRAINING.get(strategy, {})
    k = k if k is not None else defaults.get("k", PAPER["k"])
    base = moe_base({d: Path(experts[d]) for d in DOMAINS}, work_dir / "_moe_base", redo)
    from .checkpoints import load_config

    from .strategies import GateContext, make_gates

    cfg = load_config(base, "mixtral")
    spec = _REGISTRY[strategy]
    if spec.needs_statistics:
        if stats is None:
            raise DumeError(f"{strategy} needs DUME statistics (reasoning_generate_dume_params.py)")
        if list(stats.domains) != list(DOMAINS):
            raise DumeError(f"the statistics are for domains {stats.domains}, the MoE's experts are {list(DOMAINS)}")
    gates = make_gates(strategy, stats, GateContext(num_layers=cfg.num_hidden_layers, num_experts=len(DOMAINS),
                                                    hidden_size=cfg.hidden_size, lam=lam, temperature=temperature,
                                                    seed=seed))
    if spec.trains_router and (train_docs is None or tokenizer is None):
        raise DumeError(f"{strategy} trains its routers on the tasks' mixed data: give train_docs and tokenizer")
    settings = {"lambda": lam, "temperature": temperature if spec.needs_statistics else None, "k": k,
                "seed": seed, "trained_steps": 0}
    with atomic_dir(out) as stage:
        set_gates(base, gates, out_dir=stage, num_experts_per_tok=k)
        if spec.trains_router:
            steps = train_steps if train_steps is not None else defaults["steps"]
            lr = train_lr if train_lr is not None else defaults["lr"]
            history = train_router_model(stage, base, strategy, train_docs, tokenizer, steps=steps, lr=lr, k=k,
                                         seq_len=seq_len, batch_size=batch_size, seed=seed,
                                         mixed_precision=mixed_precision)
            settings.update(trained_steps=steps, lr=lr, final_val=(history.get("val") or [{}])[-1].get("loss"))
        if stats is not None and spec.needs_statistics:
            stats.save(stage / "dume_stats")
        write_router_recipe(stage, strategy, experts, **settings)
    return out


def experts_made_from(experts: Mapping[str, Path]) -> dict:
    """The config attribute that ties a built model to the experts' contents."""
    from .checkpoints import check_experts

    es = check_experts([Path(experts[d]) for d in DOMAINS])
    return {"dume_expert_fingerprints": list(es.fingerprints)}


def load_tokenizer_of(expert_dir: Path):
    from .tokenizer import load_tokenizer

    return load_tokenizer(expert_dir)


def check_router_settings(*, lam=None, k=None, temperature=None, num_dume_tokens=None, max_num_samples=None,
                          train_steps=None, train_lr=None, limit=None, router_prompts=None) -> None:
    """Every numeric flag of the reasoning scripts, checked before any hub or disk work
    (a bad flag must not hide behind a slow download or a hub error). None = not given."""
    if lam is not None and not lam > 0:
        raise DumeError(f"--lambda must be > 0, got {lam}")
    if temperature is not None and not temperature > 0:
        raise DumeError(f"--temp must be > 0, got {temperature}")
    if k is not None and not 1 <= k <= len(DOMAINS):
        raise DumeError(f"--k must be in 1..{len(DOMAINS)} (the number of experts), got {k}")
    for flag, value in (("--num-dume-tokens", num_dume_tokens), ("--max-num-samples", max_num_samples),
                        ("--train-steps", train_steps), ("--limit", limit), ("--router-prompts", router_prompts)):
        if value is not None and value < 1:
            raise DumeError(f"{flag} must be >= 1, got {value}")
    if train_lr is not None and not train_lr > 0:
        raise DumeError(f"--train-lr must be > 0, got {train_lr}")


def generate_dume_params(experts: Mapping[str, Path], out_dir: str | os.PathLike, *, ood: bool = False,
                         data_dir=None, ood_data_dir=None, max_num_samples: int | None = PAPER["max_num_samples"],
                         statistics_text: str = "prompt", balance_languages: bool = True,
                         num_dume_tokens: int | None = PAPER["num_dume_tokens"], lam: float = PAPER["lam"],
                         k: int = PAPER["k"], temperature: float = PAPER["temperature"], batch_size: int = 8,
                         device: str = "cpu", dtype=None, languages=None, work_dir=None, log=print) -> dict:
    """DUME's router for the four experts: statistics (tasks' data, or with `ood` the
    experts' training sets), the solved gates, the MoE checkpoint, the statistics and a
    metadata JSON (`dume_params.json`) in `out_dir`. Returns the metadata."""
    from .checkpoints import check_experts
    from .io import atomic_dir
    from .moe_edit import set_gates
    from .routers import dume_gates

    check_router_settings(lam=lam, k=k, temperature=temperature, num_dume_tokens=num_dume_tokens,
                          max_num_samples=max_num_samples)
    out_dir = Path(out_dir)
    experts = {d: Path(experts[d]) for d in DOMAINS}
    es = check_experts([experts[d] for d in DOMAINS], require_mixtral_compatible=True)
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
    base = moe_base(experts, work_dir / "_moe_base")
    stats, counts = collect_statistics(experts, docs, tokenizer, num_dume_tokens=num_dume_tokens,
                                       batch_size=batch_size, base_dir=base, device=device, dtype=dtype,
                                       data_source="ood" if ood else "tasks",
                                       extra_meta={"sources": sources, "max_num_samples": max_num_samples,
                                                   "statistics_text": statistics_text,
                                                   "texts_sha256": {d: selection[d]["sha256"] for d in DOMAINS}})
    gates = dume_gates(stats, lam, temperature)
    meta = {"statistics_from": "ood" if ood else "tasks", "description": what, "sources": sources,
            "experts": {d: str(experts[d]) for d in DOMAINS}, "lambda": lam, "k": k, "temperature": temperature,
            "num_dume_tokens": num_dume_tokens, "max_num_samples": max_num_samples, "token_counts": counts,
            "statistics_text": statistics_text, "balanced_languages": balance_languages,
            "texts": selection, "model": str(out_dir)}
    with atomic_dir(out_dir) as stage:  # the model appears with its statistics and recipe, or not at all
        set_gates(base, gates, out_dir=stage, num_experts_per_tok=k)
        stats.save(stage / "dume_stats")
        atomic_write_json(stage / "dume_params.json", meta)
        write_router_recipe(stage, "DUME_OOD" if ood else "DUME", experts, **{
            "lambda": lam, "temperature": temperature, "k": k, "num_dume_tokens": num_dume_tokens,
            "statistics_from": meta["statistics_from"], "trained_steps": 0})
    log(f"DUME MoE written to {out_dir} (tokens per domain: {counts})")
    return meta


# --------------------------------------------------------------------------- evaluation


def _preflight_hub(spec) -> None:
    """A stock task reads a hub dataset: fail with one line when it cannot be had."""
    if not spec.source.startswith("hub:"):
        return
    import datasets

    from .tasks import HUB_DATASETS

    path, name = HUB_DATASETS[spec.domain]
    if spec.domain == "multilingual":
        name = spec.tasks[0].split("_", 1)[1]
    try:
        datasets.load_dataset_builder(path, name)
    except Exception as e:
        raise DumeError(f"task {spec.domain} ({', '.join(spec.tasks[:3])}{'...' if len(spec.tasks) > 3 else ''}) "
                        f"needs the hub dataset {path}, which cannot be reached ({type(e).__name__}); run online "
                        f"once to cache it, or pass --data-dir with local files (docs/reasoning.md)") from None


def evaluate_checkpoint(model_path: str | os.PathLike, task: str, tasks_dir: str | os.PathLike, *,
                        data_dir=None, languages=None, limit: int | None = None, batch_size: int | str = 1,
                        device: str = "cpu", dtype: str = "float32", num_fewshot: int | None = None,
                        max_gen_toks: int | None = None, parallelize: bool = False, seed: int = 0,
                        protocol: str = "paper", model=None) -> dict | None:
    """Evaluate a saved checkpoint on one of the four tasks with lm-eval's own `HFLM`,
    under `protocol` (`dume.tasks`: "paper" = the original code's prompts, sampling and
    metrics; "lm-eval" = the harness's standard setups). `seed` seeds lm-eval's python,
    numpy and torch generators before any request, so samples follow it.

    Returns {"score", "metric", "per_task", ...}; None on non-zero ranks of a
    multi-process (accelerate launch) run, where only rank 0 gets results."""
    from .tasks import write_task_configs

    spec = write_task_configs(task, tasks_dir, data_dir, languages, protocol=protocol)
    _preflight_hub(spec)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DumeError(f"lm-eval is not installed ({e}): pip install 'lm-eval==0.4.13'") from e
    # The original tokenised every prompt with the tokenizer's defaults, i.e. with BOS
    # (Llama 3: <|begin_of_text|>); HFLM adds none unless asked.
    bos = {"add_bos_token": True} if protocol == "paper" else {}
    if model is None:
        lm = HFLM(pretrained=str(model_path), device=device, dtype=dtype, batch_size=batch_size,
                  parallelize=parallelize, trust_remote_code=False, **bos)
    else:
        lm = HFLM(pretrained=model, tokenizer=str(model_path), batch_size=batch_size, **bos)
    nshot = spec.num_fewshot if num_fewshot is None else num_fewshot
    gen_kwargs = f"max_gen_toks={max_gen_toks}" if max_gen_toks else None
    # Our own tasks (dume_*) include lm-eval's stock YAMLs by absolute path: indexing
    # lm-eval's thousands of built-in tasks (seconds) is only needed for the hub tasks.
    own = all(t.startswith("dume_") for t in spec.tasks)
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=not own)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=nshot, limit=limit,
                                  task_manager=tm, gen_kwargs=gen_kwargs, bootstrap_iters=0, log_samples=False,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, confirm_run_unsafe_code=True)
    if out is None:  # not rank 0
        return None
    per_task = {}
    for t in spec.tasks:
        res = out["results"].get(t)
        if res is None or spec.metric not in res:
            raise DumeError(f"lm-eval returned no {spec.metric} for {t} (got {sorted(res or {})})")
        per_task[t] = float(res[spec.metric])
    score = sum(per_task.values()) / len(per_task)
    raw = {t: {k: v for k, v in out["results"][t].items() if isinstance(v, (int, float, str))} for t in spec.tasks}
    return {"score": score, "metric": spec.metric, "per_task": per_task, "lm_eval_tasks": list(spec.tasks),
            "protocol": spec.protocol, "seed": seed, "num_fewshot": nshot,
            "limit": limit, "data": spec.source, "notes": list(spec.notes),
            "lm_eval_version": getattr(lm_eval, "__version__", None), "raw_results": raw,
            "n_samples": {t: out.get("n-samples", {}).get(t) for t in spec.tasks}}


# ------------------------------------------------------------------ shared script flags


def parse_cap(value: str) -> int | None:
    """--max-num-samples: a positive count, or `all`."""
    import argparse

    if value.lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 'all'), got {n}")
    return n


def add_statistics_flags(p) -> None:
    """The flags that choose DUME's statistics texts (both reasoning scripts)."""
    from .tasks import STATISTICS_TEXTS

    p.add_argument("--max-num-samples", type=parse_cap, default=PAPER["max_num_samples"],
                   help="texts per domain for the statistics (default 2048, the original's; 'all' for no cap)")
    p.add_argument("--statistics-text", default="prompt", choices=STATISTICS_TEXTS,
                   help="prompt: the prompt side of each record only (the original's); full: prompt and answer")
    p.add_argument("--no-balance-languages", dest="balance_languages", action="store_false",
                   help="m_arc: take languages in order up to the cap instead of an even share each")
