#!/usr/bin/env python
"""Table 3 from the JSON files reasoning_eval.py wrote
(RUN_DIR/results/<protocol>/<name>__<task>__seed<S>.json): normalised scores
100·p_d/p̂_d per seed (p̂_d = the domain's own expert on its task, same seed), mean ± std
over the seeds found, with the paper's Table 3 beside it; markdown
(RUN_DIR/table3_<protocol>.md) and JSON (RUN_DIR/reasoning_results_<protocol>.json)."""

from __future__ import annotations

import argparse
import sys

from dume.cli import run_main


def main(argv=None):
    from dume.report.reasoning_table import write_reasoning_table
    from dume.reasoning.tasks import PROTOCOLS

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", default="runs/reasoning")
    p.add_argument("--protocol", default="paper", choices=PROTOCOLS)
    args = p.parse_args(argv)
    print(write_reasoning_table(args.run_dir, args.protocol))


if __name__ == "__main__":
    sys.exit(run_main(main))
