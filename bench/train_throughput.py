#!/usr/bin/env python
"""Training throughput of a Llama: a plain fp32 loop against one with `dume.train.speed`'s switches,
and what the Llama-3 vocabulary's lm_head costs.

One run, one batch of token ids, both variants timed on it in interleaved repeats (the
order alternates every repeat, so machine noise hits both alike). A timed block is
`--steps` training steps: forward with labels, backward, gradient clipping at 1.0,
AdamW step (weight decay 0.1 on matrices, 0 on norms, betas 0.9/0.95), zero_grad.

  plain      fp32, "eager" attention, torch's default AdamW (foreach on CUDA, for-loop on
             a CPU), IEEE fp32 matmuls, no compile
  optimised  everything of `dume.train.speed` that applies on the device: bf16 autocast on CUDA
             (on a CPU fp32: bf16 autocast there is usually slower), `attn_implementation`
             ("sdpa"), `make_adamw` (fused on CUDA), `enable_fast_matmul` (TF32 on CUDA),
             and `maybe_compile` with --compile

Printed: tokens/s of each, optimised ÷ plain, model FLOPs per token (`model_flops_per_token`:
6·N + 12·L·d·T), achieved FLOP/s and MFU against `peak_flops` (n/a on a CPU). Then the
vocabulary: the optimised variant at two vocabulary sizes (Llama-3's 128256 and a small
one), the lm_head's share of the FLOPs and of the parameters, and the measured time.

    python bench/train_throughput.py --preset tiny              # ~40 s on 2 CPU cores
    python bench/train_throughput.py --preset paper-115m --batch 1 --steps 2 --repeats 2   # ~4 min
    python bench/train_throughput.py --preset paper-115m --device cuda --compile --json out.json

Measured on this machine (2 CPU cores) on 2026-11-23, nothing else running (load average
0.2-0.4 before each run), exactly as printed:

  $ python bench/train_throughput.py --preset tiny                         (38 s)

    DUME training throughput benchmark
      hardware : Intel(R) Xeon(R) Processor | device cpu | 2 usable cores, torch threads 2
      versions : python 3.11.7, torch 2.13.0+cpu, transformers 5.23.0
      load avg : 0.22 before, 1.01 after (1-min; 'after' counts this run's threads)
      model    : preset tiny: hidden 128, intermediate 512, 4 layers, 4 heads, vocab 4096, 2.1M parameters
      tokens   : batch 8 x seq 256, 4 steps per block = 8192 tokens; 2 warmup steps + 5 interleaved blocks per variant
      plain    : fp32, attention 'eager', AdamW torch default (not fused), TF32 off, no compile
      optimised: fp32 (no bf16 autocast on a CPU: usually slower there), attention 'sdpa', AdamW torch default (not fused on a CPU), TF32 n/a on a CPU, compile off
      checks   : initial loss plain 8.346611, optimised 8.346611 (|diff| 0.00e+00; same weights, same batch)
      warmup   : plain 0.7s, optimised 0.3s

      variant       median s    min s    max s  spread   tokens/s   GFLOP/s     MFU
      plain            0.791    0.748    0.882     17%      10353     114.0     n/a
      optimised        0.727    0.717    0.740      3%      11266     124.0     n/a
      optimised ÷ plain throughput: 1.103 (median of per-repeat ratios, range [1.04, 1.19]; of minimums 1.042)
      model FLOPs per token: 0.0110 G (6·N + 12·L·d·T, N = non-embedding matmul parameters incl. lm_head); MFU n/a (no known peak for this device)

      lm_head / vocabulary cost (optimised variant, batch 2 x seq 256, 4 steps per block, 5 interleaved blocks)
         vocab    params  emb+head  FLOPs/tok  lm_head   step s  tokens/s  spread
        128256     33.9M     96.9%    0.1064G    92.6%    0.929       551     24%
          4096      2.1M     50.0%    0.0110G    28.6%    0.050     10298      6%
      (emb+head: embedding + lm_head share of the parameters; lm_head: its share of the FLOPs per token)
      time at vocab 128256 ÷ at 4096: 18.42 (range [16.90, 21.42]); the extra 124160 vocabulary entries take 94.6% of the step
      vocabulary-dependent share of the step at 128256 (linear in V from the two points: lm_head, embedding, their AdamW updates, logits and loss): 97.8%

      wall time: 36.4s

  $ python bench/train_throughput.py --preset paper-115m --batch 1 --steps 2 --repeats 2   (3 min 43 s)

    DUME training throughput benchmark
      hardware : Intel(R) Xeon(R) Processor | device cpu | 2 usable cores, torch threads 2
      versions : python 3.11.7, torch 2.13.0+cpu, transformers 5.23.0
      load avg : 0.44 before, 1.89 after (1-min; 'after' counts this run's threads)
      model    : preset paper-115m: hidden 768, intermediate 3072, 12 layers, 12 heads, vocab 128256, 310.3M parameters
      tokens   : batch 1 x seq 1024, 2 steps per block = 2048 tokens; 1 warmup steps + 2 interleaved blocks per variant
      plain    : fp32, attention 'eager', AdamW torch default (not fused), TF32 off, no compile
      optimised: fp32 (no bf16 autocast on a CPU: usually slower there), attention 'sdpa', AdamW torch default (not fused on a CPU), TF32 n/a on a CPU, compile off
      checks   : initial loss plain 11.918083, optimised 11.918083 (|diff| 0.00e+00; same weights, same batch)
      warmup   : plain 19.7s, optimised 16.0s

      variant       median s    min s    max s  spread   tokens/s   GFLOP/s     MFU
      plain           23.427   22.588   24.265      7%         87     121.0     n/a
      optimised       18.915   18.584   19.246      4%        108     149.8     n/a
      optimised ÷ plain throughput: 1.238 (median of per-repeat ratios, range [1.22, 1.26]; of minimums 1.216)
      model FLOPs per token: 1.3837 G (6·N + 12·L·d·T, N = non-embedding matmul parameters incl. lm_head); MFU n/a (no known peak for this device)

      lm_head / vocabulary cost (optimised variant, batch 1 x seq 1024, 2 steps per block, 2 interleaved blocks)
         vocab    params  emb+head  FLOPs/tok  lm_head   step s  tokens/s  spread
        128256    310.3M     63.5%    1.3837G    42.7%   10.638        96     20%
         32000    162.4M     30.3%    0.9402G    15.7%    4.264       240      4%
      (emb+head: embedding + lm_head share of the parameters; lm_head: its share of the FLOPs per token)
      time at vocab 128256 ÷ at 32000: 2.49 (range [2.30, 2.68]); the extra 96256 vocabulary entries take 59.9% of the step
      vocabulary-dependent share of the step at 128256 (linear in V from the two points: lm_head, embedding, their AdamW updates, logits and loss): 79.8%

      wall time: 220.5s

Reading them: on this CPU the optimised variant is SDPA instead of eager attention and
nothing else (bf16, fused AdamW, TF32 do not apply), worth 1.10x on tiny and 1.24x on
paper-115m at seq 1024. With the Llama-3 vocabulary the lm_head is 43 % of paper-115m's
FLOPs but ~60-80 % of a CPU step. Not broken down here; the likely rest: the embedding
and lm_head are 64 % of the parameters, updated by the unfused CPU AdamW, and the fp32
[T, 128256] logits and their loss are memory-bound work that FLOPs do not count.
GPU figures (bf16, fused AdamW, TF32, MFU) need a GPU run:
`--preset paper-115m --device cuda [--compile]`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moe_throughput import usable_cores  # noqa: E402  (bench/ is the script's own folder)
from dume.train.speed import (attn_implementation, enable_fast_matmul, make_adamw, maybe_compile,
    model_flops_per_token, peak_flops)

# Per preset: model size, then defaults per device (cpu / cuda) for batch and steps.
PRESETS = {
    # for the tests: a few seconds end to end
    "micro": dict(hidden=32, intermediate=64, layers=2, heads=4, vocab=512, seq=32,
                  batch=(2, 8), steps=(2, 5), repeats=2, warmup=1, vocab_compare=(4096, 512)),
    # the embedded default's size (dume.train.models "cpu-small")
    "tiny": dict(hidden=128, intermediate=512, layers=4, heads=4, vocab=4096, seq=256,
                 batch=(8, 32), steps=(4, 20), repeats=5, warmup=2, vocab_compare=(128256, 4096)),
    "small": dict(hidden=256, intermediate=1024, layers=4, heads=4, vocab=4096, seq=256,
                  batch=(4, 32), steps=(3, 20), repeats=3, warmup=2, vocab_compare=(128256, 4096)),
    # the paper's seed model with the Llama-3 vocabulary; meant for a GPU
    "paper-115m": dict(hidden=768, intermediate=3072, layers=12, heads=12, vocab=128256, seq=1024,
                       batch=(1, 16), steps=(2, 20), repeats=2, warmup=1, vocab_compare=(128256, 32000)),
}
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


# ------------------------------------------------------------------------------ setup


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: per preset and device)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed block")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first")
    p.add_argument("--compile", action="store_true", help="torch.compile the optimised variant")
    p.add_argument("--vocab-compare", default=None, metavar="V1,V2",
                   help="the two vocabulary sizes of the lm_head section (default: per preset), or 'none'")
    p.add_argument("--vocab-batch", type=int, default=None,
                   help="batch of the lm_head section (default: min(batch, 2) on a CPU, batch on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "steps", "repeats", "warmup", "vocab_batch"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else 'positive'}")
    if args.vocab_compare is not None and args.vocab_compare != "none":
        try:
            vc = tuple(int(v) for v in args.vocab_compare.split(","))
        except ValueError:
            vc = ()
        if len(vc) != 2 or min(vc) < 2 or vc[0] == vc[1]:
            p.error("--vocab-compare takes two different vocabulary sizes, e.g. 128256,32000, or 'none'")
        args.vocab_compare = vc
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return dev


def fill_defaults(args, device):
    pre = PRESETS[args.preset]
    i = 1 if device.type == "cuda" else 0
    for name, value in (("batch", pre["batch"][i]), ("seq", pre["seq"]), ("steps", pre["steps"][i]),
                        ("repeats", pre["repeats"]), ("warmup", pre["warmup"]),
                        ("vocab_compare", pre["vocab_compare"])):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.vocab_compare == "none":
        args.vocab_compare = None
    if args.vocab_batch is None:
        args.vocab_batch = args.batch if device.type == "cuda" else min(args.batch, 2)


def hardware(device: torch.device) -> dict:
    """moe_throughput's machine description, plus the library versions."""

    from moe_throughput import hardware as machine

    from dume.runtime.environment import versions

    return {**machine(device), **versions(("torch", "transformers"))}


def llama_config(args, vocab: int, attn: str):
    from transformers import LlamaConfig

    pre = PRESETS[args.preset]
    return LlamaConfig(vocab_size=vocab, hidden_size=pre["hidden"], intermediate_size=pre["intermediate"],
                       num_hidden_layers=pre["layers"], num_attention_heads=pre["heads"],
                       num_key_value_heads=pre["heads"], max_position_embeddings=max(args.seq, 256),
                       rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation=attn)


class Variant:
    """One model + optimizer + precision settings + its batch; `block(n)` runs n training steps."""

    def __init__(self, name, model, ids, device, *, optimised: bool, compile_: bool = False):
        self.name, self.device = name, device
        self.ids, self.mask = ids, torch.ones_like(ids)
        self.matmul = {}
        self.module = model  # the uncompiled module (checks, parameter counts)
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        if optimised:
            self.opt = make_adamw(groups, LR, BETAS, EPS, device)
            self.model = maybe_compile(model, compile_)
            self.bf16 = device.type == "cuda"
            self.tf32 = device.type == "cuda"
        else:
            self.opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
            self.model = model
            self.bf16 = self.tf32 = False
        self.fused = bool(self.opt.defaults.get("fused"))

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_matmul(self):
        # TF32 is process-wide: set it for this variant before each of its blocks.
        self.matmul = enable_fast_matmul(self.device, self.tf32)

    def block(self, n: int):
        self.set_matmul()
        for _ in range(n):
            with self.autocast():
                loss = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss

    @torch.no_grad()
    def initial_loss(self) -> float:
        self.set_matmul()
        with self.autocast():
            return self.module(input_ids=self.ids, attention_mask=self.mask, labels=self.ids).loss.float().item()


def make_sync(device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(variants: dict, args, sync) -> tuple[dict, dict]:
    """Warmup, then `repeats` timed blocks per variant; the order rotates every repeat."""
    warm = {}
    for name, v in variants.items():
        sync()
        t0 = time.perf_counter()
        if args.warmup:
            v.block(args.warmup)
        sync()
        warm[name] = time.perf_counter() - t0
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            variants[n].block(args.steps)
            sync()
            times[n].append(time.perf_counter() - t0)
    return times, warm


def summarise(times: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "spread_pct": 100.0 * (max(times) - min(times)) / med, "tokens_per_s": tokens / med, "times_s": times}


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Per-repeat ratios (the variants of one repeat ran back to back): median and range."""
    r = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "per_repeat": r,
            "of_minimums": min(num) / min(den)}


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------- main


def main(argv=None):
    t_start = time.perf_counter()
    args = parse(argv)
    torch.set_num_threads(args.threads if args.threads is not None else usable_cores())
    device = pick_device(args.device)
    fill_defaults(args, device)
    sync = make_sync(device)

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    pre = PRESETS[args.preset]
    gen = torch.Generator().manual_seed(args.seed + 12345)
    load_before = os.getloadavg()

    # ---------------------------------------------------------------- plain vs optimised
    opt_attn = attn_implementation(device)
    cfg_plain = llama_config(args, pre["vocab"], "eager")
    torch.manual_seed(args.seed)
    plain_model = LlamaForCausalLM(cfg_plain).to(device).train()
    opt_model = LlamaForCausalLM(llama_config(args, pre["vocab"], opt_attn)).to(device).train()
    opt_model.load_state_dict(plain_model.state_dict())  # same weights
    ids = torch.randint(0, pre["vocab"], (args.batch, args.seq), generator=gen).to(device)
    variants = {"plain": Variant("plain", plain_model, ids, device, optimised=False),
                "optimised": Variant("optimised", opt_model, ids, device, optimised=True, compile_=args.compile)}
    tokens = args.steps * ids.numel()
    init_loss = {n: v.initial_loss() for n, v in variants.items()}
    n_params = sum(p.numel() for p in plain_model.parameters())
    times, warm = time_interleaved(variants, args, sync)
    tf32_state = variants["optimised"].matmul  # what the optimised variant ran with ({} on a CPU)
    enable_fast_matmul(device, False)
    fused = {n: v.fused for n, v in variants.items()}
    del variants, plain_model, opt_model
    release_memory()

    fpt = model_flops_per_token(cfg_plain, args.seq)
    peak = peak_flops(device, torch.bfloat16)
    res = {n: summarise(t, tokens) for n, t in times.items()}
    for r in res.values():
        r["flops_per_s"] = fpt * r["tokens_per_s"]
        r["mfu_vs_bf16_peak"] = r["flops_per_s"] / peak if peak else None
    ratio = paired_ratio(times["plain"], times["optimised"])  # throughput ratio optimised ÷ plain

    # ---------------------------------------------------------------- lm_head / vocabulary
    vocab = None
    if args.vocab_compare:
        vmodels = {}
        for V in args.vocab_compare:
            torch.manual_seed(args.seed)
            m = LlamaForCausalLM(llama_config(args, V, opt_attn)).to(device).train()
            vids = torch.randint(0, V, (args.vocab_batch, args.seq), generator=gen).to(device)
            vmodels[f"vocab {V}"] = Variant(f"vocab {V}", m, vids, device, optimised=True)
        vtimes, vwarm = time_interleaved(vmodels, args, sync)
        enable_fast_matmul(device, False)
        vtok = args.steps * args.vocab_batch * args.seq
        H = pre["hidden"]
        rows = {}
        for V in args.vocab_compare:
            cfg_v = vmodels[f"vocab {V}"].module.config
            f = model_flops_per_token(cfg_v, args.seq)
            n = sum(p.numel() for p in vmodels[f"vocab {V}"].params)
            s = summarise(vtimes[f"vocab {V}"], vtok)
            rows[V] = dict(s, flops_per_token=f, lm_head_flops_share=6 * H * V / f, params=n,
                           embed_lm_head_params_share=2 * H * V / n,
                           step_s=s["median_s"] / args.steps)
        big, small = max(args.vocab_compare), min(args.vocab_compare)
        t_big, t_small = rows[big]["median_s"], rows[small]["median_s"]
        # Linear in V: t = t0 + c·V; the V-dependent part (lm_head, embedding, their
        # AdamW updates, the logits and the loss) at V = big is c·big / t_big.
        c = (t_big - t_small) / (big - small)
        vocab = {"batch": args.vocab_batch, "seq": args.seq, "rows": rows, "warmup_s": vwarm,
                 "time_ratio_big_over_small": paired_ratio(vtimes[f"vocab {big}"], vtimes[f"vocab {small}"]),
                 "extra_time_share": (t_big - t_small) / t_big,
                 "vocab_time_share_linear_estimate": c * big / t_big}
        del vmodels, m
        release_memory()

    load_after = os.getloadavg()
    wall = time.perf_counter() - t_start

    # ---------------------------------------------------------------------- report
    hw = hardware(device)
    on_cpu = device.type == "cpu"
    lines = []
    w = lines.append
    w("DUME training throughput benchmark")
    w(f"  hardware : {hw['cpu']}" + (f" | GPU {hw['gpu']}" if "gpu" in hw else "")
      + f" | device {hw['device']} | {hw['cores']} usable cores, torch threads {hw['torch_threads']}")
    w(f"  versions : python {hw['python']}, torch {hw['torch']}, transformers {hw['transformers']}")
    w(f"  load avg : {load_before[0]:.2f} before, {load_after[0]:.2f} after (1-min; 'after' counts this run's threads)"
      + ("  <- busy machine before the run: other processes compete for the cores, figures are noisy"
         if on_cpu and load_before[0] > 0.5 * hw["cores"] else ""))
    w(f"  model    : preset {args.preset}: hidden {pre['hidden']}, intermediate {pre['intermediate']}, "
      f"{pre['layers']} layers, {pre['heads']} heads, vocab {pre['vocab']}, {n_params / 1e6:.1f}M parameters")
    w(f"  tokens   : batch {args.batch} x seq {args.seq}, {args.steps} steps per block = {tokens} tokens; "
      f"{args.warmup} warmup steps + {args.repeats} interleaved blocks per variant")
    w(f"  plain    : fp32, attention 'eager', AdamW {'fused' if fused['plain'] else 'torch default (not fused)'}, "
      f"TF32 off, no compile")
    w(f"  optimised: {'bf16 autocast' if not on_cpu else 'fp32 (no bf16 autocast on a CPU: usually slower there)'}, "
      f"attention {opt_attn!r}, AdamW {'fused' if fused['optimised'] else 'torch default (not fused on a CPU)'}, "
      f"TF32 {tf32_state or 'n/a on a CPU'}, compile {'on' if args.compile else 'off'}")
    w(f"  checks   : initial loss plain {init_loss['plain']:.6f}, optimised {init_loss['optimised']:.6f} "
      f"(|diff| {abs(init_loss['plain'] - init_loss['optimised']):.2e}; same weights, same batch)")
    w("  warmup   : " + ", ".join(f"{n} {t:.1f}s" for n, t in warm.items())
      + (" (includes torch.compile)" if args.compile else ""))
    w("")
    w(f"  {'variant':<12}{'median s':>10}{'min s':>9}{'max s':>9}{'spread':>8}{'tokens/s':>11}"
      f"{'GFLOP/s':>10}{'MFU':>8}")
    for n, r in res.items():
        mfu = f"{100 * r['mfu_vs_bf16_peak']:.1f}%" if r["mfu_vs_bf16_peak"] is not None else "n/a"
        w(f"  {n:<12}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['max_s']:>9.3f}{r['spread_pct']:>7.0f}%"
          f"{r['tokens_per_s']:>11.0f}{r['flops_per_s'] / 1e9:>10.1f}{mfu:>8}")
    w(f"  optimised ÷ plain throughput: {ratio['median']:.3f} (median of per-repeat ratios, range "
      f"[{ratio['min']:.2f}, {ratio['max']:.2f}]; of minimums {ratio['of_minimums']:.3f})")
    w(f"  model FLOPs per token: {fpt / 1e9:.4f} G (6·N + 12·L·d·T, N = non-embedding matmul parameters incl. "
      f"lm_head); MFU " + (f"against the bf16 dense peak {peak / 1e12:.0f} TFLOP/s" if peak
                           else "n/a (no known peak for this device)"))
    if vocab:
        w("")
        w(f"  lm_head / vocabulary cost (optimised variant, batch {vocab['batch']} x seq {vocab['seq']}, "
          f"{args.steps} steps per block, {args.repeats} interleaved blocks)")
        w(f"  {'vocab':>8}{'params':>10}{'emb+head':>10}{'FLOPs/tok':>11}{'lm_head':>9}{'step s':>9}"
          f"{'tokens/s':>10}{'spread':>8}")
        for V, r in vocab["rows"].items():
            w(f"  {V:>8}{r['params'] / 1e6:>9.1f}M{100 * r['embed_lm_head_params_share']:>9.1f}%"
              f"{r['flops_per_token'] / 1e9:>10.4f}G{100 * r['lm_head_flops_share']:>8.1f}%{r['step_s']:>9.3f}"
              f"{r['tokens_per_s']:>10.0f}{r['spread_pct']:>7.0f}%")
        big, small = max(args.vocab_compare), min(args.vocab_compare)
        tr = vocab["time_ratio_big_over_small"]
        w("  (emb+head: embedding + lm_head share of the parameters; lm_head: its share of the FLOPs per token)")
        w(f"  time at vocab {big} ÷ at {small}: {tr['median']:.2f} (range [{tr['min']:.2f}, {tr['max']:.2f}]); "
          f"the extra {big - small} vocabulary entries take {100 * vocab['extra_time_share']:.1f}% of the step")
        w(f"  vocabulary-dependent share of the step at {big} (linear in V from the two points: lm_head, "
          f"embedding, their AdamW updates, logits and loss): {100 * vocab['vocab_time_share_linear_estimate']:.1f}%")
    w("")
    w(f"  wall time: {wall:.1f}s")
    text = "\n".join(lines)
    print(text)

    if args.json:
        doc = {"hardware": hw, "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
               "load_average_1min": {"before": load_before[0], "after": load_after[0]},
               "model": {k: pre[k] for k in ("hidden", "intermediate", "layers", "heads", "vocab")},
               "parameters": n_params, "tokens_per_block": tokens, "optimised_attention": opt_attn,
               "fused_adamw": fused, "tf32": tf32_state, "initial_loss": init_loss, "warmup_s": warm,
               "variants": res, "optimised_over_plain_throughput": ratio, "flops_per_token": fpt,
               "peak_flops_bf16": peak,
               "vocab": vocab and {**vocab, "rows": {str(k): v for k, v in vocab["rows"].items()}},
               "wall_s": wall, "table": text}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
