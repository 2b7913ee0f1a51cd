#!/usr/bin/env python
"""Dynamic experts in the CLM setting (docs/design.md §5): DUME over four experts, the fifth
added later (both modes of `dume_experts.py add`), against DUME built from all five at
once; and one expert removed from the five.

  four            DUME of the first four experts
  + new, keep     the fifth expert added keeping the four-expert shared weights
  + new, reavg    the fifth added by re-averaging the shared weights and re-collecting
  five at once    DUME of all five experts
  five − removed  one expert removed from the five (no forward pass)

The four- and five-expert models are built by `dume.upcycle.pipeline.build_moe` (the library call
under `dume build`) from the run's experts and training text, with Table 2's DUME settings,
in RUN_DIR/dynamic/models, without touching the run's own models, statistics cache or
results; the five-expert one must reproduce Table 2's DUME row (checked below). Every
model is evaluated on every domain's test split.
Writes RUN_DIR/results/dynamic/dynamic_experts.json (a subfolder, so Table 2's report,
which reads results/*.json, gets no extra rows) and RUN_DIR/dynamic_table.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dume.cli import base_parser, run_main
from dume.clm.run import Run, read_result
from dume.runtime.environment import environment
from dume.checkpoint.io import atomic_write_json, atomic_write_text, read_json

WORK = "dynamic"


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--new-domain", default=None, help="the expert added later (default: the run's last domain)")
    p.add_argument("--remove-domain", default=None, help="the expert removed from the five (default: --new-domain)")
    p.add_argument("--stats-batch-size", type=int, default=32)
    return p.parse_args(argv)


def build_dume(run: Run, args, domains: list[str], out: Path) -> None:
    """DUME over `domains`' experts (Table 2's settings: λ 0.01, T 1, k 1, every token of
    every training document), unless `out` already holds that model."""
    from dume.corpora import documents as data
    from dume.upcycle.pipeline import build_moe
    from dume.upcycle.dynamic import DataSettings
    from dume.checkpoint.io import atomic_dir, is_complete_checkpoint
    from dume.moe.recipe import RECIPE_FILE

    experts = [run.expert_dir(d) for d in domains]
    recipe = out / RECIPE_FILE
    if not args.redo and is_complete_checkpoint(out) and recipe.is_file() and read_json(recipe).get("domains") == domains:
        print(f"using {out}")
        return
    docs = {d: data.iter_documents(d, "train", run.source, data_dir=run.data_dir)[0] for d in domains}
    with atomic_dir(out) as stage:
        build_moe(experts, domains, docs, stage, run.tokenizer, strategy="DUME", max_len=run.seq_len,
                  batch_size=args.stats_batch_size, data_source=f"{run.source}:train",
                  extra_meta=DataSettings(source=run.source, data_dir=run.data_dir, seq_len=run.seq_len,
                                          batch_size=args.stats_batch_size).provenance(run.tokenizer_fingerprint()))


def evaluate(run: Run, path: Path, domains: list[str], experts: list[str], batch_size: int, label: str) -> dict:
    """Test perplexity on every domain, and the last layer's routing accuracy on the
    domains that have an expert."""
    import torch

    from dume.moe.edit import load_moe
    from dume.moe.routing import routing_accuracy, routing_shares

    model = load_moe(path).eval()
    with torch.no_grad():
        ppl = run.evaluate(model, domains, batch_size, label=label)
        shares = routing_shares(model, {d: run.blocks(d, "test") for d in experts}, batch_size)
    accuracy = routing_accuracy(shares, {d: i for i, d in enumerate(experts)})
    return {"perplexity": {d: r["perplexity"] for d, r in ppl.items()},
            "routing_accuracy_last_layer": {d: a[-1] for d, a in accuracy.items()}}


def score(row: dict, reference: dict[str, float], domains: list[str]) -> dict:
    """Normalised scores: per domain, averaged over the model's own domains and over all."""
    from dume.report.clm_table import clm_scores

    covered = row["experts"]
    per = clm_scores({d: row["perplexity"][d] for d in domains}, reference)["per_domain"]
    return {"normalised": per,
            "average_own_domains": clm_scores({d: row["perplexity"][d] for d in covered},
                                              {d: reference[d] for d in covered})["average"],
            "average_all_domains": sum(per.values()) / len(per)}


def same_tensors(a: Path, b: Path) -> dict:
    """Are two MoEs equal apart from their routers, and how far apart are the routers?"""
    import torch

    from dume.checkpoint.reader import CheckpointReader
    from dume.moe.edit import read_gates

    with CheckpointReader(a) as ra, CheckpointReader(b) as rb:
        names = set(ra.keys())
        equal = names == set(rb.keys()) and all(
            torch.equal(ra.get(n), rb.get(n)) for n in names if not n.endswith("gate.weight"))
    gate_diff = max(float((x - y).abs().max()) for x, y in zip(read_gates(a), read_gates(b)))
    return {"non_router_tensors_identical": equal, "router_max_abs_diff": gate_diff}


def versus_table2(run: Run, perplexity: dict[str, float]) -> float | None:
    """Largest relative perplexity difference from the run's own DUME row (None if absent):
    the all-at-once model here is built with the same settings and must reproduce it."""
    path = run.result_path("DUME")
    if not path.is_file():
        return None
    table2 = read_json(path).get("results", {})
    if set(table2) != set(perplexity):
        return None
    return max(abs(perplexity[d] / table2[d]["perplexity"] - 1) for d in perplexity)


def markdown(doc: dict) -> str:
    domains, rows = doc["domains"], doc["rows"]
    n = len(domains)
    lines = [f"Dynamic experts (CLM): DUME over {n - 1} experts with `{doc['new_domain']}` added later, against DUME "
             f"built from all {n} at once; and `{doc['removed_domain']}` removed from the {n}. Perplexity "
             "(normalised score, own expert = 100) on each test split; † = no expert for that domain.", "",
             "| model | experts | how | time (s) | " + " | ".join(domains) + f" | avg, own domains | avg, all {n} |",
             "|---|---:|---|---:|" + "---:|" * (len(domains) + 2)]
    for row in rows.values():
        cells = [f"{row['perplexity'][d]:.2f} ({row['normalised'][d]:.1f}){'' if d in row['experts'] else '†'}"
                 for d in domains]
        secs = "—" if row["seconds"] is None else f"{row['seconds']:.{2 if row['seconds'] < 1 else 1}f}"
        lines.append(f"| {row['label']} | {len(row['experts'])} | {row['how']} | {secs} | " + " | ".join(cells)
                     + f" | **{row['average_own_domains']:.1f}** | {row['average_all_domains']:.1f} |")
    c = doc["checks"]
    same, keep = c["reaverage_vs_all_at_once"], c["keep_shared_vs_all_at_once"]
    lines += ["", f"- reaverage vs all at once: non-router tensors identical: {same['non_router_tensors_identical']}, "
              f"router max |Δ| {same['router_max_abs_diff']:.2e}",
              f"- keep-shared vs all at once: router max |Δ| {keep['router_max_abs_diff']:.2e} (its shared weights "
              f"are the {n - 1}-expert average, so its features and routers differ)",
              "- all at once vs Table 2's DUME row (results/DUME.json): max relative perplexity difference "
              + ("n/a" if c["all_at_once_vs_table2_DUME"] is None else f"{c['all_at_once_vs_table2_DUME']:.1e}"),
              "- time: the operation alone (statistics collection + writing the checkpoint); "
              "the strategies-built rows were not timed here"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    from dume.upcycle.dynamic import add_expert, remove_expert

    args = parse(argv)
    run = Run.from_args(args)
    domains = run.domains()
    new = args.new_domain or domains[-1]
    removed = args.remove_domain or new
    for d in (new, removed):
        run.check_domain(d)
    for d in domains:
        run.check_checkpoint(run.expert_dir(d), f"clm_train_experts.py --domain {d}")
    experts_eval = read_result(run, "experts_eval", "clm_experts_eval.py")
    reference = {d: experts_eval["results"][f"{d}_expert"][d]["perplexity"] for d in domains}
    others = [d for d in domains if d != new]
    work = run.run_dir / WORK
    models = work / "models"

    tag = f"without_{new}"
    build_dume(run, args, others, models / f"DUME_{tag}")
    build_dume(run, args, domains, models / "DUME")
    base, new_expert, n = models / f"DUME_{tag}", run.expert_dir(new), len(domains)
    plan = {  # name: (label, how, experts, path, operation or None)
        "base": (f"DUME, {n - 1} experts", "scratch", others, base, None),
        "add_keep_shared": (f"{n - 1} + {new}", "add, keep-shared", domains, models / f"DUME_{tag}+{new}_keep-shared",
                            lambda out: add_expert(base, new_expert, new, out, "keep-shared", overwrite=True)),
        "add_reaverage": (f"{n - 1} + {new}", "add, reaverage", domains, models / f"DUME_{tag}+{new}_reaverage",
                          lambda out: add_expert(base, new_expert, new, out, "reaverage", overwrite=True)),
        "all_at_once": (f"DUME, all {n} at once", "scratch", domains, models / "DUME", None),
        "remove": (f"all {n} − {removed}", "remove", [d for d in domains if d != removed],
                   models / f"DUME-{removed}",
                   lambda out: remove_expert(models / "DUME", removed, out, overwrite=True)),
    }
    rows = {}
    for name, (label, how, covered, path, operation) in plan.items():
        seconds = None
        if operation is not None:
            start = time.time()
            operation(path)
            seconds = time.time() - start
            print(f"{name}: {seconds:.1f}s -> {path}")
        row = {"label": label, "how": how, "experts": covered, "model": str(path), "seconds": seconds,
               **evaluate(run, path, domains, covered, args.eval_batch_size, name)}
        rows[name] = {**row, **score(row, reference, domains)}
        print(f"{label} ({how}): avg own {rows[name]['average_own_domains']:.1f}, "
              f"all {rows[name]['average_all_domains']:.1f}")
    checks = {"reaverage_vs_all_at_once": same_tensors(plan["add_reaverage"][3], plan["all_at_once"][3]),
              "keep_shared_vs_all_at_once": same_tensors(plan["add_keep_shared"][3], plan["all_at_once"][3]),
              "all_at_once_vs_table2_DUME": versus_table2(run, rows["all_at_once"]["perplexity"])}
    doc = {"table": "dynamic", "name": "dynamic_experts", "domains": domains, "new_domain": new,
           "removed_domain": removed, "reference_perplexity": reference, "rows": rows, "checks": checks,
           "settings": {**run.settings(), "stats_batch_size": args.stats_batch_size,
                        "eval_batch_size": args.eval_batch_size, "workdir": str(work)},
           "environment": environment()}
    out = run.run_dir / "results" / "dynamic" / "dynamic_experts.json"
    atomic_write_json(out, doc)
    md = markdown(doc)
    atomic_write_text(run.run_dir / "dynamic_table.md", md)
    print(md)
    print(f"wrote {out} and {run.run_dir / 'dynamic_table.md'}")


if __name__ == "__main__":
    sys.exit(run_main(main))
