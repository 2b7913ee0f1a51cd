"""Assemble Table 2 from the JSON files the scripts wrote. Normalised score (docs/design.md §3): per domain
100·p̂_d/p_d for a method at perplexity p_d and the domain's own expert at p̂_d, averaged over the domains; 100
means "as good as the specialist on every domain", above 100 is possible."""

from __future__ import annotations

from pathlib import Path

from dume.checkpoint.io import atomic_write_json, atomic_write_text, read_json
from dume.errors import DumeError
from dume.routers.registry import TABLE_ORDER
from dume.train.perplexity import normalised_scores as clm_scores

# Table 2's row order; methods missing from a run are simply left out.
ROW_ORDER = list(TABLE_ORDER)  # dume.routers.registry: the dense baselines, then every registered strategy


def _ppl(results: dict) -> dict[str, float]:
    return {d: r["perplexity"] for d, r in results.items()}


def gather_clm_methods(results_dir: Path) -> tuple[list[str], dict[str, dict[str, float]], dict]:
    """Read every result file; return domains, {method: {domain: perplexity}}, sources."""
    experts_file = results_dir / "experts_eval.json"
    if not experts_file.is_file():
        raise DumeError(f"missing {experts_file}: run clm_experts_eval.py first")
    experts = read_json(experts_file)
    domains = experts["domains"]
    methods = {name: _ppl(res) for name, res in experts["results"].items()}
    sources = {name: str(experts_file) for name in methods}
    for path in sorted(results_dir.glob("*.json")):
        content = read_json(path)
        if path.name == "experts_eval.json" or "results" not in content:
            continue
        if (content.get("settings") or {}).get("tag"):
            continue  # a tagged result is a sweep point or a variant, not a row of Table 2
        name = content.get("name", path.stem)
        if set(content["results"]) >= set(domains):
            methods[name] = _ppl(content["results"])
            sources[name] = str(path)
    return domains, methods, sources


def build_clm_table(run_dir: str | Path, settings: dict | None = None, environment: dict | None = None) -> dict:
    run_dir = Path(run_dir)
    domains, methods, sources = gather_clm_methods(run_dir / "results")
    missing = [d for d in domains if f"{d}_expert" not in methods]
    if missing:
        raise DumeError(f"no expert results for {missing}: run clm_experts_eval.py")
    reference = {d: methods[f"{d}_expert"][d] for d in domains}
    table = {"domains": domains, "reference_perplexity": reference, "methods": {},
             "settings": settings or {}, "environment": environment or {}}
    for name, ppl in methods.items():
        scores = clm_scores({d: ppl[d] for d in domains}, reference)
        table["methods"][name] = {"perplexity": ppl, "normalised": scores["per_domain"],
                                  "average": scores["average"], "source": sources[name]}
    return table


def order(names, rest: bool = False) -> list[str]:
    """Table 2's rows among `names`: the experts, then ROW_ORDER; with `rest`, every other name after them."""
    head = sorted(n for n in names if n.endswith("_expert")) + [n for n in ROW_ORDER if n in names]
    return head + (sorted(n for n in names if n not in head) if rest else [])


def clm_markdown(table: dict) -> str:
    domains = table["domains"]
    lines = ["Perplexity on each domain's test split (lower is better) and normalised score "
             "100·p̂_d/p_d (the domain's own expert = 100).", "",
             "| method | " + " | ".join(domains) + " | normalised avg |",
             "|---|" + "---:|" * (len(domains) + 1)]
    for name in order(table["methods"], rest=True):
        m = table["methods"][name]
        cells = [f"{m['perplexity'][d]:.2f} ({m['normalised'][d]:.1f})" for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{m['average']:.1f}** |")
    return "\n".join(lines) + "\n"


def write_clm_table(run_dir: str | Path, settings: dict | None = None, environment: dict | None = None) -> str:
    """Write clm_results.json and table.md into the run directory; return the markdown."""
    table = build_clm_table(run_dir, settings, environment)
    md = clm_markdown(table)
    atomic_write_json(Path(run_dir) / "clm_results.json", table)
    atomic_write_text(Path(run_dir) / "table.md", md)
    return md
