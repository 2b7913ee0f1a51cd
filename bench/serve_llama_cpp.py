"""The llama.cpp side of bench/serve_check.py, run by a python with llama-cpp-python and, for the conversion, what
llama.cpp's `convert_hf_to_gguf.py` needs (torch, transformers 4.x, gguf); its pins clash with the project's.

    PY bench/serve_llama_cpp.py convert CONVERTER MODEL_DIR OUT.gguf [--pre-tokenizer NAME]
    PY bench/serve_llama_cpp.py run REQUEST.json RESULT.json

`convert` runs the converter (`--outtype f32`) as its own command line would. The converter names a BPE
tokenizer's pre-tokenizer (the regex that splits text before the merges) by hashing the token ids of a fixed
string, so a tokenizer with its own vocabulary -- the BPE every `make clm` run trains -- is unknown to it even when
its pre-tokenizer is one llama.cpp implements. `--pre-tokenizer NAME` names it only in that case (a hash the
converter knows always wins); serve_check passes `gpt-2` only for a tokenizer.json whose pre-tokenizer is GPT-2's
byte-level split, and then checks llama.cpp's tokenisation against transformers' on the prompts.

`run` loads the GGUF with an F32 KV cache (the default F16 cache rounds keys and values to 3 decimal digits), feeds
the request's token ids, generates greedily and writes every position's logits. Standard library, numpy (which
llama-cpp-python needs) and llama_cpp only.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

GGML_TYPE_F32 = 0  # ggml's type enum: the KV cache in float32


def convert(converter: str, model_dir: str, out: str, pre_tokenizer: str | None) -> None:
    converter = Path(converter).resolve()
    sys.path.insert(0, str(converter.parent))
    if pre_tokenizer:
        from conversion.base import TextModel

        hashed = TextModel.get_vocab_base_pre

        def named_if_unknown(self, tokenizer):
            try:
                return hashed(self, tokenizer)
            except NotImplementedError:  # "BPE pre-tokenizer was not recognized"
                print(f"serve_llama_cpp: pre-tokenizer hash unknown to the converter; using {pre_tokenizer!r}",
                      file=sys.stderr)
                return pre_tokenizer

        TextModel.get_vocab_base_pre = named_if_unknown
    sys.argv = [str(converter), model_dir, "--outfile", out, "--outtype", "f32"]
    runpy.run_path(str(converter), run_name="__main__")


def run(request_path: str, result_path: str) -> None:
    import llama_cpp
    import numpy as np

    with open(request_path, encoding="utf-8") as f:
        req = json.load(f)
    llm = llama_cpp.Llama(model_path=req["gguf"], n_ctx=req["max_model_len"], n_batch=req["max_model_len"],
                          logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False,
                          n_threads=req.get("threads"), seed=0, verbose=False)
    tokens, logits = [], []
    for ids in req["prompts"]:
        llm.reset()
        llm.eval(ids)
        gen = []
        for _ in range(req["max_new_tokens"]):
            gen.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([gen[-1]])
        tokens.append(gen)
        logits.append(np.asarray(llm.scores[: llm.n_tokens - 1], dtype=np.float32).tolist())  # what chose each
    text_ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in req["texts"]]
    result = {"engine": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}", "tokens": tokens,
              "logits": logits, "text_ids": text_ids}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "convert":
        pre = rest[rest.index("--pre-tokenizer") + 1] if "--pre-tokenizer" in rest else None
        convert(*rest[:3], pre)
    elif cmd == "run":
        run(*rest[:2])
    else:
        raise SystemExit(f"unknown command {cmd!r}: convert or run")
