"""The tokenizer: a byte-level BPE trained with `tokenizers` on the pretraining corpus (the paper used Llama-3's;
no hub here), saved as a standard Hugging Face tokenizer, or any tokenizer by name or path."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dume.checkpoint.io import atomic_dir
from dume.checkpoint.tokenizer_files import make_portable
from dume.errors import DumeError

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def train_bpe_tokenizer(texts, vocab_size: int = 4096):
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, so any text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def load_tokenizer(name_or_path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:
        hint = ""
        if "/" in str(name_or_path) and not Path(name_or_path).exists():
            hint = (f" (a gated hub tokenizer needs its licence accepted on huggingface.co/{name_or_path} and "
                    f"`hf auth login`; or pass a local copy: hf download {name_or_path} --include 'tokenizer*' "
                    "--local-dir DIR, then --tokenizer DIR)")
        raise DumeError(f"could not load a tokenizer from {name_or_path}: {type(e).__name__}: {str(e)[:300]}{hint}") from e
    if tok.eos_token_id is None:
        raise DumeError(f"tokenizer {name_or_path} has no eos token; documents need a separator")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def save_run_tokenizer(tok, path: Path, made_from: str) -> None:
    """Keep the run's tokenizer in `path` (atomically), with where it came from."""
    with atomic_dir(path) as tmp:
        tok.save_pretrained(tmp)
        make_portable(tmp)  # transformers 4.x readers (llama.cpp's converter) load it too
        (Path(tmp) / "dume_tokenizer.json").write_text(json.dumps({"made_from": made_from}) + "\n")


def vocab_fingerprint(tokenizer) -> str:
    """16 hex digits identifying a tokenizer's vocabulary (token -> id, special tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
