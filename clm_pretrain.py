#!/usr/bin/env python
"""Pretrain the seed Llama on the pretraining corpus (paper: 115M Llama on OpenWebText,
lr 6e-4, cosine, 1000 warmup, batch 16 x 4 accumulation, 20 000 steps, 1024 tokens).

Defaults are the embedded CPU setting; the paper's run (README, "The paper's setting") is
  accelerate launch --multi_gpu --num_processes 4 clm_pretrain.py --source hub --preset paper-115m \
      --seq-len 1024 --lr 6e-4 --steps 20000 --warmup 1000 --batch-size 4 --grad-accum 4 --mixed-precision bf16
(global batch 4 per device x 4 accumulation x 4 GPUs = the paper's 16 x 4; on 1 GPU:
--batch-size 16, on 2: --batch-size 8). Only the windows the step budget needs are
tokenized (dume.clm.tokens); only the main process writes the checkpoint and the results.
"""

from __future__ import annotations

import sys

from dume.cli import base_parser, run_main
from dume.clm.run import Run, write_result
from dume.checkpoint.io import is_complete_checkpoint
from dume.checkpoint.save import save_pretrained_atomic


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--preset", default="cpu-small", help="cpu-small, paper-115m, test-micro, or a config.json path")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=100)
    return p.parse_args(argv)


def main(argv=None):
    from dume.train.models import count_parameters, new_model
    from dume.train.loop import TrainConfig, train, windows_budget
    from dume.runtime.distributed import is_main_process, wait_for_everyone

    args = parse(argv)
    run = Run.from_args(args)
    if is_complete_checkpoint(run.seed_dir) and not args.redo:
        print(f"seed model exists at {run.seed_dir}; skipping (--redo to retrain)")
        return
    cfg = TrainConfig.with_recipe(
        "original" if run.recipe_name == "original" else "embedded", lr=args.lr, steps=args.steps,
        warmup=args.warmup, batch_size=args.batch_size, grad_accum=args.grad_accum, eval_every=args.eval_every,
        seed=args.seed, mixed_precision=args.mixed_precision,
        param_dtype="bfloat16" if args.pure_bf16 else None, wandb_project=args.wandb_project,
        compile=args.compile)
    cfg.validate()
    tokenizer = run.tokenizer
    train_blocks = run.blocks("pretrain", "train", max_windows=windows_budget(cfg))
    val_blocks = run.blocks("pretrain", "validation")
    model = new_model(args.preset, tokenizer, seed=args.seed)
    print(f"seed model: {args.preset}, {count_parameters(model) / 1e6:.2f}M parameters, "
          f"{len(train_blocks) * args.seq_len} training tokens in {len(train_blocks)} windows of {args.seq_len} "
          f"({run.window_recipe.description})")
    model, history = train(model, train_blocks, val_blocks, cfg, desc="pretrain")
    if is_main_process():
        save_pretrained_atomic(model, run.seed_dir, tokenizer)
        write_result(run, "pretrain", {"preset": args.preset, "parameters": count_parameters(model),
                                       "train_windows": len(train_blocks), "history": history})
        print(f"saved {run.seed_dir} (final validation loss {history['val'][-1]['loss']:.4f}, "
              f"{history['tokens_per_second']:.0f} tokens/s)")
    wait_for_everyone()

if __name__ == "__main__":
    sys.exit(run_main(main))
