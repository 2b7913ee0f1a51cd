#!/usr/bin/env python
"""Model averaging: the uniform average of every parameter of the experts (MLPs
included), a dense Llama, evaluated on every domain (Table 2's weakest merge)."""

from __future__ import annotations

import sys

from dume.cli import base_parser, run_main
from dume.clm.run import Run, write_result
from dume.checkpoint.io import is_complete_checkpoint, read_json


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--domains", default="all", help="experts to average (comma-separated), or 'all'")
    return p.parse_args(argv)


def main(argv=None):
    from dume.runtime.distributed import run_on_main_only
    from dume.checkpoint.experts import check_experts
    from dume.moe.merge import average_experts

    args = parse(argv)
    if run_on_main_only(__file__, sys.argv[1:] if argv is None else argv):
        return
    run = Run.from_args(args)
    domains = run.select_domains(args.domains)
    model_dir = run.model_dir("model_averaging")
    inputs = {f"{d} expert": run.expert_dir(d) for d in domains}
    if run.done("model_averaging", args.redo, inputs=inputs, models={"model": model_dir}):
        return
    experts = [run.check_checkpoint(run.expert_dir(d), f"clm_train_experts.py --domain {d}") for d in domains]
    expert_set = check_experts(experts)  # NaN/inf, shapes, tokenizers: before anything is written
    input_fps = run.begin("model_averaging", inputs)
    made_from = {"dume_expert_fingerprints": list(expert_set.fingerprints)}
    if args.redo or not is_complete_checkpoint(model_dir) or \
            read_json(model_dir / "config.json").get("dume_expert_fingerprints") != made_from["dume_expert_fingerprints"]:
        average_experts(experts, model_dir, extra_config=made_from)
    model = run.load(model_dir, "clm_weights_avg_eval.py")
    results = run.evaluate(model, domains, args.eval_batch_size, label="model_averaging")
    print("model_averaging".ljust(20), " ".join(f"{d}={r['perplexity']:.2f}" for d, r in results.items()))
    write_result(run, "model_averaging", {"name": "model_averaging", "domains": domains, "experts": [str(e) for e in experts],
                                          "model": str(model_dir), "results": results},
                 inputs=input_fps, models={"model": model_dir})

if __name__ == "__main__":
    sys.exit(run_main(main))
