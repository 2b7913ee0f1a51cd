#!/usr/bin/env python
"""Per-task throughput of Table 3's evaluation under the paper protocol, and the device
hours of the whole table that follow from it.

A randomly initialised MoE of the given configuration (four experts, k = 1, the shape of
the DUME / random-routing / BTX checkpoints; weights do not change the speed) and its
dense counterpart (the experts, model averaging, the oracle) are timed on what each task
asks of them:

  generate  the paper protocol's sampling: temperature 0.7, top-k 50, 256 new tokens
            (forced to the full length: a base model rarely emits EOS early), prompts of
            the task's typical length, `--batch-size` at a time, timed twice: `model.generate`
            directly, and through the path `reasoning_eval.py` takes -- lm-eval's
            `HFLM.generate_until` at the evaluation's `max_length` (`max_length_for`) and
            `--lm-eval-batch-size` (an int, or `auto`: lm-eval's own probe, the batch it
            finds is printed). Table 3's hours use the lm-eval path, which is what runs.
  score     m_arc's log-likelihood requests: one forward of batch × request length

The hours multiply the measured seconds per document by each task's document count
(`WORKLOAD`: gsm8k test 1319, HumanEval 164, IFEval 541, m_arc ≈ 1170 questions × 4
choices in each of 30 languages) and by Table 3's cells: 11 rows (10 strategies + DUME
OOD) × 4 tasks × 3 seeds, MoE rows at the MoE's speed, dense rows at the dense speed.
Statistics collection and router training are not included.

    python bench/reasoning_throughput.py --preset tiny                    # CPU smoke (~1 min)
    python bench/reasoning_throughput.py --preset llama-3.2-3b --device cuda --dtype bfloat16 --batch-size 32 \
        --lm-eval-batch-size auto
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

PRESETS = {
    "tiny": dict(hidden=128, intermediate=512, layers=4, heads=4, kv_heads=4, vocab=4096, max_pos=2048),
    # meta-llama/Llama-3.2-3B's config.json
    "llama-3.2-3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256,
                         max_pos=131072),
}
# Documents per task and their typical prompt length in Llama-3 tokens (m_arc: one
# request = question + one choice; ~4 choices per question).
WORKLOAD = {
    "math": {"kind": "generate", "docs": 1319, "prompt_tokens": 70},
    "coding": {"kind": "generate", "docs": 164, "prompt_tokens": 130},
    "instruction": {"kind": "generate", "docs": 541, "prompt_tokens": 60},
    "multilingual": {"kind": "score", "docs": 30 * 1170 * 4, "prompt_tokens": 64},
}
MOE_ROWS, DENSE_ROWS, SEEDS = 5, 6, 3  # random routing, DUME, DUME OOD, BTX, DUME+ | 4 experts, averaging, oracle
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(preset: dict, moe: bool, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=preset["vocab"], hidden_size=preset["hidden"], intermediate_size=preset["intermediate"],
                  num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
                  num_key_value_heads=preset["kv_heads"], max_position_embeddings=preset["max_pos"],
                  rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    if moe:
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=1, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.to(device=device, dtype=dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_task(model, task: dict, batch: int, gen_tokens: int, repeats: int, device) -> float:
    """Seconds per document (median over repeats)."""
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, task["prompt_tokens"]), device=device)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if task["kind"] == "generate":
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_k=50,
                               top_p=1.0, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, pad_token_id=0)
            else:
                model(ids).logits.log_softmax(-1)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) / batch


def bench_tokenizer(vocab: int):
    """A byte-level BPE of at most `vocab` entries trained on a few embedded documents: HFLM
    needs a tokenizer, the hub's cannot be fetched here, and the speed does not depend on it."""
    from dume.corpora.documents import load_documents
    from dume.text.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(load_documents("code", "train", "offline")[:200], vocab_size=min(vocab, 2048))


def time_lm_eval_generation(model, tokenizer, task: dict, batch, gen_tokens: int, device) -> dict:
    """Seconds per document of `HFLM.generate_until` (the path `reasoning_eval.py` takes) on
    2 × batch prompts of the task's length, with the paper protocol's sampling. `batch` is an
    int or "auto"; for auto, lm-eval's probe (`_detect_batch_size`, which `generate_until`
    runs first) is timed apart and its batch used. `min_new_tokens` forces the full length,
    as in `time_task`. Returns the seconds per document, the batch used and the largest batch
    `model.generate` was called with (the check that generation really batches)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from dume.reasoning.evaluate import max_length_for

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch,
              max_length=max_length_for(model.config, gen_tokens))
    out = {"max_length": lm.max_length}
    if batch == "auto":
        t0 = time.perf_counter()
        batch = lm._detect_batch_size()
        out["probe_s"] = time.perf_counter() - t0
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch,
                  max_length=max_length_for(model.config, gen_tokens))
    seen, generate = [], model.generate

    def recording_generate(*args, **kwargs):
        seen.append(int(kwargs["input_ids"].shape[0]))
        return generate(*args, **kwargs)

    g = torch.Generator().manual_seed(0)
    prompts = [tokenizer.decode(torch.randint(10, len(tokenizer) - 10, (task["prompt_tokens"],), generator=g))
               for _ in range(2 * int(batch))]
    kwargs = {"until": [], "do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 1.0,
              "max_gen_toks": gen_tokens, "min_new_tokens": gen_tokens}
    requests = [Instance(request_type="generate_until", doc={}, arguments=(p, dict(kwargs)), idx=i)
                for i, p in enumerate(prompts)]
    model.generate = recording_generate
    try:
        sync(device)
        t0 = time.perf_counter()
        lm.generate_until(requests, disable_tqdm=True)
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        del model.generate  # the instance attribute; the class's method shows again
    return {**out, "seconds_per_doc": seconds / len(prompts), "batch": int(batch), "largest_generate_batch": max(seen)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, else float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lm-eval-batch-size", default=None,
                   help="HFLM's batch for the lm-eval generation timing: an int or auto (default: --batch-size)")
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    preset = PRESETS[args.preset]
    out = {"preset": args.preset, "device": str(device), "dtype": str(dtype), "batch_size": args.batch_size,
           "gen_tokens": args.gen_tokens, "seconds_per_doc": {}, "direct_generate_seconds_per_doc": {},
           "lm_eval": {}, "peak_gpu_gib": {}}
    lm_batch = args.lm_eval_batch_size or args.batch_size
    lm_batch = lm_batch if lm_batch == "auto" else int(lm_batch)
    tokenizer = bench_tokenizer(preset["vocab"])
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    for kind in ("moe", "dense"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model = build(preset, kind == "moe", dtype, device)
        direct = {t: time_task(model, w, args.batch_size, args.gen_tokens, args.repeats, device)
                  for t, w in WORKLOAD.items()}
        lm = {t: time_lm_eval_generation(model, tokenizer, w, lm_batch, args.gen_tokens, device)
              for t, w in WORKLOAD.items() if w["kind"] == "generate"}
        out["direct_generate_seconds_per_doc"][kind] = {t: direct[t] for t in lm}
        out["lm_eval"][kind] = lm
        out["seconds_per_doc"][kind] = {t: lm[t]["seconds_per_doc"] if t in lm else direct[t] for t in WORKLOAD}
        if device.type == "cuda":
            out["peak_gpu_gib"][kind] = torch.cuda.max_memory_allocated(device) / 2**30
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    hours = {t: SEEDS * w["docs"] * (MOE_ROWS * out["seconds_per_doc"]["moe"][t]
                                     + DENSE_ROWS * out["seconds_per_doc"]["dense"][t]) / 3600
             for t, w in WORKLOAD.items()}
    out["table3_hours"] = {**hours, "total": sum(hours.values())}
    lm_moe = next(iter(out["lm_eval"]["moe"].values()))
    print(f"{args.preset} on {out.get('gpu', device)} ({dtype}), batch {args.batch_size}, "
          f"{args.gen_tokens} sampled tokens; lm-eval: HFLM max_length {lm_moe['max_length']}, batch "
          f"{lm_batch}{' -> ' + str(lm_moe['batch']) if lm_batch == 'auto' else ''}, largest generate batch "
          f"{lm_moe['largest_generate_batch']}")
    print("| task | docs | s/doc MoE | s/doc dense | MoE via model.generate | Table 3 hours (11 rows x 3 seeds) |")
    print("|---|---:|---:|---:|---:|---:|")
    for t, w in WORKLOAD.items():
        direct = out["direct_generate_seconds_per_doc"]["moe"].get(t)
        print(f"| {t} | {w['docs']} | {out['seconds_per_doc']['moe'][t]:.4f} | "
              f"{out['seconds_per_doc']['dense'][t]:.4f} | {'' if direct is None else f'{direct:.4f}'} | "
              f"{hours[t]:.2f} |")
    print(f"| total | | | | | {out['table3_hours']['total']:.2f} |")
    print("(generation rows: lm-eval's generate_until, what reasoning_eval.py runs; multilingual: one forward)")
    if out["peak_gpu_gib"]:
        print("peak GPU memory (GiB): " + ", ".join(f"{k} {v:.1f}" for k, v in out["peak_gpu_gib"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
