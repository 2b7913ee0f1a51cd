"""`dume build CONFIG.yaml`: DUME on your own experts, from a small YAML.

    experts:                 # two or more; any names
      - name: law
        model: path/or/hub-id
        data: path/or/hub-dataset   # .txt/.jsonl/.json/.parquet file or folder, or a hub dataset id
        # optional: split (train), field (text), max_docs
    gate: dume               # dume | sequential_balanced | centroid | random
    k: 1
    lambda: 0.01
    temperature: 1.0
    num_dume_tokens: null    # all tokens of each document
    dtype: auto              # auto | float32 | bfloat16 (the forward passes of the collection)
    out: path/to/moe
    # optional: seq_len (1024), batch_size (8), held_out (0.05), seed (0), device (auto),
    #           max_shard_size (5GB: the largest safetensors file written)

Everything is checked before heavy work (keys and values, the experts' compatibility,
each expert's data). Then each domain's documents go through its oracle (averaged shared
weights + that expert's MLPs) to collect the ridge statistics (`dume.collect`), the
routers are solved (`dume.strategies`), the experts are MoErged with them in one streamed
pass (`dume.merge`), and `out` receives -- in one atomic rename -- a standard checkpoint of the experts' MoE class, the
statistics (`dume_stats/`), the recipe (`dume_router.json`, so `dume_experts.py
add/remove/reweight` work on it) and a model card (`README.md`) with the per-domain
routing shares measured on held-out documents.

Text files hold one document per blank-line-separated paragraph; JSON Lines / JSON /
Parquet records give their `field`. A domain's held-out documents (the last `held_out`
fraction, at most 64) are not used for the statistics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .devices import check_device, resolve_device
from .errors import DumeError
from .shards import DEFAULT_MAX_SHARD_BYTES, parse_size

# `gate:` values and the registered strategies they are (dume.strategies).
# `sequential_balanced` is the routers study's verdict (reproduction/clm/ROUTERS.md): the one
# stock-checkpoint router that beat DUME on every seed of both domain sets. DUME stays the
# default: the margin on the held-out set was 0.1 points (1 % of the gap to the oracle).
GATES = {"dume": "DUME", "sequential_balanced": "DUME_sequential_balanced", "centroid": "centroid",
         "random": "random_routing"}
DTYPES = ("auto", "float32", "bfloat16")
TOP_KEYS = {"experts", "gate", "k", "lambda", "temperature", "num_dume_tokens", "dtype", "out", "seq_len",
            "batch_size", "held_out", "seed", "device", "max_shard_size"}
EXPERT_KEYS = {"name", "model", "data", "split", "field", "max_docs"}
MAX_HELD_OUT = 64
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    model: str
    data: str
    split: str = "train"
    field: str = "text"
    max_docs: int | None = None


@dataclass(frozen=True)
class BuildSpec:
    experts: tuple[ExpertSpec, ...]
    out: Path
    gate: str = "dume"
    k: int = 1
    lam: float = 0.01
    temperature: float = 1.0
    num_dume_tokens: int | None = None
    dtype: str = "auto"
    seq_len: int = 1024
    batch_size: int = 8
    held_out: float = 0.05
    seed: int = 0
    device: str = "auto"
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES
    source: Path | None = field(default=None, compare=False)


def _int(where: str, v, minimum: int = 1, allow_none: bool = False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise DumeError(f"{where} must be an integer >= {minimum}{' or null' if allow_none else ''}, got {v!r}")
    return v


def _positive(where: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise DumeError(f"{where} must be a positive number, got {v!r}")
    return float(v)


def _local(value: str, base: Path) -> str:
    """A path relative to the config file's folder when it exists there; else as given
    (an absolute path, or a hub id)."""
    p = Path(value).expanduser()
    q = p if p.is_absolute() else base / p
    return str(q) if q.exists() else value


def parse_spec(raw, source: Path | None = None) -> BuildSpec:
    """A checked BuildSpec from the YAML's mapping: unknown keys and bad values are one
    clear error each."""
    where = str(source) if source else "the build config"
    if not isinstance(raw, dict):
        raise DumeError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise DumeError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TOP_KEYS))}")
    for key in ("experts", "out"):
        if key not in raw:
            raise DumeError(f"{where}: missing {key!r}")
    base = source.parent if source else Path.cwd()
    experts_raw = raw["experts"]
    if not isinstance(experts_raw, list) or len(experts_raw) < 2:
        raise DumeError(f"{where}: 'experts' must be a list of two or more experts")
    experts = []
    for i, e in enumerate(experts_raw):
        label = f"{where}: experts[{i}]"
        if not isinstance(e, dict):
            raise DumeError(f"{label} must be a mapping with name, model, data")
        bad = sorted(set(e) - EXPERT_KEYS)
        if bad:
            raise DumeError(f"{label}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(EXPERT_KEYS))}")
        for key in ("name", "model", "data"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise DumeError(f"{label}: {key!r} must be a non-empty string")
        for key in ("split", "field"):
            if key in e and (not isinstance(e[key], str) or not e[key]):
                raise DumeError(f"{label}: {key!r} must be a non-empty string")
        check_name(label, e["name"].strip())
        experts.append(ExpertSpec(name=e["name"].strip(), model=_local(e["model"], base), data=_local(e["data"], base),
                                  split=e.get("split", "train"), field=e.get("field", "text"),
                                  max_docs=_int(f"{label}.max_docs", e.get("max_docs"), allow_none=True)))
    names = [e.name for e in experts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DumeError(f"{where}: expert names must be unique, {', '.join(dup)} repeated")
    gate = raw.get("gate", "dume")
    if gate not in GATES:
        raise DumeError(f"{where}: gate must be one of {', '.join(GATES)}, got {gate!r}")
    k = _int(f"{where}: k", raw.get("k", 1))
    if k > len(experts):
        raise DumeError(f"{where}: k = {k} exceeds the number of experts ({len(experts)})")
    dtype = raw.get("dtype", "auto")
    if dtype not in DTYPES:
        raise DumeError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    held = raw.get("held_out", 0.05)
    if isinstance(held, bool) or not isinstance(held, (int, float)) or not 0 <= held < 1:
        raise DumeError(f"{where}: held_out must be a fraction in [0, 1), got {held!r}")
    try:
        device = check_device(raw.get("device", "auto"))
    except DumeError as e:
        raise DumeError(f"{where}: {e}") from None
    try:
        max_shard_size = parse_size(raw.get("max_shard_size", DEFAULT_MAX_SHARD_BYTES))
    except DumeError as e:
        raise DumeError(f"{where}: {e}") from None
    out = raw["out"]
    if not isinstance(out, str) or not out.strip():
        raise DumeError(f"{where}: 'out' must be a path")
    out_path = Path(out).expanduser()
    out_path = out_path if out_path.is_absolute() else base / out_path
    check_out(where, out_path, experts, source)
    seed = _int(f"{where}: seed", raw.get("seed", 0), minimum=0)
    if seed >= 2**32:
        raise DumeError(f"{where}: seed must be below 2**32 (numpy's and CUDA's limit), got {seed}")
    return BuildSpec(
        experts=tuple(experts), out=out_path, gate=gate, k=k,
        lam=_positive(f"{where}: lambda", raw.get("lambda", 0.01)),
        temperature=_positive(f"{where}: temperature", raw.get("temperature", 1.0)),
        num_dume_tokens=_int(f"{where}: num_dume_tokens", raw.get("num_dume_tokens"), allow_none=True),
        dtype=dtype, seq_len=_int(f"{where}: seq_len", raw.get("seq_len", 1024)),
        batch_size=_int(f"{where}: batch_size", raw.get("batch_size", 8)), held_out=float(held),
        seed=seed, device=device, max_shard_size=max_shard_size,
        source=source)


def check_name(where: str, name: str) -> None:
    """An expert name becomes a domain name (statistics, recipe, config, later edits by
    name): no path separators, no leading dot, no control characters."""
    if "/" in name or "\\" in name or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise DumeError(f"{where}: name {name!r} must not contain '/', '\\' or control characters, nor start "
                        "with '.'; use letters, digits, '-' or '_'")


def check_out(where: str, out: Path, experts, source: Path | None) -> None:
    """`out` must be creatable, and must not be, contain or lie inside anything the build
    reads (a local expert, a data file or folder, the config file itself)."""
    from .outputs import check_output_path, check_writable_location

    inputs = [Path(v) for e in experts for v in (e.model, e.data) if Path(v).exists()]
    if source is not None:
        inputs.append(source)
    try:
        check_writable_location(out, "out")
        check_output_path(out, inputs, "out")
    except DumeError as e:
        raise DumeError(f"{where}: {e}") from None


def load_spec(path: str | os.PathLike) -> BuildSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DumeError(f"build config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DumeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_spec(raw, path.resolve())


# --------------------------------------------------------------------------- documents


def _file_texts(path: Path, fieldname: str) -> list[str]:
    from .io import read_records, read_text

    if path.suffix == ".txt":
        return [t.strip() for t in read_text(path).split("\n\n") if t.strip()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's ArrowInvalid and friends: the file is not Parquet
            raise DumeError(f"{path} is not a readable Parquet file ({type(e).__name__}: {str(e)[:160]}); "
                            "rewrite it or give a .jsonl / .txt file") from None
        if fieldname not in table.column_names:
            raise DumeError(f"{path} has no column {fieldname!r} (columns: {', '.join(table.column_names)})")
        return [str(v) for v in table.column(fieldname).to_pylist() if v]
    out = []
    for i, rec in enumerate(read_records(path)):
        if not isinstance(rec, dict) or fieldname not in rec:
            raise DumeError(f"{path} record {i + 1} has no field {fieldname!r}")
        if rec[fieldname]:
            out.append(str(rec[fieldname]))
    return out


def expert_texts(spec: ExpertSpec) -> tuple[list[str], str]:
    """The expert's documents and where they came from: a local file or folder, else a
    hub dataset (`datasets.load_dataset(data, split=split)[field]`)."""
    p = Path(spec.data)
    if p.is_file() or p.is_dir():
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files or any(f.suffix not in TEXT_SUFFIXES for f in files):
            raise DumeError(f"expert {spec.name}: no readable data in {p} (files ending in {', '.join(TEXT_SUFFIXES)})")
        texts: list[str] = []
        for f in files:
            texts += _file_texts(f, spec.field)
            if spec.max_docs is not None and len(texts) >= spec.max_docs:
                break
        source = f"local:{p}"
    else:
        if p.is_absolute() or spec.data.startswith(".") or spec.data.count("/") > 1:
            raise DumeError(f"expert {spec.name}: data {spec.data} does not exist (and is not a hub dataset id)")
        import datasets

        from .hub import offline, require_hub

        if not offline():  # offline, datasets reads its cache (or fails) at once
            require_hub(f"expert {spec.name}: hub dataset {spec.data}", "give a local file or folder instead")
        try:
            ds = datasets.load_dataset(spec.data, split=spec.split)
        except Exception as e:  # offline, missing, gated: one line
            raise DumeError(f"expert {spec.name}: cannot load hub dataset {spec.data} ({type(e).__name__}: "
                            f"{str(e)[:160]}); give a local file or folder instead") from None
        if spec.field not in ds.column_names:
            raise DumeError(f"expert {spec.name}: {spec.data} has no column {spec.field!r} "
                            f"(columns: {', '.join(ds.column_names)})")
        texts = [str(t) for t in ds[spec.field] if t]
        source = f"hub:{spec.data} ({spec.split})"
    if spec.max_docs is not None:
        texts = texts[: spec.max_docs]
    if not texts:
        raise DumeError(f"expert {spec.name}: no documents in {spec.data}")
    return texts, source


def split_held_out(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(statistics documents, held-out documents): the last `fraction` (at most 64), and
    none when that would leave no statistics document."""
    n = min(MAX_HELD_OUT, int(len(texts) * fraction))
    if n == 0 or n >= len(texts):
        return texts, []
    return texts[:-n], texts[-n:]


# ------------------------------------------------------------------------------- build


def build(spec: BuildSpec, *, overwrite: bool = False, log=print) -> dict:
    """Run the whole build; return the summary written into the model card. `out` is
    locked against a second writer for the whole build (`dume.outputs.output_lock`)."""
    from .outputs import output_lock

    out = Path(spec.out)
    with output_lock(out):  # one writer of `out` from here to the final rename
        if out.exists() and not overwrite:
            raise DumeError(f"{out} exists; pass --overwrite to replace it")
        return _build(spec, out, overwrite, log)


def _build(spec: BuildSpec, out: Path, overwrite: bool, log) -> dict:
    import torch

    from .checkpoints import check_experts
    from .io import atomic_dir, atomic_write_json, atomic_write_text
    from .memory import release_memory
    from .outputs import check_output_path
    from .reasoning import resolve_expert
    from .tokenizer import load_tokenizer

    names = [e.name for e in spec.experts]
    dirs = [resolve_expert(e.model) for e in spec.experts]
    check_output_path(out, dirs, "out")  # hub experts resolve to the cache only now
    es = check_experts(dirs, require_mixtral_compatible=True)
    for n in es.notes:
        log(f"note: {n}")
    for w in es.warnings:
        log(f"warning: {w}")
    if es.tokenizer_dir is None:
        raise DumeError("no expert has tokenizer files: the documents cannot be tokenized")
    docs, held, sources = {}, {}, {}
    for e in spec.experts:  # every expert's data is read before any heavy work
        texts, sources[e.name] = expert_texts(e)
        docs[e.name], held[e.name] = split_held_out(texts, spec.held_out)
        log(f"{e.name}: {len(docs[e.name])} documents for the statistics, {len(held[e.name])} held out "
            f"({sources[e.name]})")
    tokenizer = load_tokenizer(es.tokenizer_dir)
    device = resolve_device(spec.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        spec.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    cfg = es.config
    max_len = min(spec.seq_len, cfg.max_position_embeddings)
    with atomic_dir(out, overwrite=overwrite) as stage:
        log(f"MoErging {len(dirs)} {es.arch.dense_class} experts into a {es.arch.moe_class}")
        stats, counts = build_moe(
            dirs, names, docs, stage, tokenizer, strategy=GATES[spec.gate], k=spec.k, lam=spec.lam,
            temperature=spec.temperature, num_dume_tokens=spec.num_dume_tokens, max_len=max_len,
            batch_size=spec.batch_size, device=device, dtype=dtype, seed=spec.seed,
            max_shard_size=spec.max_shard_size, data_source="dume build",
            extra_meta={"sources": sources, "seq_len": max_len, "stats_batch_size": spec.batch_size},
            expert_set=es, log=log)
        release_memory()
        shares = held_out_routing(stage, held, tokenizer, max_len, spec.batch_size, device, dtype)
        summary = {"experts": [{"name": e.name, "model": e.model, "data": sources[e.name],
                                "documents": len(docs[e.name]), "held_out": len(held[e.name]),
                                "tokens": (counts or {}).get(e.name)} for e in spec.experts],
                   "architecture": f"{es.arch.dense_class} -> {es.arch.moe_class}",
                   "settings": {"gate": spec.gate, "k": spec.k, "lambda": spec.lam,
                                "temperature": spec.temperature, "num_dume_tokens": spec.num_dume_tokens,
                                "seq_len": max_len, "batch_size": spec.batch_size, "dtype": str(dtype),
                                "seed": spec.seed},
                   "routing_shares": shares}
        atomic_write_json(stage / "dume_build.json", summary)
        atomic_write_text(stage / "README.md", model_card(summary, spec))
    log(f"wrote {out}")
    return summary


def build_moe(expert_dirs, domains, docs, out, tokenizer, *, strategy: str = "DUME", k: int = 1, lam: float = 0.01,
              temperature: float = 1.0, num_dume_tokens: int | None = None, max_len: int = 1024,
              batch_size: int = 8, device: str = "cpu", dtype=None, seed: int = 0, relative_lambda: bool = False,
              max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, data_source: str = "", extra_meta: dict | None = None,
              expert_set=None, log=print):
    """The library call under `dume build` and the recipes that build a training-free MoE
    from experts + text: statistics (`dume.collect`, if the strategy needs them), gates
    (`dume.strategies`), one streamed merge with those gates (`dume.merge`), and beside
    the weights the statistics (`dume_stats/`, stamped with the MoE's shared-weight
    fingerprint) and the recipe (`dume_router.json`), so `dume.dynamic` can edit it.

    The statistics need only the oracles (built in memory from the experts), so the
    routers are solved first and the MoE is written once, with them: no intermediate
    checkpoint, no shard rewritten to set the gates -- except for layer-sequential
    statistics, which are collected through the MoE itself, so it is written with zero
    routers first and its routers set afterwards. `out` is written in place (wrap the
    call in `dume.io.atomic_dir`). `expert_set`: the experts' `check_experts` result, when
    the caller has it already. Returns (RidgeStats or None, {domain: tokens})."""
    from .checkpoints import check_experts, model_fingerprint
    from .collect import collect_for
    from .memory import release_memory
    from .merge import moerge_experts
    from .moe_edit import set_gates
    from .recipe import write_recipe
    from .strategies import REGISTRY, GateContext, make_gates

    es = expert_set or check_experts(expert_dirs, require_mixtral_compatible=True)
    entry = REGISTRY[strategy]
    if entry.trains_router or not entry.routed or not entry.stock_checkpoint or entry.needs_prompts:
        raise DumeError(f"{strategy}: build_moe makes training-free stock-checkpoint MoEs from experts and text "
                        "(no router training, no prompts, no custom model class)")
    stats = counts = None
    out = Path(out)
    cfg = es.config
    common = dict(num_dume_tokens=num_dume_tokens, max_len=max_len, batch_size=batch_size, device=device,
                  dtype=dtype, data_source=data_source, extra_meta=extra_meta, log=log)
    context = dict(num_layers=cfg.num_hidden_layers, num_experts=len(expert_dirs), hidden_size=cfg.hidden_size,
                   lam=lam, temperature=temperature, relative_lambda=relative_lambda, seed=seed,
                   expert_dirs=tuple(expert_dirs))
    extra_config = {"dume_domains": list(domains)}
    if entry.needs_statistics and entry.statistics == "sequential":
        # layer-sequential statistics are collected through the MoE itself: write it with
        # zero routers first, then set each solved router in place
        moerge_experts(expert_dirs, out, gates=None, num_experts_per_tok=k, extra_config=extra_config,
                       max_shard_size=max_shard_size, overwrite=True)
        stats, counts = collect_for("sequential", expert_dirs, domains, docs, tokenizer, moe_dir=out, lam=lam,
                                    temperature=temperature, relative_lambda=relative_lambda, k=k, **common)
        set_gates(out, make_gates(strategy, stats, GateContext(**context)))
    else:
        if entry.needs_statistics:
            stats, counts = collect_for(entry.statistics, expert_dirs, domains, docs, tokenizer, **common)
        gates = make_gates(strategy, stats, GateContext(**context))
        moerge_experts(expert_dirs, out, gates=gates, num_experts_per_tok=k, extra_config=extra_config,
                       max_shard_size=max_shard_size, overwrite=True)
    if stats is not None:
        # the sums belong to this MoE's shared weights (those of every oracle)
        stats.model_fingerprint = model_fingerprint(out)
        stats.save(out / "dume_stats")
    write_recipe(out, {"method": strategy, "domains": list(domains), "experts": [str(d) for d in expert_dirs],
                       "lambda": lam, "relative_lambda": relative_lambda, "temperature": temperature, "k": k,
                       "num_dume_tokens": num_dume_tokens, "trained_steps": 0})
    release_memory()
    return stats, counts


def held_out_routing(moe_dir: Path, held: dict[str, list[str]], tokenizer, max_len: int, batch_size: int,
                     device: str, dtype) -> dict | None:
    """{domain: {"own": share of its held-out tokens routed to its own expert (mean over
    layers), "per_layer": [[share per expert] per layer]}}; None without held-out text.

    The only step that holds the whole MoE in memory, filled one tensor at a time
    (`moe_edit.load_moe_streamed`: transformers' own loading peaks at twice the MoE);
    `held_out: 0` skips it."""
    import torch

    from .data import document_batches
    from .moe_edit import load_moe_streamed
    from .routing import routing_accuracy, routing_shares

    if not any(held.values()):
        return None
    model = load_moe_streamed(moe_dir, dtype).to(device)
    blocks = {}
    for d, texts in held.items():
        batches = list(document_batches(texts, tokenizer, max_len, batch_size))
        if batches:
            width = max(b[0].shape[1] for b in batches)
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
            blocks[d] = (torch.cat([pad(b[0]) for b in batches]), torch.cat([pad(b[1]) for b in batches]))
    shares = routing_shares(model, blocks, batch_size)
    own = routing_accuracy(shares, {d: i for i, d in enumerate(held)})
    return {d: {"own": sum(own[d]) / len(own[d]), "per_layer": s} for d, s in shares.items()}


def model_card(summary: dict, spec: BuildSpec) -> str:
    s = summary["settings"]
    lines = ["---", "library_name: transformers", "tags: [moe, dume, merge]", "---", "",
             f"# DUME MoE of {len(summary['experts'])} experts", "",
             f"Built with `dume build` ({summary['architecture']}): the experts' MLPs became the experts of "
             "every layer, their other weights were averaged, and the routers were set "
             + {"dume": "by DUME's closed-form ridge regression on each expert's text (no training).",
                "sequential_balanced": "by DUME's closed-form ridge regression on each expert's text, collected "
                                       "layer by layer through the routed MoE with each domain weighted equally "
                                       "(no training).",
                "centroid": "to the normalised mean hidden state of each expert's text (no training).",
                "random": "at random (a baseline)."}[s["gate"]], "",
             "| expert | model | data | documents | held out | tokens |", "|---|---|---|---:|---:|---:|"]
    for e in summary["experts"]:
        lines.append(f"| {e['name']} | `{e['model']}` | `{e['data']}` | {e['documents']} | {e['held_out']} | "
                     f"{e['tokens'] if e['tokens'] is not None else '—'} |")
    lines += ["", "Settings: " + ", ".join(f"{k} = {v}" for k, v in s.items()), ""]
    shares = summary.get("routing_shares")
    if shares:
        lines += ["Routing on held-out documents: the share of each domain's tokens whose top-1 expert is its own "
                  "(mean over layers).", "", "| domain | own expert |", "|---|---:|"]
        lines += [f"| {d} | {v['own']:.1%} |" for d, v in shares.items()]
    else:
        lines.append("No held-out documents: routing shares not measured.")
    lines += ["", "Load it with `transformers.AutoModelForCausalLM.from_pretrained(path)`. `dume_stats/` and "
              "`dume_router.json` let `dume_experts.py` add, remove or re-weight an expert without retraining.", ""]
    return "\n".join(lines)
