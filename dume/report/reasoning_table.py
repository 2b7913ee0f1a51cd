"""Table 3 from the result files reasoning_eval.py wrote, over every seed found.

Files: RUN_DIR/results/<protocol>/<name>__<task>__seed<S>.json. Scores are normalised per seed --
100·p_d(S)/p̂_d(S), p̂_d(S) the domain's own expert on its task with the same seed -- then given as mean ± std
over the seeds (sample std, ddof = 1, as for Table 2; 0 for one seed). That is how the paper's Table 3 can
show 100.0 ± 0.0 for each expert on its own task while sampling makes every raw score vary. The paper's
Table 3 is printed beside ours (dume.report.paper.TABLE3).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dume.checkpoint.io import atomic_write_json, atomic_write_text, read_json
from dume.errors import DumeError
from dume.reasoning.settings import ROWS as REASONING_ROWS
from dume.reasoning.tasks import DOMAINS, TASKS
from dume.report.multiseed import fmt, mean_std

ROWS = REASONING_ROWS  # dume.reasoning.settings: from the strategy registry
HEADS = {d: t.heading for d, t in TASKS.items()}  # the columns, from the task records
_NAME = re.compile(r"^(?P<name>.+)__(?P<task>[a-z]+)__seed(?P<seed>-?\d+)$")


def gather_results(results_dir: str | os.PathLike) -> dict[str, dict[str, dict[int, dict]]]:
    """{name: {task: {seed: result}}} from one protocol's results directory."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DumeError(f"no results directory {results_dir}: run reasoning_eval.py first")
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(results_dir.glob("*__*__seed*.json")):
        m = _NAME.match(path.stem)
        r = read_json(path)
        if m is None or not isinstance(r, dict) or "score" not in r or m["task"] not in DOMAINS:
            continue
        out.setdefault(m["name"], {}).setdefault(m["task"], {})[int(m["seed"])] = {**r, "source": str(path)}
    if not out:
        raise DumeError(f"no result files (<name>__<task>__seed<S>.json) in {results_dir}")
    return out


def build_reasoning_table(results_dir: str | os.PathLike) -> dict:
    """Per method and task: the raw metric and the normalised score as mean ± std over the seeds that have
    both the method's and the expert's result; the average over the four tasks per seed, then mean ± std. A
    task whose expert scored 0 (or is missing) for a seed has no normalised score for that seed."""
    res = gather_results(results_dir)
    names = [n for n in ROWS if n in res] + sorted(n for n in res if n not in ROWS)
    reference = {d: res.get(f"{d}_expert", {}).get(d, {}) for d in DOMAINS}
    table = {"tasks": list(DOMAINS), "methods": {}, "protocol": Path(results_dir).name,
             "reference_seeds": {d: sorted(reference[d]) for d in DOMAINS}, "unnormalisable": {}}
    for d in DOMAINS:
        if not reference[d]:
            table["unnormalisable"][d] = "no expert result"
        elif all(float(r["score"]) == 0 for r in reference[d].values()):
            table["unnormalisable"][d] = "expert scored 0"
    for n in names:
        raw, norm, seeds_of = {}, {}, {}
        per_seed_norm: dict[int, dict[str, float]] = {}
        for d in DOMAINS:
            runs = res[n].get(d, {})
            if not runs:
                continue
            raw[d] = mean_std([r["score"] for r in runs.values()])
            seeds_of[d] = sorted(runs)
            for seed, r in runs.items():
                ref = reference[d].get(seed)
                if ref is not None and float(ref["score"]) > 0:
                    per_seed_norm.setdefault(seed, {})[d] = 100.0 * float(r["score"]) / float(ref["score"])
            vals = [per_seed_norm[s][d] for s in sorted(per_seed_norm) if d in per_seed_norm[s]]
            if vals:
                norm[d] = mean_std(vals)
        complete = [s for s, v in per_seed_norm.items() if len(v) == len(DOMAINS)]
        average = mean_std([sum(per_seed_norm[s].values()) / len(DOMAINS) for s in complete]) if complete else None
        first = next(iter(next(iter(res[n].values())).values()))
        table["methods"][n] = {
            "raw": raw, "normalised": norm, "average": average, "seeds": seeds_of,
            "average_seeds": sorted(complete),
            "metrics": {d: next(iter(res[n][d].values())).get("metric") for d in raw},
            "statistics_from": first.get("dume_statistics_from")}
    return table


def reasoning_markdown(table: dict) -> str:
    from dume.report.paper import TABLE3, TABLE3_BTX_TEXT

    lines = [f"Protocol `{table['protocol']}`. Normalised score 100·p_d/p̂_d per seed (p̂_d: the domain's own "
             "expert on its task, same seed), mean ± std over the seeds; raw metric (mean ± std) in brackets; "
             "n = number of seeds; [k of n seeds]: the expert scored 0 with the other seeds, so only k "
             "normalise.", "",
             "| Method | " + " | ".join(HEADS[d] for d in DOMAINS) + " | Average | n |",
             "|---|" + "---:|" * (len(DOMAINS) + 2)]
    for n, m in table["methods"].items():
        cells = []
        for d in DOMAINS:
            if d not in m["raw"]:
                cells.append("—")
            else:
                raw = f"({fmt(m['raw'][d], 3)})"
                if d not in m["normalised"]:
                    cells.append(f"n/a {raw}")
                else:
                    ms = m["normalised"][d]
                    fewer = f" [{ms['n']} of {m['raw'][d]['n']} seeds]" if ms["n"] < m["raw"][d]["n"] else ""
                    cells.append(f"{fmt(ms)} {raw}{fewer}")
        seeds = sorted({s for v in m["seeds"].values() for s in v})
        label = n + (f" [stats: {m['statistics_from']}]" if m.get("statistics_from") else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(m['average'])} | {len(seeds)} |")
    if table["unnormalisable"]:
        lines += ["", "n/a: no normalised score because " + "; ".join(
            f"{d}: {why}" for d, why in table["unnormalisable"].items()) + "."]
    lines += ["", "The paper's Table 3 (Llama-3.2-3B experts, three seeds):", "",
              "| Method | " + " | ".join(HEADS[d] for d in DOMAINS) + " | Average |",
              "|---|" + "---:|" * (len(DOMAINS) + 1)]
    for n, row in TABLE3.items():
        lines.append(f"| {n} | " + " | ".join(fmt(row[d]) for d in DOMAINS) + f" | {fmt(row['average'])} |")
    lines.append("| BTX (text, no std) | " + " | ".join(f"{TABLE3_BTX_TEXT[d]:.1f}" for d in DOMAINS) + " | — |")
    return "\n".join(lines) + "\n"


def write_reasoning_table(run_dir: str | os.PathLike, protocol: str = "paper") -> str:
    """RUN_DIR/table3_<protocol>.md and reasoning_results_<protocol>.json."""
    run_dir = Path(run_dir)
    table = build_reasoning_table(run_dir / "results" / protocol)
    md = reasoning_markdown(table)
    atomic_write_json(run_dir / f"reasoning_results_{protocol}.json", table)
    atomic_write_text(run_dir / f"table3_{protocol}.md", md)
    return md
