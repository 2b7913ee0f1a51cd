"""Table 2 and Figure 2 over several seeds: mean ± std of the normalised scores.

Each seed is a normal run directory (RUN_ROOT/seed<i>/), with its sweep points in another
(RUN_ROOT/sweeps/seed<i>/); Table 2 keeps only the paper's rows (the experts, the seed, model averaging and
the untagged strategies), so no tagged result becomes a row. Stds are sample ones (ddof = 1; 0 for one seed).
"""

from __future__ import annotations

import math
from pathlib import Path

from dume.checkpoint.io import read_json
from dume.errors import DumeError
from dume.report.clm_table import ROW_ORDER, build_clm_table, clm_scores, order


def mean_std(values) -> dict:
    values = [float(v) for v in values]
    if not values:
        raise DumeError("mean_std of no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def table2_names(domains) -> set[str]:
    return {f"{d}_expert" for d in domains} | set(ROW_ORDER)


def seed_table(run_dir: str | Path) -> dict:
    """build_clm_table of one seed's run, restricted to Table 2's rows."""
    table = build_clm_table(run_dir)
    keep = table2_names(table["domains"])
    table["methods"] = {n: m for n, m in table["methods"].items() if n in keep}
    return table


def aggregate_tables(tables: list[dict]) -> dict:
    """{domains, seeds, methods: {name: {per_domain: {d: mean_std}, average: mean_std}}}."""
    if not tables:
        raise DumeError("no seed tables to aggregate")
    domains = tables[0]["domains"]
    for t in tables[1:]:
        if t["domains"] != domains:
            raise DumeError(f"seeds disagree on the domains: {domains} vs {t['domains']}")
    names = [n for n in tables[0]["methods"] if all(n in t["methods"] for t in tables)]
    out = {"domains": domains, "seeds": len(tables), "methods": {}}
    for name in names:
        rows = [t["methods"][name] for t in tables]
        out["methods"][name] = {
            "per_domain": {d: mean_std([r["normalised"][d] for r in rows]) for d in domains},
            "average": mean_std([r["average"] for r in rows]),
            "perplexity": {d: mean_std([r["perplexity"][d] for r in rows]) for d in domains}}
    return out


def result_scores(path: str | Path, reference: dict[str, float]) -> dict | None:
    """Normalised scores of one result file, None if it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    res = read_json(path)
    return clm_scores({d: res["results"][d]["perplexity"] for d in reference}, reference)


def aggregate_points(per_seed: list[dict]) -> dict:
    """[{x: average score}] per seed -> {x: mean_std} over the seeds that have x."""
    xs = dict.fromkeys(x for s in per_seed for x in s)  # every seed's x, in first-seen order
    return {x: mean_std([s[x] for s in per_seed if x in s]) for x in xs}


def aggregate_routing(results: list[dict], key: str) -> dict | None:
    """Mean over seeds of results[key] ({domain: [per layer value or list]})."""
    results = [r for r in results if r and key in r]
    if not results:
        return None
    first = results[0][key]

    def mean(vals):
        if isinstance(vals[0], list):
            return [mean([v[i] for v in vals]) for i in range(len(vals[0]))]
        return sum(vals) / len(vals)

    return {d: mean([r[key][d] for r in results]) for d in first}


def fmt(ms, digits: int = 1) -> str:
    """mean ± std of a `mean_std` dict or of a (mean, std) pair (the paper's tables); "—" for None."""
    if ms is None:
        return "—"
    mean, std = (ms["mean"], ms["std"]) if isinstance(ms, dict) else ms
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table2_markdown(agg: dict, paper: dict | None = None) -> str:
    """Our mean ± std per domain and average, with the paper's average beside it."""
    domains = agg["domains"]
    head = "| method | " + " | ".join(domains) + " | average | paper average |"
    lines = [head, "|---|" + "---:|" * (len(domains) + 2)]
    for name in order(agg["methods"]):
        m = agg["methods"][name]
        p = (paper or {}).get(name, {}).get("average")
        paper_cell = fmt(p) if p else "–"
        lines.append(f"| {name} | " + " | ".join(fmt(m["per_domain"][d]) for d in domains)
                     + f" | **{fmt(m['average'])}** | {paper_cell} |")
    return "\n".join(lines) + "\n"


def paper_markdown(paper: dict, domains, names: dict | None = None) -> str:
    names = names or {}
    lines = ["| method | " + " | ".join(names.get(d, d) for d in domains) + " | average |",
             "|---|" + "---:|" * (len(domains) + 1)]
    for name in order(paper):
        row = paper[name]
        lines.append(f"| {name} | " + " | ".join(fmt(row[d]) for d in domains) + f" | **{fmt(row['average'])}** |")
    return "\n".join(lines) + "\n"
