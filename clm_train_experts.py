#!/usr/bin/env python
"""Fine-tune one dense expert per domain from the seed model (paper: lr 6e-5, 50 warmup,
batch 16 x 4, 1000 steps on each M2D2 domain, i.e. 0.1x the pretraining lr and 5 % of its
steps).

Experts stay close to the seed on purpose: MoErging averages every non-MLP parameter, and
an expert that drifts far makes that average useless (docs/design.md §4). On the embedded
default what drifts harmfully is the embeddings and the lm_head, not attention: averaging
only attention keeps ~99 % of an expert, averaging the embeddings and lm_head alone costs
nearly all that the oracle loses (RESULTS.md, "Where the oracle loses"). The default lr
1e-4 (1/30 of the pretraining lr) was chosen by a probe of the whole pipeline at 100
steps (normalised averages, averaging / DUME / oracle; docs/clm_design_probe.md):
lr 3e-4 74.2 / 77.1 / 85.0 and
1e-4 83.0 / 85.5 / 90.3 on this project's 2-CPU machine; 2e-4 77.4 / 80.8 / 86.7 and
5e-5 88.5 / 90.7 / 93.6 on one H100 in fp32 (where 1e-4 gave 83.2 / 85.9 / 90.3).
1e-4 is the largest lr whose oracle keeps >= 90 % of the experts (the paper: 94.8) while
averaging still loses as much as the paper's (83 here, 83.4 there). Small domains stop on
validation loss (--patience) and keep their best weights.
"""

from __future__ import annotations

import sys

from dume.cli import base_parser, run_main
from dume.clm.run import Run, write_result
from dume.checkpoint.io import is_complete_checkpoint
from dume.checkpoint.save import save_pretrained_atomic


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--domain", default="all", help="a domain name, a comma-separated list, or 'all'")
    p.add_argument("--lr", type=float, default=1e-4, help="paper: 0.1x pretraining; here 1/30 (see above)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3, help="validations without improvement before stopping")
    return p.parse_args(argv)


def main(argv=None):
    from dume.train.loop import TrainConfig, train, windows_budget
    from dume.runtime.distributed import is_main_process, wait_for_everyone

    args = parse(argv)
    run = Run.from_args(args)
    domains = run.select_domains(args.domain)
    cfg = TrainConfig.with_recipe(
        "original" if run.recipe_name == "original" else "embedded", lr=args.lr, steps=args.steps,
        warmup=args.warmup, batch_size=args.batch_size, grad_accum=args.grad_accum, eval_every=args.eval_every,
        patience=args.patience, seed=args.seed, mixed_precision=args.mixed_precision,
        param_dtype="bfloat16" if args.pure_bf16 else None,
        wandb_project=args.wandb_project, compile=args.compile)
    cfg.validate()
    run.require_checkpoint(run.seed_dir, "clm_pretrain.py")
    run.tokenizer  # the run's tokenizer (and a --tokenizer that differs from it refused) before any work
    from dume.checkpoint.fingerprint import fingerprint

    seed_fp = fingerprint(run.seed_dir)
    for domain in domains:
        out = run.expert_dir(domain)
        if is_complete_checkpoint(out) and not args.redo:
            made_from, corpus = _recorded(run, domain)
            changed = run.corpus_changed(corpus)
            if changed:
                print(f"expert {domain}: {changed}; retraining")
            elif made_from in (None, seed_fp):  # an expert put here by hand has no record: kept
                print(f"expert {domain} exists at {out}; skipping (--redo to retrain)")
                continue
            else:
                print(f"expert {domain} was trained from another seed model (fingerprint {made_from} != {seed_fp}); "
                      "retraining")
        model = run.load(run.seed_dir, "clm_pretrain.py")
        train_blocks = run.blocks(domain, "train", max_windows=windows_budget(cfg))
        val_blocks = run.blocks(domain, "validation")
        print(f"expert {domain}: {len(train_blocks)} training windows of {args.seq_len} tokens")
        model, history = train(model, train_blocks, val_blocks, cfg, desc=f"expert {domain}")
        if is_main_process():
            save_pretrained_atomic(model, out, run.tokenizer)
            write_result(run, f"expert_{domain}", {"domain": domain, "seed_model": str(run.seed_dir),
                                                     "train_windows": len(train_blocks), "history": history},
                         inputs={"seed": seed_fp}, models={"expert": out})
            print(f"saved {out} (best validation loss {history['best_val']['loss']:.4f} at step "
                  f"{history['best_val']['step']})")
        wait_for_everyone()


def _recorded(run: Run, domain: str):
    """(the seed fingerprint, the corpus stamps) the expert's result records; None for
    what it does not record (an expert put here by hand has no result)."""
    from dume.checkpoint.io import read_json

    path = run.result_path(f"expert_{domain}")
    if not path.is_file():
        return None, None
    result = read_json(path)
    return ((result.get("fingerprints") or {}).get("inputs") or {}).get("seed"), result.get("corpus")


if __name__ == "__main__":
    sys.exit(run_main(main))
