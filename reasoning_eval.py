#!/usr/bin/env python
"""One cell of Table 3 for one seed: build (or reuse) the checkpoint of --strategy and
evaluate it on --task with lm-eval's own HFLM under --protocol; the result goes to
RUN_DIR/results/<protocol>/<name>__<task>__seed<seed>.json.

  protocols:  paper    the original code's evaluation, which produced Table 3 (default):
                       raw prompts with BOS, sampling at temperature 0.7 (top-k 50) for 256
                       tokens, gsm8k exact_match,flexible-extract, IFEval
                       inst_level_strict_acc, HumanEval pass@1,create_test, m_arc acc_norm
                       over 30 languages (no da)
              lm-eval  lm-eval's standard setups (gsm8k 8-shot greedy strict-match, ...)
  --seed:     seeds the sampling; random_routing, BTX and DUMEplus are built per seed
              (RUN_DIR/models/<strategy>/seed<seed>), the other checkpoints once.

  strategies: math_expert multilingual_expert coding_expert instruction_expert
              model_averaging oracle random_routing DUME BTX DUMEplus
  tasks:      math (gsm8k 8-shot)  multilingual (Okapi arc_xx, acc_norm averaged)
              coding (HumanEval pass@1, code run by dume.reasoning.sandbox)  instruction (ifeval)

DUME reads the MoE written by reasoning_generate_dume_params.py (RUN_DIR/models/DUME, or
--dume-dir; e.g. --dume-dir RUN_DIR/models/DUME_OOD --name DUME_OOD for the OOD row) and
builds it with the paper's defaults when it is missing. BTX and DUME+ train the routers on
820 prompts of each task, shuffled with the seed (paper: 1000 steps; BTX k=2 lr 1e-4,
DUME+ k=1 lr 1e-5).

  python reasoning_eval.py --strategy DUME --task math                      # paper, GPU
  accelerate launch -m ... / accelerate launch reasoning_eval.py ...        # data-parallel lm-eval
  python reasoning_eval.py --strategy DUME --task math --experts math=E1,... --data-dir D --limit 5
"""

from __future__ import annotations

import argparse
import sys

from dume.cli import run_main


def parse(argv):
    from dume.reasoning.settings import PAPER, STRATEGIES
    from dume.reasoning.flags import add_statistics_flags
    from dume.reasoning.tasks import DOMAINS, PROTOCOLS, ROUTER_TRAINING_PER_TASK

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    p.add_argument("--task", required=True, choices=DOMAINS)
    p.add_argument("--name", default=None, help="result name (default: the strategy), e.g. DUME_OOD")
    p.add_argument("--experts", default=None, help="domain=hub-id-or-path pairs (default: MergeBench 3B experts)")
    p.add_argument("--run-dir", default="runs/reasoning")
    p.add_argument("--data-dir", default=None, help="local task data (JSONL in each task's format); default: hub")
    p.add_argument("--languages", default=None, help="m_arc languages (comma-separated; default: all)")
    p.add_argument("--dume-dir", default=None, help="DUME MoE from reasoning_generate_dume_params.py")
    p.add_argument("--protocol", default="paper", choices=PROTOCOLS, help="evaluation protocol (default: paper)")
    add_statistics_flags(p)
    p.add_argument("--router-prompts", type=int, default=ROUTER_TRAINING_PER_TASK,
                   help="BTX/DUME+ training prompts per task (default 820, the original's)")
    p.add_argument("--num-dume-tokens", type=int, default=PAPER["num_dume_tokens"])
    p.add_argument("--lambda", dest="lam", type=float, default=PAPER["lam"])
    p.add_argument("--temp", type=float, default=PAPER["temperature"])
    p.add_argument("--k", type=int, default=None, help="experts per token (default 1; BTX 2)")
    p.add_argument("--train-steps", type=int, default=None, help="BTX/DUME+ router steps (paper: 1000)")
    p.add_argument("--train-lr", type=float, default=None, help="BTX 1e-4, DUME+ 1e-5")
    p.add_argument("--seq-len", type=int, default=1024, help="BTX/DUME+ training block length")
    p.add_argument("--train-batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="documents per lm-eval task (default: all)")
    p.add_argument("--batch-size", default="1", help="lm-eval batch size (int or 'auto')")
    p.add_argument("--num-fewshot", type=int, default=None, help="override the protocol's shots")
    p.add_argument("--max-gen-toks", type=int, default=None, help="cap generated tokens (CPU smoke runs)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU")
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                   help="router training (default: accelerate launch's --mixed_precision, else no)")
    p.add_argument("--parallelize", action="store_true", help="HFLM model parallelism over the visible GPUs")
    p.add_argument("--seed", type=int, default=0, help="sampling, random gates, router-training order")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--redo", action="store_true")
    p.add_argument("--build-only", action="store_true",
                   help="build (or reuse) the strategy's checkpoint and stop; what rank 0 runs alone under "
                        "accelerate launch")
    return p.parse_args(argv)


def main(argv=None):
    import subprocess
    from pathlib import Path

    import torch

    from dume.checkpoint.io import atomic_write_json
    from dume.errors import DumeError
    from dume.reasoning.evaluate import evaluate_checkpoint

    from dume.reasoning.flags import check_router_settings

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    check_router_settings(lam=args.lam, k=args.k, temperature=args.temp, num_dume_tokens=args.num_dume_tokens,
                          max_num_samples=args.max_num_samples, train_steps=args.train_steps,
                          train_lr=args.train_lr, limit=args.limit, router_prompts=args.router_prompts)
    name = args.name or args.strategy
    run_dir = Path(args.run_dir)
    out = run_dir / "results" / args.protocol / f"{name}__{args.task}__seed{args.seed}.json"
    if out.is_file() and not args.redo and not args.build_only:
        why = _stale_because(out)
        if why is None:
            print(f"{out} exists; skipping (--redo to recompute)")
            return
        print(f"{out}: {why}; recomputing")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    languages = args.languages.split(",") if args.languages else None
    if args.task == "instruction":  # fail before any heavy work
        from dume.reasoning.tasks.ifeval import check_ifeval_runnable

        check_ifeval_runnable()
    if args.build_only:
        model_dir = _build(args, languages, device, dtype)[0]
        print(f"{args.strategy}: {model_dir}")
        return
    # Under `accelerate launch` (data-parallel lm-eval), rank 0 builds the checkpoint in a
    # plain single-process child while the others wait, then every rank loads it. Built in
    # rank 0 itself, BTX/DUME+'s router training would start DDP collectives that the
    # waiting ranks never join (a hang), and statistics would be summed over ranks that
    # collect nothing.
    from dume.runtime.distributed import is_main_process, main_process_first, single_process_env, world_size

    with main_process_first():
        if world_size() > 1:
            if is_main_process():
                child = subprocess.run([sys.executable, __file__, *argv, "--build-only"], env=single_process_env())
                if child.returncode != 0:
                    raise DumeError(f"building {args.strategy} in one process failed (exit {child.returncode}; "
                                    "its message is above)")
            args.redo = False  # the child rebuilt it; every rank now reads that build
        model_dir, experts, stats, train_record = _build(args, languages, device, dtype)
    tasks_dir = run_dir / "lm_eval_tasks" / args.protocol / f"{name}__{args.task}__seed{args.seed}"
    result = evaluate_checkpoint(model_dir, args.task, tasks_dir, data_dir=args.data_dir, languages=languages,
                                 limit=args.limit, batch_size=args.batch_size, device=device, dtype=dtype,
                                 num_fewshot=args.num_fewshot, max_gen_toks=args.max_gen_toks,
                                 parallelize=args.parallelize, seed=args.seed, protocol=args.protocol)
    if result is None or not is_main_process():
        return  # rank 0 writes
    from dume.checkpoint.fingerprint import fingerprint

    payload = {"name": name, "strategy": args.strategy, "task": args.task, "model": str(model_dir),
               "experts": {d: str(p) for d, p in experts.items()}, **result,
               "fingerprints": {"model": fingerprint(model_dir),
                                "experts": {d: fingerprint(p) for d, p in experts.items()}},
               "settings": {k: v for k, v in vars(args).items() if k != "redo"}, "device": device, "dtype": dtype}
    if stats is not None:
        payload["dume_statistics_from"] = stats.data_source
    if train_record is not None:
        payload["router_training_data"] = train_record
    atomic_write_json(out, payload)
    print(f"{name} on {args.task}: {result['metric']} = {result['score']:.4f} ({out})")
    if result["notes"]:
        print("notes: " + "; ".join(result["notes"]))


def _stale_because(result_path):
    """Why an existing result no longer belongs to its model or experts (None: it does)."""
    from dume.errors import DumeError
    from dume.checkpoint.fingerprint import stale_because
    from dume.checkpoint.io import read_json

    try:
        res = read_json(result_path)
        recorded = res["fingerprints"]
        checks = {"model": (res["model"], recorded["model"]),
                  **{f"{d} expert": (p, recorded["experts"][d]) for d, p in res["experts"].items()}}
    except (DumeError, KeyError, TypeError):
        return "it records no fingerprints of its model and experts (older or unreadable result)"
    return stale_because(checks)


def _build(args, languages, device, dtype):
    """The checkpoint directory of the strategy (built when missing), the experts, the
    DUME statistics (or None), the router-training data record (or None)."""
    from pathlib import Path

    import torch

    from dume.checkpoint.io import is_complete_checkpoint
    from dume.checkpoint.fingerprint import built_from
    from dume.reasoning.settings import EXPERT_STRATEGIES, parse_experts
    from dume.reasoning.strategies import build_strategy, experts_made_from, generate_dume_params, load_tokenizer_of
    from dume.checkpoint.resolve import resolve_experts
    from dume.reasoning.statistics import router_training_documents
    from dume.stats.ridge import STATS_SUBDIR, RidgeStats

    run_dir = Path(args.run_dir)
    experts = resolve_experts(parse_experts(args.experts), args.cache_dir)
    models = run_dir / "models"
    stats = train_docs = tokenizer = train_record = None
    from dume.routers.registry import REGISTRY

    spec = REGISTRY.get(args.strategy)
    if spec is not None and spec.needs_statistics:
        dume_dir = Path(args.dume_dir) if args.dume_dir else models / "DUME"
        if not (is_complete_checkpoint(dume_dir) and (dume_dir / STATS_SUBDIR).is_dir()
                and built_from(dume_dir, experts_made_from(experts))):
            print(f"no DUME parameters for these experts in {dume_dir}: generating them "
                  "(reasoning_generate_dume_params.py defaults)")
            generate_dume_params(experts, dume_dir, data_dir=args.data_dir, max_num_samples=args.max_num_samples,
                                 statistics_text=args.statistics_text, balance_languages=args.balance_languages,
                                 num_dume_tokens=args.num_dume_tokens, lam=args.lam, temperature=args.temp,
                                 device=device, dtype=getattr(torch, dtype), languages=languages, work_dir=models)
        stats = RidgeStats.load(dume_dir / STATS_SUBDIR)
        print(f"DUME statistics: {stats.data_source or 'tasks'} ({dume_dir})")
    if spec is not None and spec.trains_router:
        train_docs, train_record = router_training_documents(data_dir=args.data_dir, languages=languages,
                                                             per_task=args.router_prompts, seed=args.seed,
                                                             text=args.statistics_text)
        tokenizer = load_tokenizer_of(experts["math"])
        print(f"router training data: {args.router_prompts} {args.statistics_text} texts per task, shuffled "
              f"with seed {args.seed} (" + ", ".join(f"{d}: {r['available']} available"
                                                      for d, r in train_record["tasks"].items()) + ")")
    if args.strategy == "DUME":
        model_dir = dume_dir
    else:
        model_dir = build_strategy(args.strategy, experts, models, task=args.task, stats=stats, train_docs=train_docs,
                                   tokenizer=tokenizer, lam=args.lam, temperature=args.temp, k=args.k, seed=args.seed,
                                   train_steps=args.train_steps, train_lr=args.train_lr, seq_len=args.seq_len,
                                   batch_size=args.train_batch_size, mixed_precision=args.mixed_precision,
                                   redo=args.redo and args.strategy not in EXPERT_STRATEGIES)
    return model_dir, experts, stats, train_record


if __name__ == "__main__":
    sys.exit(run_main(main))
