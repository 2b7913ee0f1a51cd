#!/usr/bin/env python
"""The routers study: every training-free router on the same experts, three seeds, two
domain sets, written up in reproduction/clm/ROUTERS.md.

Per domain set, per seed (a normal CLM run directory each, RUN_ROOT/<set>/seed<S>):
the seed model (one per set, shared by its seeds), the experts, their evaluation, model
averaging, the oracle, centroid, DUME, and every router the registry marks as a study
row (`dume.routers.registry`, paper=False). Nothing here trains a router.

Domain sets, fixed before anything was tuned:
  wiki      code, math, physics, history, philosophy (the embedded default; its Wikipedia
            topics and code are held out of pretraining as always)
  heldout   biology, geography, arts, technology, society: Wikipedia topics that are in
            the default's pretraining corpus, here held out of it (`--source
            offline_heldout`, whose pretraining corpus is the remaining topics + code)

Like reproduce_clm.py, this is a sequencer of the CLM scripts: it runs them in one process
with the command lines the README gives, and every step skips what is done, so a rerun
resumes. The report is rebuilt from the result files each time.

    python clm_routers_study.py                              # both sets, seeds 0,1,2 (~70 min on 2 cores)
    python clm_routers_study.py --sets wiki --seeds 0        # a first look
    python clm_routers_study.py --smoke --run-root runs/study_smoke

With `--peers mergekit --mergekit-moe PATH` (PATH: the `mergekit-moe` executable, e.g. of a venv of its own:
README, routers study) each seed also gets the real tool's rows, `mergekit-moe:<gate mode>@<base>`
for the gate modes hidden, cheap_embed, random and the bases seed, model_averaging
(`dume.routers.mergekit_moe`), evaluated and cached like the others.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import clm_experts_eval
import clm_moerging_strategies_eval as strategies_script
import clm_pretrain
import clm_train_experts
import clm_weights_avg_eval
from dume.routers import mergekit_moe
from dume.routers import registry as strategies
from dume.cli import run_main
from dume.errors import DumeError
from dume.checkpoint.io import atomic_write_json, atomic_write_text
from reproduce_clm import Timer, link, step_flags

SETS = {"wiki": "offline", "heldout": "offline_heldout"}
PEERS = {"mergekit": mergekit_moe.rows()}  # --peers: outside tools, each the rows it adds
ROWS = ("oracle", "centroid", "DUME", *strategies.names(paper=False))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--run-root", default="runs/routers")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated domain sets: {', '.join(SETS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default=",".join(ROWS), help="strategies to run (model averaging always runs)")
    p.add_argument("--redo-rows", default="", help="strategies to recompute (comma-separated), e.g. after a fix")
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the wiring in a few minutes")
    p.add_argument("--report-dir", default=None, help="where ROUTERS.md and routers.json go (default: RUN_ROOT)")
    p.add_argument("--peers", default="", help=f"outside tools to add as rows (comma-separated): {', '.join(PEERS)}")
    p.add_argument("--mergekit-moe", default=None, metavar="PATH",
                   help="the mergekit-moe executable of its own venv (for --peers mergekit)")
    args, rest = p.parse_known_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    bad = [s for s in args.sets if s not in SETS]
    if bad or not args.sets:
        raise DumeError(f"--sets: choose from {', '.join(SETS)}, got {args.sets}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise DumeError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in strategies.REGISTRY]
    if unknown:
        raise DumeError(f"--rows: unknown strategies {unknown}")
    args.peers = [p for p in args.peers.split(",") if p]
    if not set(args.peers) <= set(PEERS):
        raise DumeError(f"--peers: choose from {', '.join(PEERS)}, got {args.peers}")
    args.peer_rows, args.peer_note = [], None
    if args.mergekit_moe and "mergekit" not in args.peers:
        raise DumeError("--mergekit-moe is for the mergekit peer: add --peers mergekit")
    if "mergekit" in args.peers:
        if args.mergekit_moe:  # a path that does not run is refused here, before any work
            args.peer_note = f"mergekit {mergekit_moe.check_executable(args.mergekit_moe)}"
            args.peer_rows = list(PEERS["mergekit"])
        else:
            args.peer_note = "skipped: no --mergekit-moe"
            print("mergekit peer skipped: no --mergekit-moe")
    args.redo_rows = [r for r in args.redo_rows.split(",") if r]
    if not set(args.redo_rows) <= set(args.rows) | set(args.peer_rows):
        raise DumeError(f"--redo-rows must be among --rows (or the peers' rows), got {args.redo_rows}")
    if "oracle" not in args.rows:
        args.rows.insert(0, "oracle")  # the gap needs it
    for flag in ("--run-dir", "--seed", "--source"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise DumeError(f"{flag} is set by clm_routers_study.py")
    return args, rest


def forward_cost(seed_dir: Path, rows, common: list[str]) -> dict[str, float]:
    """Per routed row of one seed: the median time of a forward pass over the same 8 test
    blocks of the first domain, relative to DUME's (5 timed passes after one warm-up)."""
    import statistics

    import torch

    import dume.moe.context_moe  # noqa: F401  (registers the context-routed subclass)
    from dume.clm.run import Run
    from dume.train.models import load_model

    run = Run.from_args(clm_experts_eval.parse(["--run-dir", str(seed_dir), *common]))
    ids, mask = run.blocks(run.domains()[0], "test")
    ids, mask = ids[:8], mask[:8]
    times = {}
    for name in rows:
        path = run.model_dir(mergekit_moe.result_stem(name))
        routed = mergekit_moe.is_peer(name) or strategies.REGISTRY[name].routed
        if not routed or not path.is_dir():
            continue
        model = load_model(path).eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                runs.append(time.perf_counter() - t)
        times[name] = statistics.median(runs)
    return {n: t / times["DUME"] for n, t in times.items()} if "DUME" in times else {}


def mergekit_row(argv: list[str], exe: str, row: str) -> None:
    """One `mergekit-moe` row on one seed's run: the YAML (the run's experts, the same 8 prompts per domain as
    `mergekit_hidden`), the tool in a subprocess, then the evaluation every row gets (test perplexities and
    routing shares). Cached like the registry's rows: skipped while its result matches the experts, the base,
    the corpus and the model it evaluated; `--redo` (the study's --redo-rows) recomputes it."""
    import torch

    from dume.checkpoint.experts import check_experts
    from dume.checkpoint.io import atomic_dir
    from dume.checkpoint.outputs import output_lock
    from dume.cli import base_parser
    from dume.clm.run import Run, write_result
    from dume.moe.routing import routing_accuracy, routing_shares

    args = base_parser(mergekit_row.__doc__).parse_args(argv)
    run = Run.from_args(args)
    mode, base = mergekit_moe.parse_row(row)
    stem, domains = mergekit_moe.result_stem(row), run.domains()
    experts = {d: run.require_checkpoint(run.expert_dir(d), f"clm_train_experts.py --domain {d}") for d in domains}
    base_dir = run.require_checkpoint(*((run.seed_dir, "clm_pretrain.py") if base == "seed" else
                                        (run.model_dir("model_averaging"), "clm_weights_avg_eval.py")))
    inputs = {**{f"{d} expert": p for d, p in experts.items()}, "base model": base_dir}
    model_dir = run.model_dir(stem)
    with output_lock(model_dir), output_lock(run.result_path(stem)):
        if run.done(stem, args.redo, inputs=inputs, models={"model": model_dir}):
            return
        check_experts(list(experts.values()))  # configs, shapes, NaN/inf: before anything is written
        prompts = strategies_script.prompt_gate_inputs(run, domains)["prompts"]
        config = mergekit_moe.moe_config(base_dir, experts, prompts, mode)
        input_fps = run.begin(stem, inputs)
        with atomic_dir(model_dir) as stage:
            mergekit_moe.run_mergekit(exe, config, stage, seed=args.seed, log_path=run.run_dir / "logs" / f"{stem}.log")
            model = run.load(stage, mergekit_moe.PEER)
            with torch.no_grad():
                results = run.evaluate(model, domains, args.eval_batch_size, label=row)
                shares = routing_shares(run.on_device(model), {d: run.blocks(d, "test") for d in domains},
                                        args.eval_batch_size)
        accuracy = routing_accuracy(shares, {d: i for i, d in enumerate(domains)})
        payload = {"name": row, "method": mergekit_moe.PEER, "domains": domains,
                   "peer": {"tool": mergekit_moe.PEER, "version": mergekit_moe.tool_version(exe), "gate_mode": mode,
                            "base": base, "config": config},
                   "experts": [str(p) for p in experts.values()], "model": str(model_dir),
                   # tagged: a peer is not a row of Table 2 (dume.report.clm_table skips tagged results)
                   "settings": {"tag": "peer", "seed": args.seed, "eval_batch_size": args.eval_batch_size},
                   "results": results, "routing_shares": shares, "routing_accuracy": accuracy}
        write_result(run, stem, payload, inputs=input_fps, models={"model": model_dir})
    print(row.ljust(20), " ".join(f"{d}={r['perplexity']:.2f}" for d, r in results.items()))


def main(argv=None):
    from dume.report.routers_study import markdown, set_summary, verdict

    args, rest = parse(argv)
    root = Path(args.run_root)
    smoke_common, per = step_flags(args.smoke)
    timer = Timer(root)
    wall, summaries = {}, {}
    for set_name in args.sets:
        common = ["--source", SETS[set_name], *smoke_common, *rest]
        base = root / set_name

        def flags(run_dir, seed, *extra):
            return ["--run-dir", str(run_dir), *common, "--seed", str(seed), *extra]

        timer(f"{set_name} pretrain", clm_pretrain.main, flags(base / "shared", 0, *per["pretrain"]))
        seed_dirs = {}
        for s in args.seeds:
            d = base / f"seed{s}"
            seed_dirs[s] = d
            link(d / "seed", "../shared/seed")
            link(d / "tokenizer", "../shared/tokenizer")
            timer(f"{set_name} seed{s} experts", clm_train_experts.main, flags(d, s, *per["experts"]))
            timer(f"{set_name} seed{s} experts_eval", clm_experts_eval.main, flags(d, s))
            timer(f"{set_name} seed{s} model_averaging", clm_weights_avg_eval.main, flags(d, s))
            for m in args.rows:
                redo = ["--redo"] if m in args.redo_rows else []
                timer(f"{set_name} seed{s} {m}", strategies_script.main, flags(d, s, "--method", m, *redo))
            for m in args.peer_rows:
                redo = ["--redo"] if m in args.redo_rows else []
                timer(f"{set_name} seed{s} {m}", mergekit_row, flags(d, s, *redo), args.mergekit_moe, m)
        # the study's cost: its steps' recorded times (a resumed run keeps the earlier ones)
        wall[set_name] = sum(v for k, v in timer.data.items() if k.startswith(f"{set_name} "))
        rows = [*args.rows, *args.peer_rows]
        forward = forward_cost(seed_dirs[args.seeds[0]], rows, common)
        summaries[set_name] = set_summary(seed_dirs, ["model_averaging", *rows], timer.data, set_name, forward)
    decision = verdict(summaries)
    descriptions = {n: strategies.REGISTRY[n].description for n in args.rows}
    descriptions.update({n: mergekit_moe.description(n) for n in args.peer_rows})
    report_dir = Path(args.report_dir) if args.report_dir else root
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report_dir / "routers.json", {"sets": summaries, "verdict": decision,
                                                    "wall_seconds": wall, "peers": args.peer_note,
                                                    "settings": {"seeds": args.seeds, "smoke": args.smoke}})
    md = markdown(summaries, descriptions, decision, wall, peers=args.peer_note)
    atomic_write_text(report_dir / "ROUTERS.md", md)
    print(md)
    print(f"wrote {report_dir / 'ROUTERS.md'} and {report_dir / 'routers.json'}")


if __name__ == "__main__":
    sys.exit(run_main(main))
