#!/usr/bin/env python
"""Peak memory of `dume build` against the size of the experts.

For each size, three Llama experts (one seed model, MLPs perturbed per expert) are saved
with `save_pretrained`, each with 200 short documents of text, and `dume build` runs in a
child process whose peak RSS is read from `getrusage(RUSAGE_CHILDREN)`. Printed beside it:
one expert's file size, the MoE's largest safetensors shard, the statistics on disk, and
the RSS of a process that only imports torch + transformers (the floor).

Each size is built twice: with the default held-out routing check (which holds the
finished MoE once, filled one tensor at a time) and with `held_out: 0` (statistics, solve
and the streamed merge only). The merge writes one tensor at a time and the statistics
hold one dense oracle, so memory should follow one output shard plus the statistics, not
the number of experts times their size.

    python bench/build_memory.py                       # two sizes, ~9× apart in parameters
    python bench/build_memory.py --hidden 256 1024 --layers 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHILD_RSS = ("import resource, subprocess, sys\n"
             "rc = subprocess.run(sys.argv[1:]).returncode\n"
             "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)\n")


def run_with_peak_rss(cmd: list[str]) -> tuple[float, str]:
    """Run `cmd` in a child; (its peak RSS in MB, its stdout + stderr). A failing command ends the benchmark."""
    out = subprocess.run([sys.executable, "-c", CHILD_RSS, *cmd], capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("PEAK_RSS_KB")]
    if not line or line[0].split()[2] != "0":
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return int(line[0].split()[1]) / 1024, out.stdout + out.stderr


def peak_rss_mb(cmd: list[str]) -> float:
    return run_with_peak_rss(cmd)[0]


def make_experts(root: Path, hidden: int, layers: int, vocab: int, tokenizer) -> tuple[list[Path], int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=512)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in base.parameters())
    dirs = []
    for e in range(3):
        g = torch.Generator().manual_seed(e + 1)
        with torch.no_grad():
            for n, p in base.named_parameters():
                if ".mlp." in n:
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        d = root / f"expert{e}"
        base.save_pretrained(d)
        tokenizer.save_pretrained(d)
        (root / f"data{e}.txt").write_text("\n\n".join(
            f"Document {i} of domain {e}: " + " ".join(f"word{(i * 7 + j * (e + 1)) % 97}" for j in range(60))
            for i in range(200)))
        dirs.append(d)
    return dirs, params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 768])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import yaml

    from dume.text.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"word{i} Document domain of" for i in range(97)] * 20, vocab_size=300)
    floor = peak_rss_mb([sys.executable, "-c", "import torch, transformers"])
    rows = []
    for hidden in args.hidden:
        with tempfile.TemporaryDirectory(prefix="dume-build-mem-") as tmp:
            root = Path(tmp)
            dirs, params = make_experts(root, hidden, args.layers, 300, tok)
            row = {"hidden": hidden, "expert_params": params, "floor_mb": floor,
                   "expert_mb": sum(f.stat().st_size for f in dirs[0].glob("*.safetensors")) / 2**20}
            for held_out in (0.05, 0):
                cfg = {"experts": [{"name": f"d{e}", "model": str(d), "data": str(root / f"data{e}.txt")}
                                   for e, d in enumerate(dirs)],
                       "gate": "dume", "dtype": "float32", "out": str(root / "moe"), "seq_len": 128,
                       "batch_size": 8, "held_out": held_out}
                (root / "build.yaml").write_text(yaml.safe_dump(cfg))
                row[f"peak_rss_mb_held_out_{held_out}"] = peak_rss_mb(
                    [sys.executable, "-m", "dume", "build", str(root / "build.yaml"), "--overwrite"])
            moe = root / "moe"
            row["moe_mb"] = sum(f.stat().st_size for f in moe.glob("*.safetensors")) / 2**20
            row["moe_shard_mb"] = max(f.stat().st_size for f in moe.glob("*.safetensors")) / 2**20
            row["stats_mb"] = sum(f.stat().st_size for f in (moe / "dume_stats").rglob("*") if f.is_file()) / 2**20
            rows.append(row)
    print(f"import floor (torch + transformers): {floor:.0f} MB; figures below are peak RSS minus the floor")
    print("| hidden | params/expert | expert MB | MoE MB (largest shard) | stats MB | build, held-out check | "
          "build, held_out: 0 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['hidden']} | {r['expert_params'] / 1e6:.1f} M | {r['expert_mb']:.0f} | {r['moe_mb']:.0f} "
              f"({r['moe_shard_mb']:.0f}) | {r['stats_mb']:.0f} | {r['peak_rss_mb_held_out_0.05'] - floor:.0f} | "
              f"{r['peak_rss_mb_held_out_0'] - floor:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
