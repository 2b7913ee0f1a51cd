#!/usr/bin/env python
"""`dume build` at a hub model's real size: wall time per phase, statistics tokens/s against a plain forward of
one expert in the same dtype, and peak RSS against one output shard + the statistics.

Experts are random weights of a hub configuration (no hub here; speed and memory do not depend on the values),
stored in bfloat16 the way the hub ships them: one seed model, MLPs perturbed per expert. Each expert gets
`--docs` documents of the embedded corpus. `dume build` runs in a child process (peak RSS from
`getrusage(RUSAGE_CHILDREN)`) once per `--dtype`, with its held-out routing check (`--held-out`); its per-phase lines are
parsed from its log. The plain forward is one expert loaded with `from_pretrained` in that dtype, run over the same
documents in the same batches (`document_batches`), so the ratio says what the statistics' capture costs.

    python bench/build_real_size.py --preset tiny                        # smoke (~1 min)
    python bench/build_real_size.py --preset qwen3-0.6b --dtype float32 auto
    python bench/build_real_size.py --preset llama-3.2-1b --experts 4 --docs 12 --dtype auto
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.build_memory import run_with_peak_rss  # noqa: E402

# The hub configs' shapes (Qwen/Qwen3-0.6B, meta-llama/Llama-3.2-1B config.json).
PRESETS = {
    "tiny": dict(model_type="qwen3", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024,
                 max_position_embeddings=1024, tie_word_embeddings=True),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
DOMAINS = ("code", "math", "physics", "history", "philosophy")


def make_experts(root: Path, preset: dict, n: int, docs: int) -> tuple[list[Path], list[Path]]:
    """n bf16 experts with a tokenizer of the preset's vocabulary size, and a JSONL of documents for each."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers import AutoTokenizer

    from bench.hub_replica import large_vocab_tokenizer
    from dume.corpora.documents import load_documents

    texts = {d: load_documents(d, "train", "offline")[:docs] for d in DOMAINS[:n]}
    tok_dir = large_vocab_tokenizer(root / "tokenizer", [t for v in texts.values() for t in v],
                                    vocab_size=preset["vocab_size"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = AutoConfig.for_model(**preset, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    mlp = {k: v.detach().clone() for k, v in model.state_dict().items() if ".mlp." in k}
    dirs, data = [], []
    for e, d in enumerate(texts):
        g = torch.Generator().manual_seed(e + 1)
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in mlp:
                    p.copy_(mlp[k] + 0.01 * torch.randn(p.shape, generator=g).to(p.dtype))
        out = root / "experts" / d
        model.save_pretrained(out)
        tok.save_pretrained(out)
        dirs.append(out)
        data.append(root / "data" / f"{d}.jsonl")
        data[-1].parent.mkdir(parents=True, exist_ok=True)
        data[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[d]))
    return dirs, data


def build(root: Path, dirs, data, dtype: str, seq_len: int, batch_size: int, held_out: float,
          evaluate: bool = False) -> dict:
    import yaml

    out = root / f"moe_{dtype}"
    cfg = {"experts": [{"name": d.name, "model": str(d), "data": str(x)} for d, x in zip(dirs, data)],
           "gate": "dume", "dtype": dtype, "out": str(out), "seq_len": seq_len, "batch_size": batch_size,
           "held_out": held_out, "evaluate": evaluate}
    path = root / f"build_{dtype}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    peak_mb, log = run_with_peak_rss([sys.executable, "-m", "dume", "build", str(path), "--overwrite"])
    wall = time.perf_counter() - t0
    phases = {m[1]: float(m[2]) for m in re.finditer(r"^(.+?) in ([0-9.]+) s$", log, re.M)}
    stats = [(int(m[1]), float(m[2])) for m in re.finditer(r"statistics \S+: (\d+) tokens per layer in ([0-9.]+) s",
                                                           log)]
    shard = max(f.stat().st_size for f in out.glob("*.safetensors"))
    stats_bytes = sum(f.stat().st_size for f in (out / "dume_stats").rglob("*") if f.is_file())
    summary = json.loads((out / "dume_build.json").read_text())
    return {"dtype": dtype, "compute_dtype": summary["settings"]["dtype"], "wall_s": wall,
            "peak_rss_gb": peak_mb / 2**10, "phases_s": phases,
            "stats_tokens": sum(n for n, _ in stats), "stats_s": sum(s for _, s in stats),
            "largest_shard_gb": shard / 2**30, "stats_gb": stats_bytes / 2**30}


def plain_forward_tokens_per_s(expert: Path, texts: list[str], dtype_name: str, seq_len: int, batch_size: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dume.text.batches import document_batches

    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    model = AutoModelForCausalLM.from_pretrained(expert, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(expert)
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for ids, mask in document_batches(texts, tok, seq_len, batch_size):
            model(input_ids=ids, attention_mask=mask)
            tokens += int(mask.sum())
    return tokens / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--docs", type=int, default=24, help="documents per expert")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--held-out", type=float, default=0.05,
                   help="dume build's held_out (a domain holds out int(fraction x documents) for the routing check)")
    p.add_argument("--dtype", nargs="+", default=["float32", "auto"], choices=["auto", "float32", "bfloat16"])
    p.add_argument("--evaluate", action="store_true", help="build with `evaluate: true` (the evaluation report: "
                   "D + 2 models over the held-out documents), its time in the 'evaluation report' phase")
    p.add_argument("--work", default=None, help="folder for the experts and MoEs (default: a temporary one)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not 2 <= args.experts <= len(DOMAINS):
        raise SystemExit(f"--experts must be 2..{len(DOMAINS)}")
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        dirs, data = make_experts(root, PRESETS[args.preset], args.experts, args.docs)
        print(f"{args.experts} random {args.preset} experts (bf16) written in {time.perf_counter() - t0:.0f} s",
              flush=True)
        texts = [json.loads(x)["text"] for x in data[0].read_text().splitlines()]
        rows = []
        for dt in args.dtype:
            row = build(root, dirs, data, dt, args.seq_len, args.batch_size, args.held_out, args.evaluate)
            row["plain_tokens_per_s"] = plain_forward_tokens_per_s(dirs[0], texts, row["compute_dtype"],
                                                                   args.seq_len, args.batch_size)
            row["stats_tokens_per_s"] = row["stats_tokens"] / max(row["stats_s"], 1e-9)
            rows.append(row)
            print(f"dtype {dt}: {row['wall_s']:.0f} s, phases {row['phases_s']}", flush=True)
    print(f"\n{args.preset}, {args.experts} experts x {args.docs} documents, seq {args.seq_len}, batch "
          f"{args.batch_size}, held_out {args.held_out}{', evaluate: true' if args.evaluate else ''}; peak RSS of "
          "the build process")
    print("| dtype (computes in) | wall s | statistics tok/s | plain forward tok/s | ratio | peak RSS GB "
          "| largest shard + statistics GB |" + (" evaluation s |" if args.evaluate else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.evaluate else ""))
    for r in rows:
        print(f"| {r['dtype']} ({r['compute_dtype'].removeprefix('torch.')}) | {r['wall_s']:.0f} | "
              f"{r['stats_tokens_per_s']:.0f} | {r['plain_tokens_per_s']:.0f} | "
              f"{r['stats_tokens_per_s'] / r['plain_tokens_per_s']:.2f} | {r['peak_rss_gb']:.2f} | "
              f"{r['largest_shard_gb']:.2f} + {r['stats_gb']:.2f} |"
              + (f" {r['phases_s'].get('evaluation report', float('nan')):.0f} |" if args.evaluate else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
