"""Model presets: every preset is a plain `LlamaConfig`, so every model is a stock `LlamaForCausalLM` that any
Hugging Face tool can load. Any other preset name is read as a path to a Hugging Face config (`config.json` or a
directory holding one)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from dume.errors import DumeError

PRESETS: dict[str, dict] = {
    # The tests' size: builds and trains in well under a second.
    "test-micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
    # The embedded default (docs/design.md §4): ~1.8M parameters at vocab 4096, ~6k tokens/s on two CPU cores,
    # the whole Table 2 pipeline in about 20 minutes.
    "cpu-small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    # The paper's 115M seed model (Section 3.1).
    "paper-115m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024),
}


def build_config(preset: str, tokenizer) -> LlamaConfig:
    """A LlamaConfig for `preset` whose vocabulary and special tokens match `tokenizer`."""
    if preset in PRESETS:
        config = LlamaConfig(**PRESETS[preset], rms_norm_eps=1e-5, tie_word_embeddings=False)
    else:
        path = Path(preset)
        if not path.exists():
            raise DumeError(f"unknown preset {preset!r}: use one of {sorted(PRESETS)} or a path to a config.json")
        config = AutoConfig.from_pretrained(path.parent if path.is_file() else path)
        if config.model_type != "llama":
            raise DumeError(f"{preset}: model_type {config.model_type!r}; DUME experts must be Llama models")
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def new_model(preset: str, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(build_config(preset, tokenizer))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_tokenizer_matches(config, tokenizer, where: str = "model") -> None:
    """Refuse a tokenizer whose ids the model cannot embed, before any heavy work."""
    if len(tokenizer) > config.vocab_size:
        raise DumeError(f"tokenizer has {len(tokenizer)} tokens but the {where} embeds only {config.vocab_size}: "
                        "they do not belong together (pass the tokenizer the model was trained with)")


def load_model(path: str | os.PathLike, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` with a clear error for a missing or corrupted checkpoint."""
    from transformers import AutoModelForCausalLM

    from dume.checkpoint.io import is_complete_checkpoint

    path = Path(path)
    if not is_complete_checkpoint(path):
        raise DumeError(f"no complete checkpoint at {path} (need config.json and model.safetensors); "
                        "run the step that produces it first")
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # safetensors/JSON errors come in many types
        raise DumeError(f"could not load the checkpoint at {path}: {type(e).__name__}: {e}") from e
