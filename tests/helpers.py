"""Tiny models and tokenizers for tests (no network, no files from a hub)."""

from __future__ import annotations

import socket
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

WORDS = ("the a of to in is was by for on with as at from that this it are be or an "
         "def return import class self if else for while print list dict x y z 0 1 2 "
         "theorem proof number set group energy atom force war king empire god mind").split()


def tiny_texts(n: int = 200, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(5, 30, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g)
        out.append(" ".join(WORDS[i] for i in idx) + ".")
    return out


def tiny_tokenizer(vocab_size: int = 300):
    from dume.text.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(tiny_texts(300), vocab_size=vocab_size)


def tiny_llama(vocab_size: int = 300, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def one_error_line(capsys, rc: int, *needles) -> str:
    """A refused command: exit status 2 and exactly one `error: ...` line on stderr (no
    traceback) that names every needle. Returns that line."""
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def launch_cmd(*argv: str, processes: int = 2) -> list[str]:
    """`accelerate launch --multi_gpu` of `argv` with `processes` CPU processes (torchrun's launcher, gloo), on a
    free port so parallel tests do not meet; run it with CUDA_VISIBLE_DEVICES="" in the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *argv]
