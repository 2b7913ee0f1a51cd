#!/usr/bin/env python
"""Evaluate the seed model and every dense expert on every domain's test split (the
expert rows of Table 2). The diagonal (expert d on domain d) is the reference p̂_d of the
normalised score."""

from __future__ import annotations

import sys

from dume.cli import base_parser, run_main
from dume.clm.run import Run, write_result


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--domains", default="all", help="comma-separated domains, or 'all'")
    return p.parse_args(argv)


def main(argv=None):
    from dume.runtime.distributed import run_on_main_only
    args = parse(argv)
    if run_on_main_only(__file__, sys.argv[1:] if argv is None else argv):
        return
    run = Run.from_args(args)
    domains = run.select_domains(args.domains)
    models = {"seed": (run.seed_dir, "clm_pretrain.py")}
    models.update({f"{d}_expert": (run.expert_dir(d), f"clm_train_experts.py --domain {d}") for d in domains})
    inputs = {name: path for name, (path, _) in models.items()}
    if run.done("experts_eval", args.redo, inputs=inputs):
        return
    for path, made_by in models.values():  # every checkpoint usable before any evaluation
        run.check_checkpoint(path, made_by)
    input_fps = run.begin("experts_eval", inputs)
    results = {}
    for name, (path, made_by) in models.items():
        model = run.load(path, made_by)
        results[name] = run.evaluate(model, domains, args.eval_batch_size, label=name)
        print(name.ljust(20), " ".join(f"{d}={r['perplexity']:.2f}" for d, r in results[name].items()))
    write_result(run, "experts_eval", {"domains": domains, "results": results}, inputs=input_fps)


if __name__ == "__main__":
    sys.exit(run_main(main))
