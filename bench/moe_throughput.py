#!/usr/bin/env python
"""Throughput of a DUME MoE (k = 1) against one dense expert, the original code's
masked all-experts MoE, and the cost of collecting DUME's statistics.

One run, one batch of token ids, every variant timed on it in interleaved repeats (the
order rotates every repeat, so machine noise hits all variants alike):

  dense      one expert, `LlamaForCausalLM` (what k = 1 should cost)
  moe[impl]  the MoErged `MixtralForCausalLM` (loaded with `from_pretrained`), random
             router, k = 1, for transformers' default experts implementation and the
             alternatives that fit (eager / grouped_mm / batched_mm)
  masked     the original code's MoE: every expert evaluated on every token, outputs
             multiplied by a dense top-1 weight mask and summed (a module swapped into
             the MoE's layers; same gates; its logits are checked against the sparse MoE's)
  oracle     plain forward of the dense oracle (averaged non-MLP + expert 0's MLPs)
  collect    `dume.stats.oracle.collect_domain` into a `dume.stats.ridge.RidgeStats` on that oracle

Targets: MoE ÷ dense throughput ≥ 0.9; collection time ÷ oracle forward time ≤ 1.15.
A cost breakdown of the collection (hooks, XᵀX, the rest of `RidgeStats.update`, the
logits nobody reads) and a FLOP count follow the table.

    python bench/moe_throughput.py                    # ~1-3 min on 2 CPU cores
    python bench/moe_throughput.py --preset tiny --repeats 3
    python bench/moe_throughput.py --preset paper-115m --device cuda --dtype bfloat16
    python bench/moe_throughput.py --experts runs/clm/experts/* --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# collect_domain wraps its batches in tqdm; one progress line per timed call is noise here.
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PRESETS = {
    # the embedded default's model size (dume.train.models "cpu-small")
    "tiny": dict(hidden=128, intermediate=512, layers=4, heads=4, vocab=4096, batch=16, seq=256),
    # twice as wide: big enough that matmuls, not Python, dominate on a CPU
    "default": dict(hidden=256, intermediate=1024, layers=4, heads=4, vocab=4096, batch=16, seq=256),
    # the paper's 115M seed (Llama-3 vocabulary); meant for a GPU
    "paper-115m": dict(hidden=768, intermediate=3072, layers=12, heads=12, vocab=128256, batch=16, seq=1024),
}
TARGET_MOE_VS_DENSE = 0.9
TARGET_COLLECT_OVERHEAD = 1.15
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KNOWN_IMPLS = ("eager", "grouped_mm", "batched_mm")


# ------------------------------------------------------------------------------ setup


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    for name, typ in (("hidden", int), ("intermediate", int), ("layers", int), ("heads", int), ("vocab", int),
                      ("batch", int), ("seq", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help=f"override the preset's {name}")
    p.add_argument("--num-experts", type=int, default=5, help="D synthetic experts (ignored with --experts)")
    p.add_argument("--experts", nargs="+", default=None, metavar="DIR",
                   help="real Llama expert checkpoints to MoErge instead of synthetic ones")
    p.add_argument("--perturb", type=float, default=0.5,
                   help="synthetic experts: MLP weights += perturb * std(W) * N(0,1) around one seed model")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per variant first")
    p.add_argument("--impls", default="auto",
                   help="experts implementations to time, comma-separated, or 'auto' (the default one + "
                        f"the others of {KNOWN_IMPLS} that fit in --max-gather-gib)")
    p.add_argument("--max-gather-gib", type=float, default=2.0,
                   help="skip batched_mm when its per-token weight gather would exceed this")
    p.add_argument("--num-dume-tokens", type=int, default=None,
                   help="collect_domain's num_dume_tokens (default: all tokens, the full forward)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-breakdown", action="store_true", help="skip the collection cost breakdown")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--keep", default=None, metavar="DIR", help="build the checkpoints here and keep them")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.experts is None and args.num_experts < 2:
        p.error("--num-experts must be >= 2")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return dev


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def hardware(device: torch.device) -> dict:
    from dume.runtime.environment import cpu_name

    hw = {"cpu": cpu_name(), "cores": usable_cores(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def versions() -> dict:
    """The shared record (`dume.runtime.environment.versions`) and the commit of dume/."""
    from dume.runtime.environment import versions as library_versions

    v = library_versions(("torch", "transformers"))
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "dume"], capture_output=True,
                               text=True, check=True).stdout.strip()
        v["dume_commit"] = rev + ("+dirty(dume/)" if dirty else "")
    return v


def build_synthetic_experts(args, out: Path) -> list[Path]:
    """D Llama experts from one seed model, each with its MLPs perturbed (attention and
    embeddings perturbed less, as fine-tuning would), saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, 256),
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).eval()
    seed_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    dirs = []
    for d in range(args.num_experts):
        gen = torch.Generator().manual_seed(args.seed * 1000 + d + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                w = seed_state[n]
                scale = args.perturb if ".mlp." in n else args.perturb * 0.05
                p.copy_(w + scale * w.float().std() * torch.randn(w.shape, generator=gen, dtype=w.dtype))
        path = out / f"expert{d}"
        model.save_pretrained(str(path))
        dirs.append(path)
    return dirs


# ------------------------------------------------------------------- masked all-experts


class MaskedAllExperts(torch.nn.Module):
    """The original code's MoE block: all D experts on all tokens, outputs weighted by a
    dense [N, D] top-k weight mask (one-hot × 1 at k = 1) and summed. Shares the gate and
    expert weights of the `MixtralSparseMoeBlock` it replaces."""

    def __init__(self, block):
        super().__init__()
        self.gate = block.gate
        self.experts = block.experts

    def forward(self, hidden_states):
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(-1, H)
        _, top_w, top_i = self.gate(x)
        mask = torch.zeros(x.shape[0], self.experts.num_experts, dtype=top_w.dtype, device=x.device)
        mask.scatter_(1, top_i, top_w)
        mask = mask.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.experts.num_experts):
            gate, up = F.linear(x, self.experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.experts.act_fn(gate) * up, self.experts.down_proj[e])
            out += y * mask[:, e, None]
        return out.reshape(B, T, H)


class MLPSwap:
    """Reusable swap of every decoder layer's `mlp` (enter / exit any number of times)."""

    def __init__(self, model, replacements):
        self.layers = list(model.model.layers)
        self.replacements = list(replacements)
        self.originals = [layer.mlp for layer in self.layers]

    def __enter__(self):
        for layer, rep in zip(self.layers, self.replacements):
            layer.mlp = rep
        return self

    def __exit__(self, *exc):
        for layer, orig in zip(self.layers, self.originals):
            layer.mlp = orig


class NoLMHead(torch.nn.Module):
    """What-if for `collect_domain`: the same decoder stack, no lm_head / logits.
    `collect_domain` only needs `.model.layers` and a forward; this is what calling
    `model.model(...)` (or `model(..., logits_to_keep=1)`) inside it would cost."""

    def __init__(self, causal_lm):
        super().__init__()
        self.model = causal_lm.model

    def forward(self, **kwargs):
        return self.model(**kwargs)


# ------------------------------------------------------------------------------ timing


def make_sync(device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def summarise(times: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    return {
        "median_s": med, "min_s": min(times), "max_s": max(times),
        "spread_pct": 100.0 * (max(times) - min(times)) / med,
        "tokens_per_s": tokens / med, "times_s": times,
    }


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Per-repeat ratios (the variants of one repeat ran back to back): median and range."""
    r = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "per_repeat": r}


def forward_flops(cfg, batch: int, seq: int) -> dict:
    """2 × multiply-adds of one forward: per layer the linear maps (attention + one MLP) and
    the attention scores and values (counted over the full T×T square, as a CPU SDPA kernel
    without causal block skipping computes them), and the lm_head. Norms, RoPE, softmax
    and the router (2·N·H·D per layer) are left out."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    nh = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or nh
    hd = getattr(cfg, "head_dim", None) or H // nh
    N = batch * seq
    attn_lin = 2 * N * (H * nh * hd * 2 + H * kv * hd * 2)
    attn_sdpa = 2 * 2 * batch * nh * seq * seq * hd  # QKᵀ and AV, full square
    mlp = 2 * N * 3 * H * I
    lm_head = 2 * N * H * V
    xtx = 2 * N * H * H  # one layer's XᵀX
    return {"per_layer_attention_linear": attn_lin, "per_layer_attention_scores_full": attn_sdpa,
            "per_layer_mlp": mlp, "lm_head": lm_head,
            "total": L * (attn_lin + attn_sdpa + mlp) + lm_head, "xtx_per_layer": xtx, "xtx_all_layers": L * xtx}


# -------------------------------------------------------------------- collection costs


def batched_update(stats, j, feats, keep):
    """What-if for `RidgeStats.update_all_layers`: one bmm for all layers' XᵀX, one finiteness
    check on Σx (a NaN/inf feature reaches Σx), one float64 add — L× fewer kernel launches
    and thread-pool barriers, the same float32-then-float64 numerics."""
    H = stats.hidden_size
    x = torch.stack([f.reshape(-1, H) for f in feats]).to(torch.float32)  # [L, N, H]
    m = keep.reshape(1, -1, 1)
    x = torch.where(m, x, 0.0)
    xtx = torch.bmm(x.transpose(1, 2), x)
    sx = x.sum(dim=1)
    if not bool(torch.isfinite(sx).all()):
        raise RuntimeError("non-finite features")
    stats.A[:, j] += xtx.to(torch.float64)
    stats.s[:, j] += sx.to(torch.float64)
    stats.n[:, j] += keep.sum()


def collection_breakdown(oracle, ids, mask, cfg, repeats, sync, num_dume_tokens):
    """Where collect_domain's extra time goes, measured piece by piece on the same batch
    (the update pieces on the last layer's captured features, L times)."""
    from dume.stats.capture import MLPInputCapture, token_mask
    from dume.stats.ridge import RidgeStats

    L, H = cfg.num_hidden_layers, cfg.hidden_size

    def t(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    if num_dume_tokens is not None:
        ids, mask = ids[:, :num_dume_tokens], mask[:, :num_dume_tokens]
    keep = token_mask(mask, num_dume_tokens)
    with MLPInputCapture(oracle) as cap:
        oracle(input_ids=ids, attention_mask=mask)
        feats = [f.clone() for f in cap.features]
    stats = RidgeStats(L, H, ["d"], device=ids.device)
    x0 = feats[-1].reshape(-1, H).to(torch.float32)
    m0 = keep.reshape(-1)
    xtx0 = x0.T @ x0

    pieces = {
        "forward (full logits)": lambda: oracle(input_ids=ids, attention_mask=mask),
        "forward + capture hooks only": None,
        "forward without lm_head (model.model)": lambda: oracle.model(input_ids=ids, attention_mask=mask),
        "forward, logits_to_keep=1": lambda: oracle(input_ids=ids, attention_mask=mask, logits_to_keep=1),
        "RidgeStats.update x L": lambda: [stats.update(l, "d", feats[l], keep) for l in range(L)],
        "  mask multiply x L": lambda: [x0 * m0.unsqueeze(1).to(torch.float32) for _ in range(L)],
        "  XᵀX float32 x L": lambda: [x0.T @ x0 for _ in range(L)],
        "  Σx x L": lambda: [x0.sum(0) for _ in range(L)],
        "  isfinite checks x L": lambda: [bool(torch.isfinite(xtx0).all()) for _ in range(L)],
        "  float64 accumulate x L": lambda: [stats.A[l, 0].add_(xtx0.to(torch.float64)) for l in range(L)],
        "what-if: one batched update, all L": lambda: batched_update(stats, 0, feats, keep),
    }

    def hooked():
        with MLPInputCapture(oracle):
            oracle(input_ids=ids, attention_mask=mask)

    pieces["forward + capture hooks only"] = hooked
    times = {k: [] for k in pieces}
    for k, fn in pieces.items():
        if not k.startswith("forward"):  # the forwards are warm from the main loop
            fn()
    for r in range(repeats):
        for k, fn in pieces.items():
            times[k].append(t(fn))
    # The minimum: the least disturbed run of each piece (noise only ever adds time).
    return {k: min(v) for k, v in times.items()}


# -------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(usable_cores())
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    sync = make_sync(device)

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from dume.stats.oracle import collect_domain
    from dume.moe.merge import build_oracle_model, moerge_experts
    from dume.moe.edit import load_moe
    from dume.stats.ridge import RidgeStats
    from dume.routers.closed_form import random_gates

    hf_logging.set_verbosity_error()
    t_setup = time.perf_counter()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="dume-bench-") if args.keep is None else contextlib.nullcontext(args.keep)
    with tmp_ctx as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        if args.experts:
            expert_dirs = [Path(d) for d in args.experts]
            source = "real experts: " + ", ".join(str(d) for d in expert_dirs)
        else:
            expert_dirs = build_synthetic_experts(args, tmp)
            source = f"synthetic: one seed, MLPs perturbed by {args.perturb}·std (seed {args.seed})"
        dense = LlamaForCausalLM.from_pretrained(str(expert_dirs[0]), dtype=dtype).to(device).eval()
        cfg = dense.config
        D, L, H = len(expert_dirs), cfg.num_hidden_layers, cfg.hidden_size
        gates = random_gates(L, D, H, seed=args.seed)
        moe_dir = moerge_experts(expert_dirs, tmp / "moe", gates=gates, num_experts_per_tok=1)
        moe = load_moe(moe_dir, dtype=dtype).to(device).eval()
        default_impl = moe.config._experts_implementation
        oracle = build_oracle_model(expert_dirs, 0, dtype=dtype).to(device).eval()
        setup_s = time.perf_counter() - t_setup

        gen = torch.Generator().manual_seed(args.seed + 12345)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
        mask = torch.ones_like(ids)
        N = ids.numel()

        # Which experts implementations to time.
        gather_gib = N * 3 * cfg.intermediate_size * H * torch.empty((), dtype=dtype).element_size() / 2**30
        skipped = {}
        if args.impls == "auto":
            impls = [default_impl] + [i for i in KNOWN_IMPLS if i != default_impl]
        else:
            impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        chosen = []
        for impl in impls:
            if impl == "batched_mm" and gather_gib > args.max_gather_gib:
                skipped[impl] = (f"would gather {gather_gib:.1f} GiB of expert weights per layer "
                                 f"(one [3·I, H] copy per token) > --max-gather-gib {args.max_gather_gib}")
                continue
            chosen.append(impl)

        def set_impl(impl):
            moe.set_experts_implementation(impl)
            got = moe.model.layers[0].mlp.experts.config._experts_implementation
            if got != impl:
                raise RuntimeError(f"asked for experts_implementation {impl!r}, the experts use {got!r}")

        masked = [MaskedAllExperts(layer.mlp) for layer in moe.model.layers]
        stats = RidgeStats(L, H, ["d0"], device=device)

        def call(model):
            return lambda: model(input_ids=ids, attention_mask=mask)

        def collect():
            collect_domain(oracle, stats, "d0", [(ids, mask)], num_dume_tokens=args.num_dume_tokens)

        def collect_no_head():
            collect_domain(NoLMHead(oracle), stats, "d0", [(ids, mask)], num_dume_tokens=args.num_dume_tokens)

        # name -> (prepare, timed call, undo); only the call is timed.
        swap = MLPSwap(moe, masked)
        variants = {"dense": (None, call(dense), None)}
        for impl in chosen:
            variants[f"moe[{impl}]"] = ((lambda i=impl: set_impl(i)), call(moe), None)
        variants["masked"] = (swap.__enter__, call(moe), swap.__exit__)
        variants["oracle"] = (None, call(oracle), None)
        variants["collect"] = (None, collect, None)
        variants["collect-no-lm_head"] = (None, collect_no_head, None)

        def run_variant(name):
            prep, fn, undo = variants[name]
            if prep:
                prep()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            dt = time.perf_counter() - t0
            if undo:
                undo()
            return dt

        with torch.inference_mode():
            # Correctness first: every MoE variant must compute the same logits.
            checks = {}
            set_impl(default_impl)
            ref = moe(input_ids=ids, attention_mask=mask).logits.float()
            scale = ref.abs().max().item()
            tol = (1e-4 if dtype == torch.float32 else 3e-2) * max(scale, 1.0)
            for impl in chosen:
                set_impl(impl)
                out = moe(input_ids=ids, attention_mask=mask).logits.float()
                checks[f"moe[{impl}]"] = (out - ref).abs().max().item()
            with MLPSwap(moe, masked):
                out = moe(input_ids=ids, attention_mask=mask).logits.float()
            checks["masked"] = (out - ref).abs().max().item()
            set_impl(default_impl)
            # Routing load (layer 0 and last): how the random router spreads the tokens.
            loads = []
            for layer in (moe.model.layers[0], moe.model.layers[-1]):
                cap = {}
                h = layer.mlp.register_forward_pre_hook(lambda m, a: cap.setdefault("x", a[0]))
                moe(input_ids=ids, attention_mask=mask)
                h.remove()
                _, _, idx = layer.mlp.gate(cap["x"].reshape(-1, H))
                loads.append(torch.bincount(idx.reshape(-1), minlength=D).tolist())
            bad = {k: v for k, v in checks.items() if not v <= tol}
            if bad:
                raise SystemExit(f"logits differ from the sparse MoE's ({default_impl}) beyond {tol:.3g}: {bad}")

            # Warmup, then interleaved timed repeats; the order rotates every repeat.
            names = list(variants)
            load_before = os.getloadavg()
            for _ in range(args.warmup):
                for n in names:
                    run_variant(n)
            times = {n: [] for n in names}
            for r in range(args.repeats):
                order = names[r % len(names):] + names[: r % len(names)]
                for n in order:
                    times[n].append(run_variant(n))
            load_after = os.getloadavg()
            set_impl(default_impl)

            breakdown = None
            if not args.no_breakdown:
                breakdown = collection_breakdown(oracle, ids, mask, cfg, max(3, args.repeats // 2), sync,
                                                 args.num_dume_tokens)

    # ---------------------------------------------------------------------- report
    res = {n: summarise(v, N) for n, v in times.items()}
    main_moe = f"moe[{default_impl}]" if f"moe[{default_impl}]" in res else f"moe[{chosen[0]}]"
    flops = forward_flops(cfg, args.batch, args.seq)
    hw, ver = hardware(device), versions()

    def ratio(num, den):
        """Time ratio num/den: median of per-repeat ratios, its range, and min(num)/min(den)."""
        r = paired_ratio(times[num], times[den])
        r["of_minimums"] = min(times[num]) / min(times[den])
        return r

    # Throughput ratio A ÷ B = time(B) / time(A).
    ratios = {
        "moe_over_dense_throughput": ratio("dense", main_moe),
        "moe_over_masked_throughput": ratio("masked", main_moe),
        "collect_over_forward_time": ratio("collect", "oracle"),
        "collect_no_lm_head_over_forward_time": ratio("collect-no-lm_head", "oracle"),
        "dense_over_oracle_time": ratio("dense", "oracle"),
    }
    for impl in chosen:
        ratios[f"moe[{impl}]_over_dense_throughput"] = ratio("dense", f"moe[{impl}]")
    ratios["moe_over_dense_throughput"].update(variant=main_moe, target=TARGET_MOE_VS_DENSE,
                                               passed=ratios["moe_over_dense_throughput"]["median"] >= TARGET_MOE_VS_DENSE)
    ratios["collect_over_forward_time"].update(target=TARGET_COLLECT_OVERHEAD,
                                               passed=ratios["collect_over_forward_time"]["median"] <= TARGET_COLLECT_OVERHEAD)

    def verdict(ok):
        return "PASS" if ok else "MISS"

    def row(label, r, target=""):
        return (f"  {label:<50}{r['median']:>7.3f}  [{r['min']:.2f}, {r['max']:.2f}]{r['of_minimums']:>9.3f}"
                f"   {target}")

    lines = []
    w = lines.append
    w("DUME MoE throughput benchmark")
    w(f"  hardware : {hw['cpu']}" + (f" | GPU {hw['gpu']}" if "gpu" in hw else "")
      + f" | device {hw['device']} | {hw['cores']} usable cores, torch threads {hw['torch_threads']}")
    w(f"  load avg : {load_before[0]:.2f} before, {load_after[0]:.2f} after the timed loop"
      + ("  <- busy machine: other processes compete for the cores, figures are noisy"
         if device.type == "cpu" and max(load_before[0], load_after[0]) > 0.5 * hw["cores"] else ""))
    w(f"  versions : python {ver['python']}, torch {ver['torch']}, transformers {ver['transformers']}"
      + (f", dume {ver['dume_commit']}" if "dume_commit" in ver else ""))
    w(f"  model    : D={D} experts, hidden {H}, intermediate {cfg.intermediate_size}, {L} layers, "
      f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}, dtype {args.dtype}")
    w(f"  experts  : {source}")
    w(f"  tokens   : one batch {args.batch} x {args.seq} = {N} tokens, same ids for every variant; "
      f"{args.warmup} warmup + {args.repeats} interleaved repeats (order rotates); setup {setup_s:.1f}s")
    w(f"  MoE      : MixtralForCausalLM.from_pretrained, k=1, random router (std 0.02); "
      f"default experts_implementation = {default_impl!r}; attention {moe.config._attn_implementation!r}")
    w(f"  routing  : tokens per expert, layer 0 {loads[0]}, layer {L - 1} {loads[1]}")
    w(f"  checks   : max |logits - moe[{default_impl}]| "
      + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()) + f" (tolerance {tol:.2e}): OK")
    for k, v in skipped.items():
        w(f"  skipped  : moe[{k}]: {v}")
    w("")
    w(f"  {'variant':<22}{'median s':>10}{'min s':>9}{'max s':>9}{'spread':>8}{'tokens/s':>11}")
    for n, s_ in res.items():
        w(f"  {n:<22}{s_['median_s']:>10.4f}{s_['min_s']:>9.4f}{s_['max_s']:>9.4f}{s_['spread_pct']:>7.0f}%"
          f"{s_['tokens_per_s']:>11.0f}")
    w("  (spread = (max - min) / median; tokens/s from the median)")
    w("")
    w(f"  {'ratio':<50}{'median':>7}  {'[min, max]':<12}{'of mins':>8}   target / verdict (on the median)")
    r = ratios["moe_over_dense_throughput"]
    w(row(f"1/2 MoE ÷ dense throughput, {main_moe}", r,
          f">= {TARGET_MOE_VS_DENSE}  {verdict(r['median'] >= TARGET_MOE_VS_DENSE)}"
          f" (of mins: {verdict(r['of_minimums'] >= TARGET_MOE_VS_DENSE)})"))
    for impl in chosen:
        if f"moe[{impl}]" != main_moe:
            w(row(f"    MoE ÷ dense throughput, moe[{impl}]", ratios[f"moe[{impl}]_over_dense_throughput"],
                  "alternative implementation"))
    w(row("3   MoE ÷ masked-all-experts throughput", ratios["moe_over_masked_throughput"],
          f"report (FLOP model: {(flops['total'] + (D - 1) * L * flops['per_layer_mlp']) / flops['total']:.2f}; "
          f"MLP-only limit D = {D})"))
    r = ratios["collect_over_forward_time"]
    w(row("4   stats collection ÷ oracle forward time", r,
          f"<= {TARGET_COLLECT_OVERHEAD} {verdict(r['median'] <= TARGET_COLLECT_OVERHEAD)}"
          f" (of mins: {verdict(r['of_minimums'] <= TARGET_COLLECT_OVERHEAD)})"))
    w(row("    what-if: collection without lm_head ÷ forward", ratios["collect_no_lm_head_over_forward_time"],
          "not dume's code path: NoLMHead shim"))
    w(row("    noise floor: dense ÷ oracle time (same arch)", ratios["dense_over_oracle_time"], "ideal 1.000"))
    w(f"  (collect_domain num_dume_tokens={args.num_dume_tokens}; everything under torch.inference_mode; "
      "per-repeat ratios pair runs made back to back)")
    if args.num_dume_tokens is not None and args.num_dume_tokens < args.seq:
        w(f"  (note: with num_dume_tokens={args.num_dume_tokens} < {args.seq} collect_domain forwards only the first "
          f"{args.num_dume_tokens} positions, the oracle all {args.seq}: ratio 4 is not a like-for-like overhead)")
    w("")
    w(f"  FLOPs per forward: total {flops['total'] / 1e9:.2f} G = {L} x (attention linear "
      f"{flops['per_layer_attention_linear'] / 1e9:.3f} + scores {flops['per_layer_attention_scores_full'] / 1e9:.3f}"
      f" + MLP {flops['per_layer_mlp'] / 1e9:.3f}) + lm_head {flops['lm_head'] / 1e9:.3f}")
    w(f"  XᵀX per batch: {L} x {flops['xtx_per_layer'] / 1e9:.3f} G = {flops['xtx_all_layers'] / 1e9:.3f} G "
      f"= {100 * flops['xtx_all_layers'] / flops['total']:.1f}% of the forward -> flop floor of ratio 4: "
      f"{1 + flops['xtx_all_layers'] / flops['total']:.3f}; without the lm_head: "
      f"{(flops['total'] - flops['lm_head'] + flops['xtx_all_layers']) / flops['total']:.3f}")
    if breakdown:
        fwd_t = breakdown["forward (full logits)"]
        w("")
        w(f"  collection cost breakdown (min s of {max(3, args.repeats // 2)} runs each; % of the full-logits forward)")
        for k, v in breakdown.items():
            w(f"    {k:<40}{v:>9.4f}{100 * v / fwd_t:>8.1f}%")
        xtx_t = breakdown["  XᵀX float32 x L"]
        w(f"    XᵀX runs at {flops['xtx_all_layers'] / xtx_t / 1e9:.1f} GFLOP/s, the forward at "
          f"{flops['total'] / fwd_t / 1e9:.1f} GFLOP/s")
        lm_t = fwd_t - breakdown["forward without lm_head (model.model)"]
        w(f"    the lm_head + [B,T,V] logits the collection never reads: {lm_t:.4f}s "
          f"({100 * lm_t / fwd_t:.1f}% of the forward; {100 * flops['lm_head'] / flops['total']:.1f}% of its FLOPs)")
    text = "\n".join(lines)
    print(text)

    if args.json:
        doc = {
            "hardware": hw, "versions": ver, "args": vars(args), "experts_source": source,
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
            "model": {"num_experts": D, "hidden": H, "intermediate": cfg.intermediate_size, "layers": L,
                      "heads": cfg.num_attention_heads, "vocab": cfg.vocab_size, "dtype": args.dtype},
            "tokens": N, "default_experts_implementation": default_impl, "skipped": skipped,
            "checks_max_abs_diff": checks, "tolerance": tol, "routing_load": loads,
            "variants": res, "ratios": ratios, "flops": flops, "collection_breakdown_s": breakdown, "table": text,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
