"""Dynamic experts: add, remove or re-weight an expert of a DUME MoE without retraining (docs/design.md §5).

The router is a closed-form function of per-domain sums kept beside the model (``dume_stats/``, with the recipe
``dume_router.json``: method, λ, temperature, k, domains, experts). Adding an expert has two modes:
``keep-shared`` collects the new domain's sums through "the MoE's shared weights + the new expert's MLPs", adds
them to the stored ones and re-solves -- exactly building from scratch *with the same shared weights*, as no
stored sum depends on anything that changed; ``reaverage`` MoErges all experts again (re-averaging the shared
weights, as building from scratch does), which changes the features every stored sum came from, so every domain
is re-collected. Removing or re-weighting a domain drops or scales its sums and re-solves, with no forward pass;
sums collected apart (`collect_stats`) combine by addition (`combine_stats`).

Every output is one directory written atomically (checkpoint + ``dume_stats/`` + recipe), and every input is
checked before any heavy work, so a failing command leaves existing models exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dume.checkpoint.io import atomic_dir, read_json
from dume.errors import DumeError
from dume.moe.recipe import RECIPE_FILE, resolve_recipe_paths, write_recipe
from dume.routers.registry import names as strategy_names
from dume.runtime.distributed import Shard, all_reduce_sum, current_shard, my_share
from dume.stats.ridge import STATS_SUBDIR, RidgeStats

MODES = ("keep-shared", "reaverage")
# The registry's closed-form strategies: routers that are a function of the statistics (a trained one is not).
SOLVERS = strategy_names(closed_form=True)
# What decides the content of one domain's statistics, besides the model and the token rule.
PROVENANCE_KEYS = ("source", "data_dir", "seq_len", "stats_batch_size", "num_dume_stats_steps", "tokenizer")


@dataclass(frozen=True)
class DataSettings:
    """Where one domain's documents come from and how they are cut into batches."""

    source: str = "offline"
    data_dir: str | None = None
    seq_len: int = 256
    batch_size: int = 32
    max_batches: int | None = None  # num_dume_stats_steps: batches per domain (None: all)
    tokenizer: str | None = None  # name or path; None: the MoE's own tokenizer files

    def provenance(self, tokenizer_fingerprint: str) -> dict:
        return {"source": self.source, "data_dir": self.data_dir, "seq_len": self.seq_len,
                "stats_batch_size": self.batch_size, "num_dume_stats_steps": self.max_batches,
                "tokenizer": tokenizer_fingerprint}


def settings_from(provenance: dict | None, **given) -> DataSettings:
    """The settings the statistics were collected with, overridden by what the user gave (None: not given), so a
    new domain is cut the way the stored ones were. A data directory belongs to its source: giving another
    source drops the stored one."""
    p = provenance or {}
    fields = asdict(DataSettings())
    stored = {"source": p.get("source"), "seq_len": p.get("seq_len"), "batch_size": p.get("stats_batch_size"),
              "max_batches": p.get("num_dume_stats_steps")}
    fields.update({k: v for k, v in stored.items() if v is not None})
    fields["data_dir"] = p.get("data_dir")
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("source", fields["source"]) != fields["source"]:
        fields["data_dir"] = None
    fields.update(given)
    s = DataSettings(**fields)
    for name, value in (("seq_len", s.seq_len), ("batch_size", s.batch_size)):
        if not isinstance(value, int) or value < 1:
            raise DumeError(f"{name} must be a positive integer, got {value!r}")
    if s.max_batches is not None and (not isinstance(s.max_batches, int) or s.max_batches < 1):
        raise DumeError(f"num_dume_stats_steps must be a positive integer, got {s.max_batches!r}")
    return s


def load_tokenizer_for(moe_dir: Path, settings: DataSettings):
    """The tokenizer named in the settings, else the one saved with the MoE."""
    from dume.text.tokenizer import load_tokenizer

    return load_tokenizer(settings.tokenizer or moe_dir)


def vocab_fingerprint(tokenizer) -> str:
    """The same vocabulary hash the CLM run records in its statistics (`Run.tokenizer_fingerprint`)."""
    from dume.text.tokenizer import vocab_fingerprint as fingerprint

    return fingerprint(tokenizer)


def training_documents(domain: str, settings: DataSettings) -> list[str]:
    """The domain's training documents, capped to the first max_batches × batch_size (the same documents the
    strategies script's --num-dume-stats-steps takes)."""
    from dume.corpora import documents as data

    cap = settings.max_batches * settings.batch_size if settings.max_batches is not None else None
    return data.load_documents(domain, "train", settings.source, data_dir=settings.data_dir, max_docs=cap)


def mlp_fingerprint(source: str | Path, expert: int | None = None) -> str:
    """A short hash of one expert's MLPs, the same in a dense Llama (expert=None) or in slot `expert` of a Mixtral:
    statistics record which MLPs they were collected through, which the shared-weight fingerprint cannot tell."""
    from dume.moe.edit import expert_mlp_state_dict

    h = hashlib.sha256()
    for name, t in sorted(expert_mlp_state_dict(source, expert).items()):
        t = t.to(torch.float32).contiguous()
        h.update(f"{name}|{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def domain_provenance(stats: RidgeStats) -> dict[str, dict]:
    """{domain: how its statistics were collected}. This module's statistics keep it per domain; older ones (the
    strategies script's) have one set of keys for all."""
    per_domain = stats.extra_meta.get("per_domain") or {}
    shared = {k: stats.extra_meta.get(k) for k in PROVENANCE_KEYS if k in stats.extra_meta}
    return {d: dict(per_domain.get(d, shared)) for d in stats.domains}


def identical_statistics(paths: Sequence[str | Path], parts: Sequence[RidgeStats]) -> list[tuple[int, int]]:
    """Pairs (i, j) of parts that are one and the same: the same directory given twice, or equal sums (a copy).
    Summing them doubles every count, almost always by mistake."""
    pairs = []
    for j in range(len(parts)):
        for i in range(j):
            same_dir = Path(paths[i]).resolve() == Path(paths[j]).resolve()
            a, b = parts[i], parts[j]
            if same_dir or (list(a.domains) == list(b.domains) and a.n.shape == b.n.shape and torch.equal(a.n, b.n)
                            and a.A.shape == b.A.shape and torch.equal(a.A, b.A)):
                pairs.append((i, j))
    return pairs


def combine_stats(parts: Sequence[RidgeStats]) -> tuple[RidgeStats, list[str]]:
    """Sum statistics computed apart (other processes, machines or owners).

    `RidgeStats.merge` refuses another model, shape or token rule; here parts tokenised differently are refused
    too, and a domain present in two parts (two shards of one domain) must have been collected through the same
    expert MLPs. Returns the sum and notes on harmless differences (e.g. another sequence length for a domain)."""
    parts = list(parts)
    if not parts:
        raise DumeError("nothing to combine: give at least one statistics directory")
    provs = [domain_provenance(p) for p in parts]
    toks = {p.get("tokenizer") for prov in provs for p in prov.values() if p.get("tokenizer")}
    if len(toks) > 1:
        raise DumeError(f"cannot combine statistics of differently tokenised text (tokenizer fingerprints "
                        f"{sorted(toks)})")
    total = parts[0]
    for p in parts[1:]:
        total = total.merge(p)
    merged: dict[str, dict] = {}
    for prov in provs:
        for d, p in prov.items():
            if d not in merged:
                merged[d] = dict(p)
                continue
            a, b = merged[d].get("expert_mlp"), p.get("expert_mlp")
            if a and b and a != b:
                raise DumeError(f"cannot sum two parts of domain {d!r} collected through different expert MLPs "
                                f"({a} != {b})")
            merged[d]["parts"] = merged[d].get("parts", 1) + 1
    total.extra_meta["per_domain"] = merged
    notes = []
    for key in ("seq_len", "num_dume_stats_steps"):
        values = {d: p.get(key) for d, p in merged.items()}
        if len(set(map(json.dumps, values.values()))) > 1:
            notes.append(f"domains were collected with different {key}: {values}")
    return total, notes


@dataclass
class DumeModel:
    """An existing DUME MoE checked for editing: its config, recipe and statistics."""

    path: Path
    config: Any  # the MoE's config (Mixtral, Qwen3-MoE, ...)
    recipe: dict
    stats: RidgeStats
    fingerprint: str

    @property
    def domains(self) -> list[str]:
        return list(self.recipe["domains"])

    def index(self, domain: str) -> int:
        if domain not in self.domains:
            raise DumeError(f"{self.path} has no expert for domain {domain!r}; its domains are {self.domains}")
        return self.domains.index(domain)


def read_recipe(moe_dir: Path) -> dict:
    """The recipe that re-solves the MoE's router, refusing routers that are not a closed-form function of the
    statistics (trained ones: re-solving would undo training)."""
    path = moe_dir / RECIPE_FILE
    if not path.is_file():
        raise DumeError(f"{moe_dir} has no {RECIPE_FILE} (the recipe λ/temperature/k/domains that re-solves its "
                        "router): build it with clm_moerging_strategies_eval.py --method DUME or with "
                        "dume_experts.py")
    recipe = read_json(path)
    missing = [k for k in ("method", "domains", "experts", "lambda", "temperature", "k") if k not in recipe]
    if missing:
        raise DumeError(f"{path} lacks {missing}")
    if recipe["method"] not in SOLVERS or recipe.get("trained_steps", 0):
        raise DumeError(f"{moe_dir} is a {recipe['method']} model (trained router steps: "
                        f"{recipe.get('trained_steps', 0)}); only {SOLVERS} routers are a closed-form function of "
                        "the statistics and can be re-solved")
    if len(recipe["experts"]) != len(recipe["domains"]):
        raise DumeError(f"{path}: {len(recipe['experts'])} experts for {len(recipe['domains'])} domains")
    return resolve_recipe_paths(recipe, moe_dir)


def open_dume(moe_dir: str | Path) -> DumeModel:
    """Check that `moe_dir` is a DUME MoE whose stored statistics belong to it."""
    from dume.checkpoint.experts import shared_weights_fingerprint
    from dume.moe.edit import num_experts, open_moe

    moe_dir, config, _ = open_moe(moe_dir)  # any MoE architecture of dume.arch.table
    recipe = read_recipe(moe_dir)
    if len(recipe["domains"]) != num_experts(config):
        raise DumeError(f"{moe_dir}: the recipe names {len(recipe['domains'])} domains, the checkpoint has "
                        f"{num_experts(config)} experts")
    stats = RidgeStats.load(moe_dir / STATS_SUBDIR)
    if stats.domains != recipe["domains"]:
        raise DumeError(f"{moe_dir}: statistics hold domains {stats.domains}, the recipe {recipe['domains']}")
    if (stats.num_layers, stats.hidden_size) != (config.num_hidden_layers, config.hidden_size):
        raise DumeError(f"{moe_dir}: statistics are for {stats.num_layers} layers × hidden {stats.hidden_size}, "
                        f"the model has {config.num_hidden_layers} × {config.hidden_size}")
    fingerprint = shared_weights_fingerprint(moe_dir)
    check_fingerprint(stats, fingerprint, f"{moe_dir / STATS_SUBDIR}", str(moe_dir))
    return DumeModel(moe_dir, config, recipe, stats, fingerprint)


def check_fingerprint(stats: RidgeStats, fingerprint: str, what: str, model: str) -> None:
    if stats.model_fingerprint != fingerprint:
        raise DumeError(f"the statistics in {what} were collected on another model (fingerprint "
                        f"{stats.model_fingerprint}) than {model} ({fingerprint}): their sums cannot be combined "
                        "with this model's")


def solve_gates(stats: RidgeStats, recipe: dict) -> list[torch.Tensor]:
    """The router of `recipe["method"]` from the statistics, as MoE gate weights."""
    from dume.routers.registry import GateContext, make_gates

    return make_gates(recipe["method"], stats, GateContext(
        num_layers=stats.num_layers, num_experts=len(stats.domains), hidden_size=stats.hidden_size,
        lam=recipe["lambda"], temperature=recipe["temperature"],
        relative_lambda=bool(recipe.get("relative_lambda", False))))


def check_output(out_dir: str | Path, inputs: Sequence[str | Path], overwrite: bool) -> Path:
    """Refuse an output that is, contains or lies inside an input, or exists (without `overwrite`): edits always
    write a new model and keep the old one."""
    from dume.checkpoint.outputs import check_output_path, check_writable_location

    out = check_output_path(out_dir, inputs, "output")
    check_writable_location(out)
    if out.exists() and not overwrite:
        raise DumeError(f"{out} exists; pass --overwrite to replace it")
    return out


def collect_into(model, stats: RidgeStats, domain: str, docs: Sequence[str], tokenizer, settings: DataSettings,
                 shard: Shard = Shard()) -> int:
    """Add this process's share of `domain`'s documents into `stats`, then sum the statistics of all processes.
    Returns the tokens counted per layer, over all processes.

    With several processes the whole of `stats` is summed, so it must hold nothing but this collection. A failure
    in one process must not leave the others waiting in the all-reduce, so each process reports success first
    and all of them raise if any failed."""
    from dume.stats.oracle import collect_domain
    from dume.text.batches import document_batches

    mine = my_share(docs, shard)
    error = None
    if mine:
        try:
            batches = document_batches(mine, tokenizer, settings.seq_len, settings.batch_size)
            collect_domain(model, stats, domain, batches, stats.num_dume_tokens)
        except DumeError as e:
            error = str(e)
    failed = torch.tensor([1.0 if error else 0.0], device=stats.device)
    all_reduce_sum([failed], shard)
    if failed.item() > 0:
        raise DumeError(error or f"another process failed while collecting {domain!r} (see its message)")
    j = stats.domains.index(domain)
    all_reduce_sum([stats.A, stats.s, stats.n], shard)
    counted = int(stats.n[0, j])
    if counted == 0:
        raise DumeError(f"domain {domain!r} gave no tokens for the DUME statistics")
    return counted


def stored_settings(moe_dir: Path) -> tuple[dict, int | None]:
    """(provenance, num_dume_tokens) of the statistics stored with a MoE, if it has any."""
    if not (moe_dir / STATS_SUBDIR / "stats.json").is_file():
        return {}, None
    stats = RidgeStats.load(moe_dir / STATS_SUBDIR)
    return {k: stats.extra_meta.get(k) for k in PROVENANCE_KEYS if k in stats.extra_meta}, stats.num_dume_tokens


def moe_domains(moe_dir: Path, config) -> list[str]:
    """The MoE's expert domains, in slot order: from its recipe, else from its config."""
    if (moe_dir / RECIPE_FILE).is_file():
        return list(read_json(moe_dir / RECIPE_FILE).get("domains", []))
    domains = getattr(config, "dume_domains", None)
    if not domains:
        raise DumeError(f"{moe_dir} names no domains (no {RECIPE_FILE}, no dume_domains in its config)")
    return list(domains)


@dataclass
class CollectPlan:
    """Everything `collect_stats` needs, checked before any forward pass."""

    moe_dir: Path
    domain: str
    expert: int | Path  # a slot of the MoE, or a new expert's checkpoint
    settings: DataSettings
    num_dume_tokens: int | None
    tokenizer: Any
    docs: list[str]
    fingerprint: str
    notes: list[str]


def plan_collect(moe_dir: str | Path, domain: str, expert_dir: str | Path | None = None,
                 num_dume_tokens: int | None = None, **given) -> CollectPlan:
    """Check a collection of one domain's statistics: the MoE, the expert (its own slot, or a new checkpoint that
    must fit the MoE), the tokenizer and the data. The settings default to those of the MoE's stored
    statistics, so the sums are comparable."""
    from dume.checkpoint.experts import shared_weights_fingerprint
    from dume.moe.edit import check_expert_fits_moe, open_moe
    from dume.train.models import check_tokenizer_matches

    moe_dir, config, _ = open_moe(moe_dir)  # any MoE architecture of dume.arch.table
    domains = moe_domains(moe_dir, config)
    notes: list[str] = []
    if expert_dir is None:
        if domain not in domains:
            raise DumeError(f"{moe_dir} has no expert for domain {domain!r} (its domains: {domains}); "
                            "for a new expert pass its checkpoint with --expert")
        expert: int | Path = domains.index(domain)
    else:
        if domain in domains:
            raise DumeError(f"{domain!r} is already expert {domains.index(domain)} of {moe_dir}; "
                            "leave out --expert to collect through that expert's own MLPs")
        notes += check_expert_fits_moe(moe_dir, expert_dir)
        expert = Path(expert_dir)
    provenance, stored_tokens = stored_settings(moe_dir)
    if num_dume_tokens is None:
        num_dume_tokens = stored_tokens
    elif provenance and num_dume_tokens != stored_tokens:
        raise DumeError(f"--num-dume-tokens {num_dume_tokens}: the MoE's statistics count "
                        f"{stored_tokens or 'all'} tokens per document, so the sums would not combine")
    settings = settings_from(provenance, **given)
    tokenizer = load_tokenizer_for(moe_dir, settings)
    check_tokenizer_matches(config, tokenizer, where=str(moe_dir))
    if provenance.get("tokenizer") and provenance["tokenizer"] != vocab_fingerprint(tokenizer):
        raise DumeError(f"the tokenizer {settings.tokenizer or moe_dir} differs from the one the MoE's statistics "
                        f"were collected with ({vocab_fingerprint(tokenizer)} != {provenance['tokenizer']})")
    docs = training_documents(domain, settings)
    return CollectPlan(moe_dir, domain, expert, settings, num_dume_tokens, tokenizer, docs,
                       shared_weights_fingerprint(moe_dir), notes)


def collect_stats(plan: CollectPlan, shard: Shard | None = None) -> RidgeStats:
    """One domain's statistics through "the MoE's shared weights + that expert's MLPs", from only the MoE (and the
    new expert) and the domain's data: what an owner computes alone. Under `accelerate launch` every process
    gets the summed result."""
    from dume.moe.edit import build_dense_from_moe

    shard = shard or current_shard()
    model = build_dense_from_moe(plan.moe_dir, plan.expert).to(shard.device)
    mlp = mlp_fingerprint(plan.moe_dir, plan.expert) if isinstance(plan.expert, int) else mlp_fingerprint(plan.expert)
    provenance = plan.settings.provenance(vocab_fingerprint(plan.tokenizer))
    cfg = model.config
    stats = RidgeStats(cfg.num_hidden_layers, cfg.hidden_size, [plan.domain], model_fingerprint=plan.fingerprint,
                       num_dume_tokens=plan.num_dume_tokens, data_source=f"{plan.settings.source}:train",
                       extra_meta={**provenance, "per_domain": {plan.domain: {
                           **provenance, "expert_mlp": mlp, "processes": shard.world}}}, device=shard.device)
    collect_into(model, stats, plan.domain, plan.docs, plan.tokenizer, plan.settings, shard)
    return stats


def _history(recipe: dict, entry: dict) -> list[dict]:
    return [*recipe.get("history", []), entry]


def _moe_extra(recipe: dict) -> dict:
    """Config attributes that say which experts a MoE holds (as the strategies script writes)."""
    return {"dume_domains": list(recipe["domains"]), "dume_experts": list(recipe["experts"])}


def _write_dume(tmp: Path, stats: RidgeStats, recipe: dict) -> None:
    stats.save(tmp / STATS_SUBDIR)
    write_recipe(tmp, recipe)  # tmp is a sibling of the output: the same relative paths


def _with_experts(stats: RidgeStats, recipe: dict) -> RidgeStats:
    stats.extra_meta["experts"] = [str(e) for e in recipe["experts"]]
    return stats


def shared_drift(moe_dir: str | Path, expert_dir: str | Path) -> float:
    """‖expert's non-MLP weights − the MoE's shared ones‖ / ‖the MoE's shared ones‖ (all tensors together): how
    much of the new expert keep-shared mode leaves out."""
    from dume.arch.table import is_routed
    from dume.checkpoint.reader import CheckpointReader

    num = den = 0.0
    with CheckpointReader(moe_dir) as moe, CheckpointReader(expert_dir) as rd:
        for n in moe.keys():
            if is_routed(n) or n not in rd:
                continue
            a, b = moe.get(n).double(), rd.get(n).double()
            num += float((b - a).pow(2).sum())
            den += float(a.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


def _check_new_domain(old: DumeModel, domain: str, expert_dir: str | Path) -> list[str]:
    from dume.moe.edit import check_expert_fits_moe

    if not domain:
        raise DumeError("the new domain needs a name")
    if domain in old.domains:
        raise DumeError(f"{old.path} already has an expert for {domain!r} (expert {old.index(domain)})")
    return check_expert_fits_moe(old.path, expert_dir)


def _check_given_stats(stats: RidgeStats, old: DumeModel, domain: str, expert_dir: Path, where: str) -> None:
    """Statistics computed apart must be of this domain, through this MoE's shared weights and the new expert's
    MLPs, with the stored statistics' token rule and tokenizer."""
    if stats.domains != [domain]:
        raise DumeError(f"{where} holds domains {stats.domains}, expected only [{domain!r}]")
    check_fingerprint(stats, old.fingerprint, where, str(old.path))
    if stats.num_dume_tokens != old.stats.num_dume_tokens:
        raise DumeError(f"{where} counts {stats.num_dume_tokens or 'all'} tokens per document, the MoE's statistics "
                        f"{old.stats.num_dume_tokens or 'all'}")
    prov = domain_provenance(stats)[domain]
    if prov.get("expert_mlp") and prov["expert_mlp"] != mlp_fingerprint(expert_dir):
        raise DumeError(f"{where} was collected through other MLPs than those of {expert_dir} "
                        f"({prov['expert_mlp']} != {mlp_fingerprint(expert_dir)})")


def add_keep_shared(old: DumeModel, expert_dir: Path, domain: str, out_dir: Path, new_stats: RidgeStats,
                    notes: list[str]) -> dict:
    """New MoE = the old one's tensors + the new expert's MLPs as expert D; statistics = stored + new; routers
    re-solved. Shared weights stay the old average."""
    from dume.moe.edit import write_moe_experts

    stats, more = combine_stats([old.stats, new_stats])
    shared_of = old.recipe.get("shared_average_of", old.recipe["experts"])
    recipe = {**old.recipe, "domains": [*old.domains, domain], "experts": [*old.recipe["experts"], str(expert_dir)],
              "mode": "keep-shared", "shared_average_of": shared_of,
              "history": _history(old.recipe, {"op": "add", "mode": "keep-shared", "domain": domain,
                                               "expert": str(expert_dir), "from": str(old.path)})}
    stats = _with_experts(stats, recipe)
    gates = solve_gates(stats, recipe)
    with atomic_dir(out_dir) as tmp:
        write_moe_experts(old.path, [*range(len(old.domains)), expert_dir], tmp, gates, recipe["k"], _moe_extra(recipe))
        _write_dume(tmp, stats, recipe)
    return {"mode": "keep-shared", "out": str(out_dir), "domains": recipe["domains"], "shared_average_of": shared_of,
            "new_expert_shared_drift": shared_drift(old.path, expert_dir), "notes": notes + more}


def add_reaverage(old: DumeModel, expert_dir: Path, domain: str, out_dir: Path, new_settings: DataSettings,
                  log: Callable[[str], None] = print) -> dict:
    """MoErge all D+1 experts from scratch (shared weights re-averaged) and re-collect every domain: what building
    DUME from all of them at once gives. Needs every expert's checkpoint and every domain's data, with the
    settings their statistics were made with."""
    from dume.checkpoint.experts import check_experts, shared_weights_fingerprint
    from dume.moe.merge import build_oracle_model, moerge_experts, shared_state_dict
    from dume.train.models import check_tokenizer_matches

    experts = [Path(e) for e in old.recipe["experts"]] + [expert_dir]
    for i, e in enumerate(experts[:-1]):
        if not e.is_dir():
            raise DumeError(f"the recipe of {old.path} names expert {i} ({old.domains[i]!r}) at {e}, which does not "
                            "exist: re-averaging needs every expert's checkpoint (use keep-shared mode, or restore it)")
    es = check_experts(experts, require_moe_compatible=True)
    for i, e in enumerate(experts[:-1]):
        if mlp_fingerprint(e) != mlp_fingerprint(old.path, i):
            raise DumeError(f"the recipe names {e} as expert {i} ({old.domains[i]!r}), but its MLPs differ from "
                            f"expert {i} of {old.path}: was it retrained or replaced?")
    domains = [*old.domains, domain]
    provs = domain_provenance(old.stats)
    # A domain whose statistics record no corpus source (a `dume build` MoE: its documents came from the files its
    # YAML named) is read with the settings given for this call, so `--source local --data-dir DIR` holding every
    # domain re-collects them all.
    settings = {d: settings_from(provs[d], tokenizer=new_settings.tokenizer) if provs[d].get("source")
                else new_settings for d in old.domains}
    settings[domain] = new_settings
    tokenizer = load_tokenizer_for(old.path, new_settings)
    check_tokenizer_matches(es.config, tokenizer, where=str(experts[0]))
    tok_fp = vocab_fingerprint(tokenizer)
    docs = {d: training_documents(d, settings[d]) for d in domains}  # every domain's data before any forward

    shared = shared_state_dict(experts)
    device = current_shard().device  # one process here: the GPU if there is one
    per_domain = {d: {**settings[d].provenance(tok_fp), "expert_mlp": mlp_fingerprint(e), "processes": 1}
                  for d, e in zip(domains, experts)}
    top = {k: old.stats.extra_meta.get(k) for k in PROVENANCE_KEYS if k in old.stats.extra_meta}
    stats = RidgeStats(es.config.num_hidden_layers, es.config.hidden_size, domains,
                       model_fingerprint=shared_weights_fingerprint(shared), num_dume_tokens=old.stats.num_dume_tokens,
                       data_source=old.stats.data_source, extra_meta={**top, "per_domain": per_domain}, device=device)
    for i, d in enumerate(domains):
        model = build_oracle_model(experts, i, shared=shared).to(device)
        n = collect_into(model, stats, d, docs[d], tokenizer, settings[d], Shard(device=device))
        log(f"statistics {d}: {n} tokens per layer")
    for d, w in old.recipe.get("domain_weights", {}).items():  # re-weighting survives re-collection
        stats = stats.scale_domain(d, w)
    recipe = {**old.recipe, "domains": domains, "experts": [str(e) for e in experts], "mode": "reaverage",
              "shared_average_of": [str(e) for e in experts],
              "history": _history(old.recipe, {"op": "add", "mode": "reaverage", "domain": domain,
                                               "expert": str(expert_dir), "from": str(old.path)})}
    stats = _with_experts(stats, recipe)
    gates = solve_gates(stats, recipe)
    with atomic_dir(out_dir) as tmp:
        # moerge_experts writes atomically to a path, here the empty staging directory, which it replaces, so
        # stats and recipe still land in the same rename.
        moerge_experts(experts, tmp, gates=gates, num_experts_per_tok=recipe["k"], extra_config=_moe_extra(recipe))
        _write_dume(tmp, stats, recipe)
    return {"mode": "reaverage", "out": str(out_dir), "domains": domains,
            "shared_average_of": recipe["shared_average_of"], "notes": list(es.notes)}


def add_expert(moe_dir: str | Path, expert_dir: str | Path, domain: str, out_dir: str | Path, mode: str, *,
               stats_dir: str | Path | None = None, overwrite: bool = False,
               log: Callable[[str], None] = print, **given) -> dict:
    """Add `expert_dir` (a dense Llama) as the expert of `domain` (the two modes: module docstring). `stats_dir`:
    the new domain's statistics computed apart (keep-shared only); `given`: its DataSettings fields."""
    if mode not in MODES:
        raise DumeError(f"unknown mode {mode!r}: choose {' or '.join(MODES)}")
    old = open_dume(moe_dir)
    expert_dir = Path(expert_dir)
    notes = _check_new_domain(old, domain, expert_dir)
    out_dir = check_output(out_dir, [old.path, expert_dir, *([stats_dir] if stats_dir else [])], overwrite)
    if mode == "reaverage":
        if stats_dir is not None:
            raise DumeError("--stats is for keep-shared mode: re-averaging changes the shared weights, so every "
                            "domain is re-collected through the new ones")
        provenance = {k: old.stats.extra_meta.get(k) for k in PROVENANCE_KEYS if k in old.stats.extra_meta}
        return add_reaverage(old, expert_dir, domain, out_dir, settings_from(provenance, **given), log)
    if stats_dir is not None:
        new_stats = RidgeStats.load(stats_dir)
        _check_given_stats(new_stats, old, domain, expert_dir, str(stats_dir))
    else:
        plan = plan_collect(old.path, domain, expert_dir, old.stats.num_dume_tokens, **given)
        notes += plan.notes
        new_stats = collect_stats(plan, Shard(device=current_shard().device))
        log(f"statistics {domain}: {int(new_stats.n[0, 0])} tokens per layer")
    return add_keep_shared(old, expert_dir, domain, out_dir, new_stats, notes)


def remove_expert(moe_dir: str | Path, domain: str, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    """The MoE without `domain`'s expert and statistics, routers re-solved: exactly DUME built from the other
    experts' statistics with the same shared weights. No forward."""
    from dume.moe.edit import write_moe_experts

    old = open_dume(moe_dir)
    j = old.index(domain)
    if len(old.domains) == 1:
        raise DumeError(f"cannot remove {domain!r}: it is the last expert of {old.path}, and a MoE needs one")
    out_dir = check_output(out_dir, [old.path], overwrite)
    keep = [i for i in range(len(old.domains)) if i != j]
    notes = []
    k = old.recipe["k"]
    if k > len(keep):
        notes.append(f"k lowered from {k} to {len(keep)}: only {len(keep)} experts are left")
        k = len(keep)
    weights = {d: w for d, w in old.recipe.get("domain_weights", {}).items() if d != domain}
    recipe = {**old.recipe, "domains": [old.domains[i] for i in keep],
              "experts": [old.recipe["experts"][i] for i in keep], "k": k, "mode": "remove",
              "history": _history(old.recipe, {"op": "remove", "domain": domain, "from": str(old.path)})}
    if "domain_weights" in old.recipe:
        recipe["domain_weights"] = weights
    stats = old.stats.remove_domain(domain)
    per_domain = domain_provenance(old.stats)
    stats.extra_meta["per_domain"] = {d: per_domain[d] for d in recipe["domains"]}
    stats = _with_experts(stats, recipe)
    gates = solve_gates(stats, recipe)
    with atomic_dir(out_dir) as tmp:
        write_moe_experts(old.path, keep, tmp, gates, k, _moe_extra(recipe))
        _write_dume(tmp, stats, recipe)
    return {"mode": "remove", "out": str(out_dir), "domains": recipe["domains"], "removed": domain, "notes": notes}


def parse_weights(text: str) -> dict[str, float]:
    """"code=2,math=0.5" -> {"code": 2.0, "math": 0.5}, refusing malformed or non-positive weights."""
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not sep or not name.strip() or not math.isfinite(w) or w <= 0:
            raise DumeError(f"bad weight {item!r}: expected DOMAIN=W with W > 0 (to drop a domain, use remove)")
        if name.strip() in out:
            raise DumeError(f"domain {name.strip()!r} is weighted twice")
        out[name.strip()] = w
    if not out:
        raise DumeError("no weights given: expected e.g. code=2,math=0.5")
    return out


def reweight_domains(moe_dir: str | Path, weights: dict[str, float], out_dir: str | Path, *,
                     overwrite: bool = False) -> dict:
    """Same experts, each listed domain's statistics scaled by its weight, routers re-solved."""
    from dume.moe.edit import write_moe_experts

    old = open_dume(moe_dir)
    for d in weights:
        old.index(d)
    out_dir = check_output(out_dir, [old.path], overwrite)
    stats = old.stats
    cumulative = dict(old.recipe.get("domain_weights", {}))
    for d, w in weights.items():
        stats = stats.scale_domain(d, w)
        cumulative[d] = cumulative.get(d, 1.0) * w
    recipe = {**old.recipe, "mode": "reweight", "domain_weights": cumulative,
              "history": _history(old.recipe, {"op": "reweight", "weights": weights, "from": str(old.path)})}
    gates = solve_gates(stats, recipe)
    with atomic_dir(out_dir) as tmp:
        write_moe_experts(old.path, range(len(old.domains)), tmp, gates, recipe["k"], _moe_extra(recipe))
        _write_dume(tmp, stats, recipe)
    return {"mode": "reweight", "out": str(out_dir), "domains": recipe["domains"], "domain_weights": cumulative,
            "notes": []}


def describe(summary: dict) -> list[str]:
    """Plain lines saying what an operation did: which mode, and what it means for the shared weights."""
    mode, out = summary["mode"], summary["out"]
    lines = []
    if mode == "keep-shared":
        lines.append(f"mode: keep-shared (exact and cheap) -> {out}")
        lines.append("the shared (non-MLP) weights are the OLD average, of "
                     f"{len(summary['shared_average_of'])} experts; the new expert's own attention, norms and "
                     f"embeddings are not averaged in (they differ from the shared ones by "
                     f"{100 * summary['new_expert_shared_drift']:.1f}% relative L2); only its MLPs were added")
        lines.append("statistics: stored + the new domain's; every router re-solved")
    elif mode == "reaverage":
        lines.append(f"mode: reaverage (what building from scratch gives) -> {out}")
        lines.append(f"the shared weights were re-averaged over all {len(summary['domains'])} experts and every "
                     "domain's statistics re-collected through them; every router re-solved")
    elif mode == "remove":
        lines.append(f"removed {summary['removed']!r}: its expert MLPs and its statistics dropped, routers re-solved, "
                     f"no forward pass; shared weights unchanged -> {out}")
    else:
        lines.append(f"re-weighted {summary['domain_weights']}: statistics scaled, routers re-solved, "
                     f"experts and shared weights unchanged -> {out}")
    lines.append(f"experts: {summary['domains']}")
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return lines


__all__ = ["DataSettings", "DumeModel", "Shard", "CollectPlan", "MODES", "RECIPE_FILE", "STATS_SUBDIR",
           "add_expert", "remove_expert", "reweight_domains", "combine_stats", "plan_collect", "collect_stats",
           "collect_into", "open_dume", "solve_gates", "mlp_fingerprint", "domain_provenance", "parse_weights",
           "settings_from", "current_shard", "describe", "shared_drift"]
