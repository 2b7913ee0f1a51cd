#!/usr/bin/env python
"""The GPU acceptance run: the paper's path at reduced steps on one CUDA GPU, one table.

Every step is one of the repository's own commands, run as a user would run it, in a
child process that records its wall time and peak memory (GPU: torch's
`max_memory_allocated`; host: peak RSS). Nothing is reimplemented here.

  train speed   bench/train_throughput.py --preset paper-115m: plain vs optimised tokens/s, MFU
  pretrain      clm_pretrain.py --source hub --preset paper-115m --seq-len 1024 on a local
                replica of the hub layouts (OpenWebText parquet, M2D2 folders) with a
                128 256-entry tokenizer (Llama-3's vocabulary size: the lm_head's real cost)
  experts       clm_train_experts.py on the five M2D2 domains
  DUME, BTX     clm_moerging_strategies_eval.py --method DUME, then a short BTX
  MoE speed     bench/moe_throughput.py --preset paper-115m --dtype bfloat16: MoE ÷ dense,
                statistics collection ÷ forward
  reasoning     four random Llama-3.2-3B-config experts, reasoning_generate_dume_params.py
                (DUME on a few task prompts), then one paper-protocol cell
                (reasoning_eval.py --strategy DUME --task math) on a few documents

    python bench/gpu_acceptance.py                 # one CUDA GPU, about 10 minutes; --json out.json
    python bench/gpu_acceptance.py --cpu-smoke     # the same sequence on tiny presets (tests/test_gpu_acceptance.py)

Without CUDA (and without --cpu-smoke) it says so and exits 2. The work goes to --work
(default: a temporary folder, removed at the end unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hub_replica import large_vocab_tokenizer, write_hub_replica, write_task_data  # noqa: E402

# A step's command is run through this: its wall time, peak GPU memory and peak RSS go to a JSON file.
_MEASURED = r"""
import json, os, resource, runpy, sys, time
out, script, *argv = sys.argv[1:]
sys.argv = [script, *argv]
sys.path[0] = os.path.dirname(script)  # as `python script` would have it
start, code = time.time(), 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
import torch
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
json.dump({"seconds": time.time() - start, "rc": code, "peak_gpu_bytes": gpu,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, open(out, "w"))
sys.exit(code)
"""

# Llama-3.2-3B's architecture (the reasoning experts'), random weights.
LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
LLAMA_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=512)

SIZES = {  # per mode: the size flags of each step
    "gpu": {
        "speed": ["--preset", "paper-115m", "--device", "cuda", "--steps", "4", "--repeats", "3"],
        "common": ["--seq-len", "1024", "--eval-batch-size", "16", "--max-eval-blocks", "64"],
        "pretrain": ["--preset", "paper-115m", "--lr", "6e-4", "--steps", "60", "--warmup", "6", "--batch-size", "16",
                     "--grad-accum", "1", "--eval-every", "30", "--mixed-precision", "bf16"],
        "experts": ["--lr", "6e-5", "--steps", "20", "--warmup", "2", "--batch-size", "16", "--grad-accum", "1",
                    "--patience", "0", "--eval-every", "10", "--mixed-precision", "bf16"],
        "btx": ["--num-steps", "20", "--batch-size", "16", "--grad-accum", "1", "--mixed-precision", "bf16"],
        "moe": ["--preset", "paper-115m", "--device", "cuda", "--dtype", "bfloat16", "--repeats", "3"],
        "vocab": 128256, "expert_config": LLAMA_3B, "reasoning": ["--max-num-samples", "16", "--dtype", "bfloat16"],
        "cell": ["--limit", "8", "--batch-size", "auto", "--dtype", "bfloat16"],
    },
    "cpu": {
        "speed": ["--preset", "micro", "--device", "cpu", "--steps", "1", "--repeats", "1"],
        "common": ["--seq-len", "32", "--eval-batch-size", "8", "--max-eval-blocks", "4"],
        "pretrain": ["--preset", "test-micro", "--steps", "2", "--warmup", "1", "--batch-size", "4",
                     "--grad-accum", "1", "--eval-every", "1"],
        "experts": ["--steps", "2", "--warmup", "1", "--batch-size", "4", "--grad-accum", "1", "--eval-every", "1",
                    "--patience", "0"],
        "btx": ["--num-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--stats-batch-size", "8"],
        "moe": ["--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--no-breakdown",
                "--batch", "2", "--seq", "32"],
        "vocab": None, "expert_config": LLAMA_TINY, "reasoning": ["--max-num-samples", "4", "--device", "cpu", "--dtype", "float32"],
        "cell": ["--limit", "2", "--max-gen-toks", "4", "--device", "cpu", "--dtype", "float32"],
    },
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny presets on the CPU: checks the sequence runs")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table's figures as JSON")
    return p.parse_args(argv)


def make_experts(out: Path, config: dict, tokenizer_dir: Path, device: str, names) -> dict[str, Path]:
    """Experts of one random seed model whose MLPs differ (what DUME tells apart), bf16 on a GPU."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = {**config, "vocab_size": len(tok)}
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()
    mlp = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." in n}
    dirs = {}
    for e, name in enumerate(names):
        g = torch.Generator(device=device).manual_seed(e + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in mlp:
                    p.copy_(mlp[n] + 0.02 * torch.randn(p.shape, generator=g, device=device, dtype=dtype))
        dirs[name] = out / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return dirs


def run_step(name: str, script: str, args: list[str], work: Path, env: dict, log) -> dict:
    """One command, measured; its output goes to work/logs/<name>.log."""
    measured = work / "logs" / f"{name}.json"
    measured.parent.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] {script} {' '.join(args)}")
    with open(work / "logs" / f"{name}.log", "w") as out:
        code = subprocess.run([sys.executable, "-c", _MEASURED, str(measured), str(ROOT / script), *args], cwd=ROOT,
                              env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    record = json.loads(measured.read_text()) if measured.is_file() else {"rc": code}
    if code != 0:
        tail = (work / "logs" / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"error: step {name} failed (exit {code}); the end of its log:\n{tail}")
    return record


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA GPU here: the acceptance run needs one (python bench/gpu_acceptance.py --cpu-smoke checks "
              "the same sequence on tiny presets on the CPU)", file=sys.stderr)
        return 2
    mode = "cpu" if args.cpu_smoke else "gpu"
    size = SIZES[mode]
    work = Path(args.work or tempfile.mkdtemp(prefix="dume_acceptance_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "HF_DATASETS_CACHE": str(work / "hf_datasets"), "DUME_TOKEN_CACHE": str(work / "tokens")}
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start = time.time()
    rows = []

    def row(step, record, figures):
        rows.append({"step": step, "seconds": record.get("seconds"), "peak_gpu_bytes": record.get("peak_gpu_bytes"),
                     "peak_rss_bytes": record.get("peak_rss_bytes"), "figures": figures})

    try:
        data = work / "data" / "hub"
        texts = write_hub_replica(data)
        tok = large_vocab_tokenizer(work / "tokenizer", texts, vocab_size=size["vocab"])  # the smoke: ~400
        run_dir = work / "clm"
        clm = ["--source", "hub", "--data-dir", str(data), "--tokenizer", str(tok), "--run-dir", str(run_dir),
               *size["common"]]

        speed_json = work / "train_speed.json"
        r = run_step("train speed", "bench/train_throughput.py", [*size["speed"], "--json", str(speed_json)], work,
                     env, log)
        s = _read(speed_json)
        plain, opt = (s["variants"][v]["tokens_per_s"] for v in ("plain", "optimised"))
        mfu = s["variants"]["optimised"].get("mfu_vs_bf16_peak")
        row("train speed (plain / optimised)", r, f"{plain:,.0f} / {opt:,.0f} tok/s, "
            f"×{s['optimised_over_plain_throughput']['median']:.2f}" + (f", MFU {100 * mfu:.1f}%" if mfu else ""))

        r = run_step("pretrain", "clm_pretrain.py", [*clm, *size["pretrain"]], work, env, log)
        h = _read(run_dir / "results" / "pretrain.json")["history"]
        row(f"pretrain (vocab {h['config'].get('vocab_size') or size['vocab'] or 'small'})", r, f"{h['tokens_per_second']:,.0f} tok/s, {h['steps_done']} steps, "
            f"val {h['val'][-1]['loss']:.3f}")

        r = run_step("experts", "clm_train_experts.py", [*clm, *size["experts"]], work, env, log)
        row("5 experts", r, "")
        r = run_step("DUME", "clm_moerging_strategies_eval.py", [*clm, "--method", "DUME"], work, env, log)
        res = _read(run_dir / "results" / "DUME.json")["results"]
        row("DUME (statistics, gates, eval)", r, "ppl " + " ".join(f"{d}={v['perplexity']:.0f}" for d, v in res.items()))
        r = run_step("BTX", "clm_moerging_strategies_eval.py", [*clm, "--method", "BTX", *size["btx"]], work, env,
                     log)
        res = _read(run_dir / "results" / "BTX.json")["results"]
        row("BTX (short)", r, "ppl " + " ".join(f"{d}={v['perplexity']:.0f}" for d, v in res.items()))

        moe_json = work / "moe_speed.json"
        r = run_step("MoE speed", "bench/moe_throughput.py", [*size["moe"], "--json", str(moe_json)], work, env, log)
        ratios = _read(moe_json)["ratios"]
        row("MoE ÷ dense, collect ÷ forward", r, f"{ratios['moe_over_dense_throughput']['median']:.2f}, "
            f"{ratios['collect_over_forward_time']['median']:.2f}")

        t = time.time()
        device = "cpu" if args.cpu_smoke else "cuda"
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        domains = ("math", "multilingual", "coding", "instruction")
        experts = make_experts(work / "reasoning_experts", size["expert_config"], tok, device, domains)
        row("4 random Llama-3.2-3B-config experts" if not args.cpu_smoke else "4 tiny Llama experts",
            {"seconds": time.time() - t,
             "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}, "")
        if device == "cuda":
            torch.cuda.empty_cache()
        task_data = write_task_data(work / "tasks")
        reasoning = ["--experts", ",".join(f"{d}={p}" for d, p in experts.items()), "--data-dir", str(task_data),
                     "--run-dir", str(work / "reasoning")]
        r = run_step("DUME parameters", "reasoning_generate_dume_params.py", [*reasoning, *size["reasoning"]], work,
                     env, log)
        row("reasoning: DUME parameters", r, "")
        r = run_step("paper cell", "reasoning_eval.py", [*reasoning, "--strategy", "DUME", "--task", "math",
                                                        *size["cell"]], work, env, log)
        [cell] = list((work / "reasoning" / "results" / "paper").glob("DUME__math__seed0.json"))
        c = _read(cell)
        row("reasoning: DUME on gsm8k (paper protocol)", r, f"{c['metric']} {c['score']:.3f} on {c['limit']} docs")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)

    gib = lambda b: f"{b / 2**30:.1f}" if b else "-"  # noqa: E731
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke: tiny presets)"
    lines = [f"DUME GPU acceptance run on {device}: {time.time() - start:.0f} s in all", "",
             "| step | seconds | peak GPU GiB | peak host GiB | figures |", "|---|---:|---:|---:|---|"]
    lines += [f"| {x['step']} | {x['seconds']:.1f} | {gib(x['peak_gpu_bytes'])} | {gib(x['peak_rss_bytes'])} | "
              f"{x['figures']} |" for x in rows]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows, "table": "\n".join(lines)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
