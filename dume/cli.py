"""Command-line plumbing shared by the scripts and `dume build`: common flags, errors as one line and exit 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from dume.errors import DumeError


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default="runs/clm", help="where checkpoints and JSON results go")
    from dume.corpora.documents import SOURCE_HELP

    p.add_argument("--source", default="offline", choices=list(SOURCE_HELP),
                   help="; ".join(f"{name}: {what}" for name, what in SOURCE_HELP.items()))
    p.add_argument("--data-dir", default=None, help="data directory for --source local (or a hub cache override)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or path for a new run (kept in RUN_DIR/tokenizer; later scripts use that copy "
                        "and refuse one with another vocabulary); 'bpe' trains one on the pretraining corpus. "
                        "Default: the paper's meta-llama/Meta-Llama-3-8B for --source hub, else 'bpe'")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the trained BPE tokenizer")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (paper: 1024)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch (paper: 16)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--max-eval-blocks", type=int, default=None,
                   help="test windows per domain (default: the original's first 4000 x 16 on --source hub, else all)")
    p.add_argument("--recipe", default="auto", choices=["auto", "original", "embedded"],
                   help="data + optimizer recipe: 'original' = the original code's (BOS per document, no EOS, "
                        "L predicted tokens per window; AdamW defaults, bf16 weights); 'embedded' = this project's "
                        "CPU default (EOS between documents; AdamW b2 0.95, wd 0.1, fp32). auto: original for hub")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (GPUs)")
    p.add_argument("--device", default="auto", help="where evaluation and statistics run: auto (this process's "
                   "CUDA GPU when present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                   help="bf16 on GPUs (autocast over float32 weights); default: accelerate launch's "
                        "--mixed_precision, else no")
    p.add_argument("--pure-bf16", action="store_true",
                   help="train in bfloat16 weights, as the original code literally did: AdamW then drops updates "
                        "below a weight's bf16 spacing (DUME+ at lr 1e-5 barely moves); default: float32 weights")
    p.add_argument("--wandb-project", default=None, help="log to wandb (off unless given)")
    p.add_argument("--redo", action="store_true", help="recompute outputs that already exist")
    return p


def setup_threads() -> None:
    """Use the cores we have, shared among the processes `accelerate launch` started on this machine (each
    claiming all of them oversubscribes the CPU N times); tokenizers' own threads fight torch's on 2 cores.
    `DUME_THREADS` overrides."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    share = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, int(os.environ.get("DUME_THREADS", share))))


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that `finally` blocks (staging folders, locks) run as they do for
    Ctrl-C; a BaseException so that no `except Exception` swallows it."""


def _terminate_as_exception():
    """Make SIGTERM raise `Terminated`; returns the previous handler (None off the main thread: cannot be set)."""
    def handler(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def run_main(fn, argv=None) -> int:
    """Run a script's body: user errors and OS errors (a full disk, a folder without permission; the work cannot
    fix either) print one clear line and exit 2; anything else is a bug and keeps its traceback."""
    setup_threads()
    start = time.time()
    previous = _terminate_as_exception()
    try:
        fn(argv)
    except DumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed outputs are kept; rerun to finish the rest", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM): completed outputs are kept, staging folders removed; rerun to finish the rest",
              file=sys.stderr)
        return 143
    except Exception as e:  # OS and safetensors I/O errors: one line naming the file and the fix
        from dume.checkpoint.outputs import os_error_line

        line = os_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"[{Path(sys.argv[0]).name} done in {time.time() - start:.1f}s]", file=sys.stderr)
    return 0


def dume_command(argv=None) -> None:
    """`dume build CONFIG.yaml [--overwrite]` and `dume eval ...` (the console script; `python -m dume` too)."""
    p = argparse.ArgumentParser(prog="dume", description="DUME: combine dense experts into a MoE, training-free")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="MoErge your experts and set the routers from their text (see dume.upcycle.build)")
    b.add_argument("config", help="the build YAML (experts, gate, k, lambda, temperature, ..., out)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    e = sub.add_parser("eval", help="the evaluation report of a built MoE: held-out perplexity of the MoE, each "
                       "expert and model averaging, normalised scores, a routing heatmap (dume.upcycle.evaluate)")
    e.add_argument("target", help="a build YAML (its `out` on the documents it held out), or a MoE folder with --data")
    e.add_argument("--data", action="append", default=[], metavar="DOMAIN=PATH",
                   help="a MoE folder's evaluation documents per domain (a .txt/.jsonl/.json/.parquet file or folder, "
                        "all of it evaluation text); repeat for each domain")
    e.add_argument("--expert", action="append", default=[], metavar="DOMAIN=PATH",
                   help="override an expert checkpoint (default: those the MoE's dume_router.json names)")
    e.add_argument("--field", default="text", help="the text field of JSON/Parquet records")
    e.add_argument("--max-docs", type=int, default=None, help="documents per domain (default: all)")
    e.add_argument("--seq-len", type=int, default=1024, help="tokens per block (a MoE folder; a YAML gives its own)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="auto", help="auto (this process's CUDA GPU when present, else cpu), cpu, "
                   "cuda, cuda:N, mps")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the forward passes (auto: the experts' dtype where the device computes it natively)")
    e.add_argument("--random-routing", action="store_true", help="also evaluate the MoE with seeded random routers")
    e.add_argument("--seed", type=int, default=0, help="the random routers' seed")
    e.add_argument("--keep-averaging", default=None, metavar="DIR",
                   help="keep the model-averaging checkpoint there (default: built in a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.command == "build":
        from dume.upcycle.build import build
        from dume.upcycle.spec import load_spec

        build(load_spec(args.config), overwrite=args.overwrite)
    elif args.command == "eval":
        eval_command(args)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise DumeError(f"{flag} takes DOMAIN=PATH, got {v!r}")
        if name in out:
            raise DumeError(f"{flag} {name} given twice")
        out[name] = path
    return out


def eval_command(args) -> None:
    """`dume eval CONFIG.yaml` or `dume eval MOE_DIR --data DOMAIN=PATH ...`."""
    from dume.checks import positive_int

    positive_int("--batch-size", args.batch_size)
    positive_int("--seq-len", args.seq_len)
    positive_int("--max-docs", args.max_docs, allow_none=True)
    target = Path(args.target)
    if target.is_file():
        if args.data or args.expert:
            raise DumeError("--data and --expert are for a MoE folder; a build YAML names its own data and experts")
        from dume.upcycle.build import evaluate_built
        from dume.upcycle.spec import load_spec

        evaluate_built(load_spec(target), random_routing=args.random_routing or None,
                       keep_averaging=args.keep_averaging)
        return
    if not target.is_dir():
        raise DumeError(f"{target} is neither a build YAML nor a MoE folder")
    from dume.checkpoint.experts import check_experts
    from dume.checkpoint.outputs import output_lock
    from dume.runtime.devices import check_device, compute_dtype, resolve_device
    from dume.text.files import expert_texts
    from dume.upcycle.evaluate import evaluate_moe, moe_experts
    from dume.upcycle.spec import ExpertSpec

    data = _pairs(args.data, "--data")
    if not data:
        raise DumeError(f"{target} is a MoE folder: give its evaluation documents with --data DOMAIN=PATH")
    overrides = _pairs(args.expert, "--expert")
    from dume.moe.recipe import RECIPE_FILE

    experts = moe_experts(target) if (target / RECIPE_FILE).is_file() or not overrides else {}
    experts.update({d: Path(p) for d, p in overrides.items()})
    texts = {d: expert_texts(ExpertSpec(name=d, model="", data=p, field=args.field, max_docs=args.max_docs))[0]
             for d, p in data.items()}
    if args.max_docs is not None:
        texts = {d: t[:args.max_docs] for d, t in texts.items()}
    device = resolve_device(check_device(args.device))
    es = check_experts(list(experts.values()))
    dtype = compute_dtype(args.dtype, device, es.stored_dtype)
    with output_lock(target):
        evaluate_moe(target, texts, experts=experts, seq_len=args.seq_len, batch_size=args.batch_size,
                     device=device, dtype=dtype, random_routing=args.random_routing, seed=args.seed,
                     keep_averaging=args.keep_averaging, expert_set=es)


def main(argv=None) -> int:
    return run_main(dume_command, argv)
