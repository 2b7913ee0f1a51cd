"""Another transformers (e.g. 4.x, the version older lm-eval and vLLM installs and llama.cpp's converter pin) on
the request of bench/serve_check.py, run by that install's python.

    PY bench/serve_transformers.py REQUEST.json RESULT.json

Loads the checkpoint with `AutoTokenizer` / `AutoModelForCausalLM` in float32 as a user of that version would,
generates greedily from the request's token ids and writes every position's logits and its tokenisation of the
request's texts. A config.json field that version does not read falls back to its class default without an error;
this is what shows it (dume.checkpoint.config_files).
"""

from __future__ import annotations

import json
import sys


def main(request_path: str, result_path: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(request_path, encoding="utf-8") as f:
        req = json.load(f)
    major = int(transformers.__version__.split(".")[0])
    dtype = {"dtype" if major >= 5 else "torch_dtype": torch.float32}  # 4.x knows only torch_dtype
    model = AutoModelForCausalLM.from_pretrained(req["model"], **dtype).eval()
    tok = AutoTokenizer.from_pretrained(req["model"])
    tokens, logits = [], []
    with torch.no_grad():
        for ids in req["prompts"]:
            seq = list(ids)
            for _ in range(req["max_new_tokens"]):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            tokens.append(seq[len(ids):])
            logits.append(model(torch.tensor([seq[:-1]])).logits[0].float().tolist())  # what chose each token
    result = {"engine": "transformers", "version": f"transformers {transformers.__version__}", "tokens": tokens,
              "logits": logits, "tokenizer_class": type(tok).__name__,
              "text_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in req["texts"]]}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
