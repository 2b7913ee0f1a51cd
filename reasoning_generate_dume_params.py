#!/usr/bin/env python
"""DUME's routers for the reasoning setting (Table 3): MoErge the four experts, collect the
ridge statistics, solve the routers, save the MoE (a standard MixtralForCausalLM
checkpoint), the statistics (dume_stats/) and a metadata JSON (dume_params.json).

Statistics come, by default, from the evaluation tasks' own data (gsm8k train, m_arc
train, HumanEval test, IFEval train: the paper's default), or with --ood from the experts'
training datasets (DUME OOD: Magicoder-OSS-Instruct-75K, dart-math-hard, aya_dataset,
tulu-3-sft-personas-instruction-following; offline: --ood-data-dir DIR/<domain>/*.jsonl).
As the original built them: the prompt side of each record only, at most 2048 texts per
domain, m_arc spread evenly over its 30 languages (--statistics-text, --max-num-samples,
--no-balance-languages for the alternatives). dume_params.json lists exactly which
records fed them (ids and a SHA-256 of the texts).

  python reasoning_generate_dume_params.py                      # the paper's four 3B experts (hub)
  python reasoning_generate_dume_params.py --experts math=E1,multilingual=E2,coding=E3,instruction=E4 \\
      --data-dir tasks_data --max-num-samples 64 --out-dir runs/reasoning/models/DUME
"""

from __future__ import annotations

import argparse
import sys

from dume.cli import run_main


def parse(argv):
    from dume.reasoning.settings import PAPER
    from dume.reasoning.flags import add_statistics_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default=None,
                   help="domain=hub-id-or-path pairs, comma-separated (default: MergeBench/Llama-3.2-3B_{domain})")
    p.add_argument("--run-dir", default="runs/reasoning")
    p.add_argument("--out-dir", default=None, help="default: RUN_DIR/models/DUME (DUME_OOD with --ood)")
    p.add_argument("--data-dir", default=None, help="local task data (see dume/tasks/__init__.py); default: the hub")
    p.add_argument("--ood", action="store_true", help="statistics from the experts' training datasets (DUME OOD)")
    p.add_argument("--ood-data-dir", default=None, help="local OOD data: DIR/<domain>/*.jsonl|*.json|*.txt")
    p.add_argument("--languages", default=None, help="m_arc languages for the statistics (comma-separated; default all)")
    add_statistics_flags(p)
    p.add_argument("--num-dume-tokens", type=int, default=PAPER["num_dume_tokens"])
    p.add_argument("--lambda", dest="lam", type=float, default=PAPER["lam"])
    p.add_argument("--k", type=int, default=PAPER["k"])
    p.add_argument("--temp", type=float, default=PAPER["temperature"], help="router temperature (reasoning: 0.1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the forward passes (auto: bfloat16 on GPU); statistics accumulate in float32/64")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache for hub experts")
    return p.parse_args(argv)


def main(argv=None):
    from pathlib import Path

    import torch

    from dume.reasoning.flags import check_router_settings
    from dume.reasoning.strategies import generate_dume_params
    from dume.reasoning.settings import parse_experts
    from dume.checkpoint.resolve import resolve_experts

    args = parse(argv)
    check_router_settings(lam=args.lam, k=args.k, temperature=args.temp, num_dume_tokens=args.num_dume_tokens,
                          max_num_samples=args.max_num_samples)  # before any hub or disk work
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    experts = resolve_experts(parse_experts(args.experts), args.cache_dir)
    out = Path(args.out_dir) if args.out_dir else Path(args.run_dir) / "models" / ("DUME_OOD" if args.ood else "DUME")
    generate_dume_params(experts, out, ood=args.ood, data_dir=args.data_dir, ood_data_dir=args.ood_data_dir,
                         max_num_samples=args.max_num_samples, statistics_text=args.statistics_text,
                         balance_languages=args.balance_languages, num_dume_tokens=args.num_dume_tokens, lam=args.lam,
                         k=args.k, temperature=args.temp, batch_size=args.batch_size, device=device, dtype=dtype,
                         languages=args.languages.split(",") if args.languages else None,
                         work_dir=Path(args.run_dir) / "models")


if __name__ == "__main__":
    sys.exit(run_main(main))
