#!/usr/bin/env python
"""Do the MoEs `dume build` writes serve in vLLM and llama.cpp, computing what transformers computes?

Builds a small MoE per architecture with `dume build` itself (three random experts of one seed model, MLPs
perturbed apart, each with its own text; Llama experts -> MixtralForCausalLM with llama3 rope scaling, GQA and tied
embeddings, Qwen3 experts -> Qwen3MoeForCausalLM with q/k norms and head_dim 64; head size >= 32 because vLLM's
CPU attention needs it), or takes `--moe DIR`. Transformers (this python, float32) generates greedily from five
prompts; each engine found runs in a subprocess with its own python on the same token ids (fed as ids: the
engines' tokenizers are checked apart, on the prompts' text) and is compared in float32:

  vLLM       `LLM(DIR, dtype="float32")` (bench/serve_vllm.py): greedy tokens equal, max |Δ log-probability| of
             the generated tokens;
  llama.cpp  DIR converted by llama.cpp's own convert_hf_to_gguf.py (`--outtype f32`), loaded by llama-cpp-python
             with an F32 KV cache (bench/serve_llama_cpp.py): greedy tokens equal, max |Δ logit| over every
             position and the whole vocabulary;
  transformers 4.x  the same checkpoint loaded by another transformers install (bench/serve_transformers.py), as
             older lm-eval / vLLM installs and llama.cpp's converter read it: greedy tokens equal, max |Δ logit|
             (a config.json key that version does not read falls back to its default without an error).

Compared up to the first differing token of a prompt (past it the two continue different texts). Prints one
table and exits 1 if an engine that ran misses the bar (all prompts' tokens equal and the difference within
--max-logprob-diff / --max-logit-diff), 0 otherwise; an engine without a python is reported "not checked".

    python bench/serve_check.py                                    # transformers side only
    python bench/serve_check.py --vllm-python VENV/bin/python \\
        --llama-cpp-python VENV2/bin/python --gguf-converter LLAMA_CPP/convert_hf_to_gguf.py \\
        --transformers4-python VENV2/bin/python
    python bench/serve_check.py --moe runs/my_moe --vllm-python VENV/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH = Path(__file__).resolve().parent
PROMPTS = ("def fibonacci(n):\n    return",
           "The theorem follows from the lemma, since every prime",
           "In 1066 the king's army marched north to meet the",
           "Energy and force: a short note on atoms (draft 2) --",
           "Ünïcödé, tabs\tand   spaces: the empire of the")
MAX_NEW_TOKENS = 16
MAX_MODEL_LEN = 256
# The bars, from the first check by hand (vLLM 0.32 CPU: |Δ logprob| <= 1.8e-6; llama.cpp F32 KV cache:
# |Δ logit| <= 9e-6), rounded up; float32 sums in another order differ by ~1e-7 relative per op.
MAX_LOGPROB_DIFF = 5e-6
MAX_LOGIT_DIFF = 2e-5
DOMAIN_WORDS = {
    "code": "def return import class self lambda yield print range len dict list tuple None True while",
    "math": "theorem lemma proof integral derivative matrix vector prime number group ring field sum",
    "history": "king queen empire war battle treaty century dynasty revolution army kingdom castle",
}
COMMON = "the a of to in is and with as on at by"


# ------------------------------------------------------------------------------ the small MoE


def _texts(words: list[str], n: int, seed: int) -> list[str]:
    import random

    rng, common = random.Random(seed), COMMON.split()
    return [" ".join(rng.choice(words if rng.random() < 0.7 else common) for _ in range(rng.randint(20, 60))) + "."
            for _ in range(n)]


def _dense(arch: str, vocab: int):
    """A seed model of a hub-like shape the engines support (head size >= 32)."""
    common = {"vocab_size": vocab, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": MAX_MODEL_LEN,
              "tie_word_embeddings": True, "initializer_range": 0.1}
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=64, rope_theta=1e6))


def build_small_moe(arch: str, root: Path, log=print) -> Path:
    """`dume build` on three random experts of `arch` with their own text; returns the MoE's folder."""
    import torch

    from dume.text.tokenizer import train_bpe_tokenizer
    from dume.upcycle.build import build
    from dume.upcycle.spec import parse_spec

    texts = {d: _texts(w.split(), 48, i) for i, (d, w) in enumerate(DOMAIN_WORDS.items())}
    tok = train_bpe_tokenizer([t for ts in texts.values() for t in ts] + list(PROMPTS), vocab_size=512)
    torch.manual_seed(0)
    base = _dense(arch, len(tok))
    experts = []
    for e, (domain, docs) in enumerate(texts.items()):
        model = _dense(arch, len(tok))
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(e + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp." in name:
                    p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
        d = root / f"{arch}_expert_{domain}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        (root / f"{domain}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        experts.append({"name": domain, "model": str(d), "data": str(root / f"{domain}.txt")})
    spec = parse_spec({"experts": experts, "out": str(root / f"{arch}_moe"), "dtype": "float32", "seq_len": 64,
                       "batch_size": 8, "held_out": 0})
    build(spec, overwrite=True, log=lambda *a: None)
    log(f"built {root / f'{arch}_moe'} with dume build ({arch} experts)")
    return root / f"{arch}_moe"


# ------------------------------------------------------------------------------ transformers, the reference


def reference(moe: Path) -> dict:
    """Transformers in float32: prompt ids, greedy tokens, each position's logits, the generated log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(moe)
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    prompts, tokens, logits, logprobs, margins = [], [], [], [], []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text)["input_ids"]
            seq = list(ids)
            for _ in range(MAX_NEW_TOKENS):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            full = model(torch.tensor([seq[:-1]])).logits[0].float()  # the logits that chose each next token
            lp = torch.log_softmax(full, dim=-1)
            gen = seq[len(ids):]
            top2 = full[len(ids) - 1:].topk(2, dim=-1).values
            prompts.append(ids)
            tokens.append(gen)
            logits.append(full)
            logprobs.append([float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(gen)])
            margins.append(float((top2[:, 0] - top2[:, 1]).min()))
    return {"prompts": prompts, "tokens": tokens, "logits": logits, "logprobs": logprobs, "margin": min(margins),
            "text_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS],
            "arch": model.config.architectures[0]}


def compare(ref: dict, res: dict) -> dict:
    """Prompts with equal greedy tokens; the max difference (log-probs or logits) up to each first difference."""
    import torch

    equal, diff = 0, 0.0
    for i, (mine, theirs) in enumerate(zip(ref["tokens"], res["tokens"])):
        same = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
        equal += same == len(mine) == len(theirs)
        if "logprobs" in res:
            d = [abs(a - b) for a, b in zip(ref["logprobs"][i][:same], res["logprobs"][i][:same])]
        else:  # positions: the prompt's, then the generated tokens' before the first difference
            n = len(ref["prompts"][i]) + same
            d = [float((ref["logits"][i][:n] - torch.tensor(res["logits"][i][:n])).abs().max())]
        diff = max([diff, *d])
    text_equal = sum(a == b for a, b in zip(ref["text_ids"], res["text_ids"]))
    return {"equal": equal, "diff": diff, "text_equal": text_equal}


# ------------------------------------------------------------------------------ the engines, each in its own python


def _probe(python: str | None, module: str, flag: str) -> str | None:
    """None if `python` imports `module`, else why the engine is not checked."""
    if not python:
        return f"no {flag} given"
    try:
        out = subprocess.run([python, "-c", f"import {module}"], check=False, capture_output=True, text=True,
                             timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python} did not run: {e}"
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import {module} ({last[:160]})"
    return None


def _child(cmd: list[str], log_path: Path, timeout: float, env=None) -> str | None:
    """Run an engine step; None on success, else the reason (its output is in `log_path`)."""
    with open(log_path, "w", encoding="utf-8") as f:
        try:
            rc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env=env).returncode
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s (log: {log_path})"
    if rc:
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        errors = [x for x in lines if re.match(r"[A-Za-z_.]*(Error|Exception)\b", x)]  # the traceback's last line
        return f"exit {rc} (log: {log_path}): {(errors or lines or ['no output'])[-1][:400]}"
    return None


def gpt2_pre_tokenizer(moe: Path) -> bool:
    """True if tokenizer.json splits text exactly as GPT-2 does (byte-level, its regex, no prefix space, no
    normaliser): llama.cpp's "gpt-2" pre-tokenizer is that split, so naming it is right whatever the vocabulary."""
    try:
        spec = json.loads((moe / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and (spec.get("model") or {}).get("type") == "BPE")


def _engine_result(python: str, script: str, argv: list[str], work: Path, name: str,
                   timeout: float) -> tuple[dict | None, str | None]:
    """Run `script argv... RESULT.json` (an engine's side, bench/serve_*.py) in `python`; its result or why not."""
    out = work / f"{name}_result.json"
    why = _child([python, str(BENCH / script), *argv, str(out)], work / f"{name}.log", timeout)
    return (None, why) if why else (json.loads(out.read_text()), None)


def run_vllm(python: str, moe: Path, request: Path, work: Path, timeout: float) -> tuple[dict | None, str | None]:
    return _engine_result(python, "serve_vllm.py", [str(request)], work, "vllm", timeout)


def run_llama_cpp(python: str, converter: str, moe: Path, request: Path, work: Path,
                  timeout: float) -> tuple[dict | None, str | None]:
    gguf = work / f"{moe.name}.f32.gguf"
    pre = ["--pre-tokenizer", "gpt-2"] if gpt2_pre_tokenizer(moe) else []
    why = _child([python, str(BENCH / "serve_llama_cpp.py"), "convert", converter, str(moe), str(gguf), *pre],
                 work / "llama_cpp_convert.log", timeout)
    if why:
        if "TokenizersBackend" in why:  # written before dume.checkpoint.tokenizer_files named a 4.x class
            why += (" -- the tokenizer_config.json names transformers 5's class; rename it in place with "
                    "`python -c 'from dume.checkpoint.tokenizer_files import make_portable; make_portable(\"DIR\")'`")
        return None, f"conversion failed: {why}"
    req = json.loads(request.read_text())
    req["gguf"] = str(gguf)
    request = work / "llama_cpp_request.json"
    request.write_text(json.dumps(req))
    return _engine_result(python, "serve_llama_cpp.py", ["run", str(request)], work, "llama_cpp", timeout)


def run_transformers(python: str, moe: Path, request: Path, work: Path,
                     timeout: float) -> tuple[dict | None, str | None]:
    return _engine_result(python, "serve_transformers.py", [str(request)], work, "transformers", timeout)


# ------------------------------------------------------------------------------ the check


def check(moe: Path, args, work: Path, log=print) -> list[dict]:
    """One row per engine for this MoE: checked (with its numbers and pass/fail) or not, and why."""
    ref = reference(moe)
    log(f"transformers: {ref['arch']} {moe}: {len(PROMPTS)} prompts x {MAX_NEW_TOKENS} greedy tokens in float32 "
        f"(smallest top-1/top-2 logit margin {ref['margin']:.2e})")
    request = work / f"{moe.name}_request.json"
    request.write_text(json.dumps({"model": str(moe), "prompts": ref["prompts"], "texts": list(PROMPTS),
                                   "max_new_tokens": MAX_NEW_TOKENS, "max_model_len": MAX_MODEL_LEN,
                                   "threads": args.threads}))
    rows = []
    def llama_cpp(python, *rest):
        return run_llama_cpp(python, args.gguf_converter, *rest)

    engines = (("vLLM", args.vllm_python, "vllm", "--vllm-python", "log-prob", args.max_logprob_diff, run_vllm),
               ("llama.cpp", args.llama_cpp_python, "llama_cpp", "--llama-cpp-python", "logit", args.max_logit_diff,
                llama_cpp),
               ("transformers 4.x", args.transformers4_python, "transformers", "--transformers4-python", "logit",
                args.max_logit_diff, run_transformers))
    for name, python, module, flag, what, bar, run_engine in engines:
        row = {"engine": name, "moe": ref["arch"], "what": what, "bar": bar}
        why = _probe(python, module, flag)
        if why is None and name == "llama.cpp" and not args.gguf_converter:
            why = "no --gguf-converter given (llama.cpp's convert_hf_to_gguf.py)"
        if why is None:
            sub = work / moe.name
            sub.mkdir(exist_ok=True)
            res, why = run_engine(python, moe, request, sub, args.timeout)
            if why:
                row.update(status="failed", why=why)
            else:
                row.update(compare(ref, res), version=res["version"], status="checked")
                row["passed"] = row["equal"] == len(PROMPTS) and row["diff"] <= bar
        else:
            row.update(status="not checked", why=why)
            log(f"{name}: not checked, {why}")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    n = len(PROMPTS)
    lines = [(f"| engine | version | MoE | prompts with equal tokens (of {n}) | max abs diff (bar) | "
              f"tokenizer ids equal (of {n}) | result |"), "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] == "checked":
            lines.append(f"| {r['engine']} | {r['version']} | {r['moe']} | {r['equal']} | {r['what']} "
                         f"{r['diff']:.2e} ({r['bar']:.0e}) | {r['text_equal']} | "
                         f"{'pass' if r['passed'] else 'FAIL'} |")
        else:
            lines.append(f"| {r['engine']} | - | {r['moe']} | - | - | - | {r['status']}: {r['why']} |")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", type=Path, default=None, help="check this MoE checkpoint instead of building small ones")
    p.add_argument("--arch", nargs="+", choices=("llama", "qwen3"), default=["llama", "qwen3"],
                   help="the experts' architecture of the small MoEs built (default: both)")
    p.add_argument("--vllm-python", default=None, help="a python that imports vllm (its own venv)")
    p.add_argument("--llama-cpp-python", default=None,
                   help="a python that imports llama_cpp and runs the converter (torch, transformers 4.x, gguf)")
    p.add_argument("--gguf-converter", default=None, help="llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--transformers4-python", default=None,
                   help="a python with another transformers (4.x) install, e.g. the llama.cpp converter's venv")
    p.add_argument("--max-logprob-diff", type=float, default=MAX_LOGPROB_DIFF)
    p.add_argument("--max-logit-diff", type=float, default=MAX_LOGIT_DIFF)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: its own)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine step")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the MoEs, GGUFs and engine logs here")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="dume-serve-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        moes = [args.moe.resolve()] if args.moe else [build_small_moe(a, work) for a in args.arch]
        rows = [r for moe in moes for r in check(moe, args, work)]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    failed = [r for r in rows if r["status"] == "failed" or (r["status"] == "checked" and not r["passed"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
