#!/usr/bin/env python
"""Add, remove or re-weight the experts of a DUME MoE, and collect one domain's router
statistics apart, without retraining anything (docs/design.md §5; library: dume/upcycle/dynamic.py).

  collect   one domain's statistics, computed alone: needs only the MoE (plus, for a new
            expert, its checkpoint via --expert) and that domain's data. Under
            `accelerate launch` the processes split the documents and all-reduce the sums.
  combine   sum statistics computed apart (refuses statistics of another model)
  add       a new expert. --mode keep-shared: keep the MoE's shared weights (exact, cheap:
            only the new domain is collected). --mode reaverage: re-average the shared
            weights over all experts and re-collect every domain (= building from scratch).
            A LoRA expert: --expert BASE --adapter ADAPTER (also for collect), merged by
            peft once into dume build's cache of merged adapters
  remove    drop one expert's MLPs and statistics, re-solve (no forward pass)
  reweight  scale domains' statistics (e.g. code=2,math=0.5), re-solve (no forward pass)

Every command writes a new directory atomically and leaves its inputs untouched; errors
print one line and exit with status 2. Multi-process collection, without a config file:

  accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
      --dynamo_backend no dume_experts.py collect --moe M --domain code --out S
  (on a CPU-only machine this starts 2 processes joined by gloo; on GPUs, NCCL;
   `torchrun --nproc_per_node 2 dume_experts.py collect ...` is the same)
"""

from __future__ import annotations

import argparse
import os
import sys

from dume.cli import run_main
from dume.errors import DumeError

ADAPTER_HELP = "a PEFT (LoRA) adapter on --expert, which is then its base: merged once, cached (pip install dume[lora])"


def _data_flags(p: argparse.ArgumentParser, scope: str = "") -> None:
    g = p.add_argument_group(f"data{scope}", "default: what the MoE's stored statistics were collected with")
    from dume.corpora.documents import SOURCE_HELP

    g.add_argument("--source", default=None, choices=list(SOURCE_HELP),
                   help="; ".join(f"{name}: {what}" for name, what in SOURCE_HELP.items()))
    g.add_argument("--data-dir", default=None, help="data directory for --source local")
    g.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the MoE's own files)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per document (bos included)")
    g.add_argument("--batch-size", type=int, default=None, help="documents per forward pass")
    g.add_argument("--num-dume-stats-steps", type=int, default=None, help="batches per domain (default: all)")


def _given(args) -> dict:
    return {"source": args.source, "data_dir": args.data_dir, "tokenizer": args.tokenizer, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "max_batches": args.num_dume_stats_steps}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="one domain's statistics, computed alone")
    c.add_argument("--moe", required=True, help="the DUME (or any MoErged) Mixtral checkpoint")
    c.add_argument("--domain", required=True)
    c.add_argument("--expert", default=None, help="a new expert's Llama checkpoint (default: the MoE's own expert)")
    c.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    c.add_argument("--num-dume-tokens", type=int, default=None, help="tokens per document (default: as stored)")
    c.add_argument("--out", required=True, help="statistics directory to write")
    _data_flags(c)

    m = sub.add_parser("combine", help="sum statistics computed apart")
    m.add_argument("stats", nargs="+", help="statistics directories")
    m.add_argument("--out", required=True)

    a = sub.add_parser("add", help="add an expert")
    a.add_argument("--moe", required=True)
    a.add_argument("--expert", required=True, help="the new expert's Llama checkpoint")
    a.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    a.add_argument("--domain", required=True, help="the new expert's domain name")
    a.add_argument("--mode", required=True, choices=["keep-shared", "reaverage"])
    a.add_argument("--stats", default=None, help="the new domain's statistics, collected apart (keep-shared)")
    a.add_argument("--out", required=True)
    _data_flags(a, " of the new domain (with reaverage, the old domains are re-collected as their statistics record)")

    r = sub.add_parser("remove", help="remove an expert")
    r.add_argument("--moe", required=True)
    r.add_argument("--domain", required=True)
    r.add_argument("--out", required=True)

    w = sub.add_parser("reweight", help="scale domains' statistics")
    w.add_argument("--moe", required=True)
    w.add_argument("--weights", required=True, help="e.g. code=2,math=0.5")
    w.add_argument("--out", required=True)

    for q in (c, m, a, r, w):
        q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def _threads_per_process(world: int) -> None:
    """run_main gives each process every core; launched processes share them instead."""
    if world > 1 and "DUME_THREADS" not in os.environ:
        import torch

        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def merge_adapter(args) -> None:
    """With --adapter, the new expert is that PEFT adapter merged into --expert (its base) by `dume build`'s own
    merge and cache (dume.checkpoint.adapters): checked first (peft, files, type, base), then `args.expert` names
    the merged checkpoint. The output is checked against base and adapter before the merge."""
    if not args.adapter:
        return
    if not args.expert:
        raise DumeError("--adapter needs --expert: the base model the adapter was trained on")
    from dume.checkpoint.adapters import check_adapter, merged_expert, require_peft
    from dume.checkpoint.resolve import resolve_adapter, resolve_expert
    from dume.upcycle.dynamic import check_output

    require_peft()
    folder, base = resolve_adapter(args.adapter), resolve_expert(args.expert)
    check_output(args.out, [args.moe, base, folder, *([args.stats] if getattr(args, "stats", None) else [])],
                 args.overwrite)
    adapter = check_adapter(args.adapter, folder, args.expert, base)
    if adapter.note:
        print(f"note: {adapter.note}")
    args.expert = str(merged_expert(adapter))


def collect(args) -> None:
    from dume.runtime.distributed import current_shard, main_process_first
    from dume.upcycle.dynamic import check_output, collect_stats, plan_collect

    shard = current_shard()
    _threads_per_process(shard.world)
    with main_process_first():  # rank 0 merges; the others, which skip the cache's lock under a launch, reuse it
        merge_adapter(args)
    inputs = [args.moe, *([args.expert] if args.expert else [])]
    out = check_output(args.out, inputs, args.overwrite)
    plan = plan_collect(args.moe, args.domain, args.expert, args.num_dume_tokens, **_given(args))
    stats = collect_stats(plan, shard)
    if shard.is_main:
        stats.save(out)
        source = f"its own expert {plan.expert}" if isinstance(plan.expert, int) else f"new expert {plan.expert}"
        print(f"statistics of {args.domain!r} through {args.moe}'s shared weights + {source}: "
              f"{int(stats.n[0, 0])} tokens per layer, {shard.world} process(es) -> {out}")
        for n in plan.notes:
            print(f"note: {n}")


def combine(args) -> None:
    from dume.upcycle.dynamic import check_output, combine_stats
    from dume.stats.ridge import RidgeStats

    from dume.upcycle.dynamic import identical_statistics

    out = check_output(args.out, args.stats, args.overwrite)
    parts = [RidgeStats.load(s) for s in args.stats]
    for i, j in identical_statistics(args.stats, parts):
        print(f"warning: {args.stats[i]} and {args.stats[j]} are the same statistics: combining them counts "
              "their tokens twice (give each part once)")
    stats, notes = combine_stats(parts)
    stats.save(out)
    print(f"summed {len(args.stats)} statistics: domains {stats.domains}, tokens "
          f"{ {d: c[0] for d, c in stats.token_counts().items()} } -> {out}")
    for n in notes:
        print(f"note: {n}")


def edit(args) -> None:
    from dume.upcycle import dynamic

    if args.command == "add":
        merge_adapter(args)
        summary = dynamic.add_expert(args.moe, args.expert, args.domain, args.out, args.mode, stats_dir=args.stats,
                                     overwrite=args.overwrite, **_given(args))
    elif args.command == "remove":
        summary = dynamic.remove_expert(args.moe, args.domain, args.out, overwrite=args.overwrite)
    else:
        summary = dynamic.reweight_domains(args.moe, dynamic.parse_weights(args.weights), args.out,
                                           overwrite=args.overwrite)
    print("\n".join(dynamic.describe(summary)))


def main(argv=None) -> None:
    args = parse(argv)
    if args.command == "collect":
        return collect(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DumeError(f"only `collect` runs under accelerate launch / torchrun, not `{args.command}`: collect the "
                        "statistics there, then pass them to `add --stats` in one process")
    if args.command == "combine":
        return combine(args)
    return edit(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
