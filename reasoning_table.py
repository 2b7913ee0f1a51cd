#!/usr/bin/env python
"""Table 3 from the JSON files reasoning_eval.py wrote (RUN_DIR/results/<name>__<task>.json):
normalised scores 100·p_d/p̂_d (p̂_d = the domain's own expert on its task), as markdown
(RUN_DIR/table3.md) and JSON (RUN_DIR/reasoning_results.json)."""

from __future__ import annotations

import argparse
import sys

from dume.cli import run_main


def main(argv=None):
    from dume.reasoning import write_reasoning_table

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", default="runs/reasoning")
    args = p.parse_args(argv)
    print(write_reasoning_table(args.run_dir))


if __name__ == "__main__":
    sys.exit(run_main(main))
