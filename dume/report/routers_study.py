"""The routers study's report (reproduction/clm/ROUTERS.md): every training-free router on the same experts,
per domain set, mean ± std over seeds, with the share of the model averaging → oracle gap that each closes,
routing accuracy, cost, and a verdict computed from the numbers (never written by hand). Gap closed, per seed:
100 · (avg(row) − avg(model averaging)) / (avg(oracle) − avg(model averaging)), on the normalised averages.
"""

from __future__ import annotations

from pathlib import Path

from dume.checkpoint.io import read_json
from dume.report.multiseed import fmt, mean_std, result_scores, seed_table
from dume.routers import mergekit_moe
from dume.routers.registry import REGISTRY
from dume.train.perplexity import gap_closed

BASELINES = ("model_averaging", "oracle")


def stock(name: str) -> bool:
    """Does this row's model load as a stock transformers MoE checkpoint? (A peer's: a stock Mixtral.)"""
    return REGISTRY[name].stock_checkpoint if name in REGISTRY else True


def reads(name: str) -> str:
    """What a row's router is computed from."""
    if mergekit_moe.is_peer(name):
        return mergekit_moe.reads(name)
    s = REGISTRY.get(name)
    if s is None or not s.routed:
        return "—"
    if s.needs_statistics:
        return {"dume": "statistics", "loss_aware": "statistics + experts' losses",
                "sequential": "statistics, layer by layer"}[s.statistics]
    if s.needs_prompts:
        return "base model + 8 prompts"
    return "expert weights" if not s.seeded else "a seed"


def set_summary(seed_dirs: dict[int, Path], rows, timings: dict[str, float] | None = None, label: str = "",
                forward: dict[str, float] | None = None) -> dict:
    """Per row: per-domain and average scores (mean ± std), gap closed, routing accuracy (mean over layers and
    seeds), seconds per seed, and the per-seed averages."""
    tables = {s: seed_table(d) for s, d in seed_dirs.items()}
    domains = next(iter(tables.values()))["domains"]
    out = {"domains": domains, "seeds": sorted(tables), "rows": {}}
    for name in rows:
        have = {s: row for s, t in tables.items() if (row := _scores(t, seed_dirs[s], name)) is not None}
        if len(have) != len(tables):
            continue
        per_seed_avg = {s: r["average"] for s, r in have.items()}
        gaps = [gap_closed(per_seed_avg[s], tables[s]["methods"]["model_averaging"]["average"],
                           tables[s]["methods"]["oracle"]["average"]) for s in have]
        per_seed_accuracy = [read_json(p).get("routing_accuracy") or {} for p in
                             (Path(run) / "results" / f"{mergekit_moe.result_stem(name)}.json"
                              for run in seed_dirs.values()) if p.is_file()]
        accuracy = {}
        for d in domains:
            vals = [sum(acc[d]) / len(acc[d]) for acc in per_seed_accuracy if d in acc]
            accuracy[d] = sum(vals) / len(vals) if vals else None
        secs = [timings.get(f"{label} seed{s} {name}") for s in have] if timings else []
        secs = [t for t in secs if t is not None]
        out["rows"][name] = {
            "per_domain": {d: mean_std([r["normalised"][d] for r in have.values()]) for d in domains},
            "average": mean_std(per_seed_avg.values()), "per_seed_average": per_seed_avg,
            "gap_closed": mean_std(gaps), "routing_accuracy": accuracy,
            "seconds": sum(secs) / len(secs) if secs else None, "forward_vs_dume": (forward or {}).get(name)}
    return out


def _scores(table: dict, run_dir, name: str) -> dict | None:
    """One seed's {normalised, average} of a row: Table 2's, or a peer's from its own (tagged) result file."""
    if not mergekit_moe.is_peer(name):
        return table["methods"].get(name)
    scores = result_scores(Path(run_dir) / "results" / f"{mergekit_moe.result_stem(name)}.json",
                           table["reference_perplexity"])
    return None if scores is None else {"normalised": scores["per_domain"], "average": scores["average"]}


def verdict(summaries: dict[str, dict], default: str = "DUME") -> dict:
    """The stock-checkpoint routers that beat `default` on every seed of every domain set. A peer (another
    tool's output) is compared in the table but is no candidate: `dume build` could not offer it."""
    winners = []
    candidates = [n for n in next(iter(summaries.values()))["rows"]
                  if n not in (*BASELINES, default) and stock(n) and not mergekit_moe.is_peer(n)]
    for name in candidates:
        if all(name in s["rows"] and default in s["rows"] and all(
                s["rows"][name]["per_seed_average"][seed] > s["rows"][default]["per_seed_average"][seed]
                for seed in s["rows"][default]["per_seed_average"]) for s in summaries.values()):
            winners.append(name)
    best = max(winners, key=lambda n: sum(s["rows"][n]["average"]["mean"] for s in summaries.values()),
               default=None)
    return {"default": best or default, "winners": winners}


def peer_section(summaries: dict[str, dict], peers: str | None) -> list[str]:
    """What the mergekit-moe rows are, how they differ from DUME, and how to add them when they were not run."""
    ran = any(mergekit_moe.is_peer(n) for s in summaries.values() for n in s["rows"])
    lines = ["## The real mergekit-moe (a peer)", ""]
    if ran:
        lines += [(f"The `{mergekit_moe.PEER}:<gate mode>@<base>` rows are the real tool ({peers or 'mergekit'}) "
                   "run in a subprocess on the same experts, evaluated like every other row. How they differ "
                   "from DUME's build:"), ""] + [f"- {d}" for d in mergekit_moe.METHOD_DIFFERENCES] + [""]
    else:
        lines += [f"Not run here ({peers or 'no --peers mergekit'})."]
    lines += [("mergekit runs from an install of its own, a venv that keeps its dependencies out of DUME's: "
               f"`{mergekit_moe.VENV_HOWTO}`, then `clm_routers_study.py ... --peers mergekit --mergekit-moe "
               "~/venvs/mergekit/bin/mergekit-moe`."), ""]
    return lines


def markdown(summaries: dict[str, dict], descriptions: dict[str, str], decision: dict, wall: dict,
             peers: str | None = None) -> str:
    lines = ["# Training-free routers (the routers study)", "",
             "Every row is built from the same experts without training (forward passes and closed-form solves "
             "only). Scores are normalised perplexities (own expert = 100), mean ± std over seeds; *gap closed* is "
             "the share of the distance from model averaging to the oracle that the row covers, per seed, then "
             "mean ± std; routing accuracy is the share of a domain's test tokens whose top-1 expert is its own "
             "(mean over layers and seeds); time is the wall time of the row's step (statistics, solve, build, "
             "evaluation), mean over seeds -- rows that share cached statistics (the balanced variants) show only "
             "their own work; forward is the time of one forward pass over the same 8 test blocks relative to "
             "DUME's (first seed, median of 5). Written by `clm_routers_study.py`.", ""]
    for set_name, s in summaries.items():
        domains = s["domains"]
        lines += [f"## Domain set `{set_name}` ({', '.join(domains)}), seeds {', '.join(map(str, s['seeds']))}", "",
                  "| router | reads | stock | " + " | ".join(domains) + " | average | gap closed % | routing accuracy ("
                  + "/".join(domains) + ") | time (s) | forward |",
                  "|---|---|:-:|" + "---:|" * (len(domains) + 5)]
        for name, r in s["rows"].items():
            acc = r["routing_accuracy"]
            acc_cell = "—" if all(v is None for v in acc.values()) else "/".join(
                "—" if acc[d] is None else f"{acc[d]:.2f}" for d in domains)
            fwd = r.get("forward_vs_dume")
            lines.append(f"| {name} | {reads(name)} | {'yes' if stock(name) else 'no'} | "
                         + " | ".join(fmt(r["per_domain"][d]) for d in domains)
                         + f" | **{fmt(r['average'])}** | {fmt(r['gap_closed'], 0)} | {acc_cell} | "
                         + ("—" if r["seconds"] is None else f"{r['seconds']:.0f}") + " | "
                         + ("—" if fwd is None else f"{fwd:.2f}×") + " |")
        lines.append("")
    lines += ["## Rows", ""] + [f"- `{n}`: {d}" for n, d in descriptions.items()] + [""]
    lines += peer_section(summaries, peers)
    if decision["winners"]:
        from dume.upcycle.spec import GATES

        offered = {strategy: name for name, strategy in GATES.items()}.get(decision["default"])
        lines.append(f"**Verdict:** {', '.join(decision['winners'])} beat DUME on every seed of every domain set; "
                     f"the best of them over both sets is {decision['default']}, "
                     + (f"which `dume build` offers as `gate: {offered}`." if offered else
                        "which `dume build` does not offer yet (add it to `dume.upcycle.spec.GATES`)."))
    else:
        lines.append("**Verdict:** no stock-checkpoint router beats DUME on every seed of every domain set; the "
                     "default stays DUME.")
    lines += ["", "Wall time of the study: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()), ""]
    return "\n".join(lines)
