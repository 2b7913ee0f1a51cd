#!/usr/bin/env python
"""The main job: the causal-LM pipeline of the paper's Table 2, end to end, in order:

  1. clm_pretrain.py            the seed Llama
  2. clm_train_experts.py       one expert per domain
  3. clm_experts_eval.py        every expert on every domain
  4. clm_weights_avg_eval.py    model averaging
  5. clm_moerging_strategies_eval.py --method M, for M in oracle, random_routing,
     centroid, DUME, BTX, DUMEplus
  then the table (RUN_DIR/table.md, RUN_DIR/clm_results.json).

Each step skips what already exists, so an interrupted run resumes; --redo recomputes.
Flags not listed here (e.g. --seq-len, --source) are passed to every step.
"""

from __future__ import annotations

import argparse
import sys
import time

import clm_experts_eval
import clm_moerging_strategies_eval
import clm_pretrain
import clm_train_experts
import clm_weights_avg_eval
from dume.cli import run_main


STEPS = [
    ("pretrain", clm_pretrain),
    ("experts", clm_train_experts),
    ("experts_eval", clm_experts_eval),
    ("model_averaging", clm_weights_avg_eval),
] + [(method, clm_moerging_strategies_eval) for method in clm_moerging_strategies_eval.PAPER_METHODS]


def main(argv=None):
    from dume.clm.run import Run
    from dume.runtime.environment import environment
    from dume.report.clm_table import write_clm_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/clm")
    p.add_argument("--smoke", action="store_true", help="tiny model and few steps: checks the wiring in ~1 minute")
    args, rest = p.parse_known_args(argv)
    common = ["--run-dir", args.run_dir, *rest]
    step_args = {name: [] for name, _ in STEPS}
    for method in clm_moerging_strategies_eval.PAPER_METHODS:
        step_args[method] = ["--method", method]
    if args.smoke:
        step_args["pretrain"] = ["--preset", "test-micro", "--steps", "20", "--warmup", "2", "--eval-every", "10"]
        step_args["experts"] = ["--steps", "4", "--warmup", "1", "--eval-every", "2"]
        for method in ("BTX", "DUMEplus"):
            step_args[method] += ["--num-steps", "4"]
        common += ["--seq-len", "64", "--vocab-size", "512", "--max-eval-blocks", "8"]
    timings = {}
    start = time.time()
    for name, module in STEPS:
        t = time.time()
        print(f"\n=== {name} ===", flush=True)
        module.main(common + step_args[name])
        timings[name] = round(time.time() - t, 1)
    run = Run.from_args(clm_pretrain.parse(common))
    md = write_clm_table(args.run_dir, {**run.settings(), "step_seconds": timings,
                                        "total_seconds": round(time.time() - start, 1)}, environment())
    print("\n=== Table 2 (embedded default) ===\n" + md)
    print(f"step times (s): {timings}; total {time.time() - start:.0f}s; "
          f"results in {args.run_dir}/clm_results.json and table.md")


if __name__ == "__main__":
    sys.exit(run_main(main))
