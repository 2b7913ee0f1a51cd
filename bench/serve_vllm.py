"""The vLLM side of bench/serve_check.py, run by vLLM's own python (its pins clash with the project's).

    VLLM_PYTHON bench/serve_vllm.py REQUEST.json RESULT.json

Standard library and vllm only. Loads the checkpoint as `vllm serve DIR --dtype float32` would (dtype given:
"auto" would run a float32 checkpoint in bf16 on CPU), generates greedily from the request's token ids (fed as
ids, so both sides start from the same tokens whatever the tokenizers do), and writes each generated token with its
log-probability, plus vLLM's own tokenisation of the request's texts (a separate check of its tokenizer).
"""

from __future__ import annotations

import json
import os
import sys


def main(request_path: str, result_path: str) -> None:
    with open(request_path, encoding="utf-8") as f:
        req = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; its default (4) is sized for real models
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=req["model"], dtype="float32", max_model_len=req["max_model_len"], seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=req["max_new_tokens"], logprobs=1, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]], params, use_tqdm=False)
    tokens, logprobs = [], []
    for o in outs:
        gen = o.outputs[0]
        tokens.append(list(gen.token_ids))
        logprobs.append([step[t].logprob for t, step in zip(gen.token_ids, gen.logprobs)])
    tok = llm.get_tokenizer()
    result = {"engine": "vLLM", "version": vllm.__version__, "tokens": tokens, "logprobs": logprobs,
              "text_ids": [tok.encode(t, add_special_tokens=False) for t in req["texts"]]}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
