"""Context-aware routing (a routers-study row): a Mixtral whose routers decide from their logits' running mean.

A per-token router must tell a math token from a physics token by that token's hidden state alone; a document's
topic is better seen over its prefix. Here layer l routes token t by  mean_{s<=t} W_l x_s  (the router logits
averaged causally over the positions up to t), then the usual softmax, top-k and renormalisation: the first
token routes as in stock Mixtral, and (logits being linear in x) this is the stock router on the prefix mean.

A small subclass registered with transformers' Auto classes when this module is imported (never remote code):
model_type `dume_context_mixtral`, Mixtral's tensors and on-disk names (its checkpoint conversion registered
for the new type), so a DUME MoE becomes one by rewriting its config.json (`make_context_moe`).

Limits, on purpose (a research prototype): the mean runs over every position of the forward call, padding
included -- right padding does not matter (it comes after the real tokens), left padding does; and with a KV
cache a new token sees only itself, so the saved generation config turns the cache off (`use_cache: false`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, MixtralTopKRouter

MODEL_TYPE = "dume_context_mixtral"


class ContextMixtralConfig(MixtralConfig):
    model_type = MODEL_TYPE


class PrefixMeanRouter(MixtralTopKRouter):
    """Mixtral's router on [B, T, H] inputs, with logits averaged over each prefix."""

    def forward(self, hidden_states: torch.Tensor):
        B, T, _ = hidden_states.shape
        logits = F.linear(hidden_states, self.weight)  # [B, T, D]
        steps = torch.arange(1, T + 1, device=logits.device, dtype=torch.float32).view(1, T, 1)
        context = (logits.float().cumsum(dim=1) / steps).reshape(B * T, -1)
        probs = torch.softmax(context, dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_value /= top_value.sum(dim=-1, keepdim=True)
        return context.to(logits.dtype), top_value, top_index


class PrefixMeanMoeBlock(MixtralSparseMoeBlock):
    def __init__(self, config):
        super().__init__(config)
        self.gate = PrefixMeanRouter(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, H = hidden_states.shape
        _, weights, index = self.gate(hidden_states)
        out = self.experts(hidden_states.reshape(-1, H), index, weights)
        return out.reshape(B, T, H)


class ContextMixtralForCausalLM(MixtralForCausalLM):
    config_class = ContextMixtralConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = PrefixMeanMoeBlock(config)
        self.post_init()


def _register() -> None:
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)

    AutoConfig.register(MODEL_TYPE, ContextMixtralConfig, exist_ok=True)
    AutoModelForCausalLM.register(ContextMixtralConfig, ContextMixtralForCausalLM, exist_ok=True)
    if get_checkpoint_conversion_mapping(MODEL_TYPE) is None:
        register_checkpoint_conversion_mapping(MODEL_TYPE, get_checkpoint_conversion_mapping("mixtral"))


_register()


def make_context_moe(moe_dir) -> None:
    """Turn a Mixtral checkpoint directory (a DUME MoE) into a context-routed one in place: the weights stay,
    config.json names the subclass, generation runs without the KV cache."""
    from pathlib import Path

    from dume.checkpoint.io import atomic_write_json, read_json
    from dume.errors import DumeError

    moe_dir = Path(moe_dir)
    cfg = read_json(moe_dir / "config.json")
    if cfg.get("model_type") not in ("mixtral", MODEL_TYPE):
        raise DumeError(f"{moe_dir}: context routing needs a Mixtral checkpoint, got model_type {cfg.get('model_type')!r}")
    cfg.update(model_type=MODEL_TYPE, architectures=[ContextMixtralForCausalLM.__name__], use_cache=False)
    atomic_write_json(moe_dir / "config.json", cfg)
    gen = read_json(moe_dir / "generation_config.json") if (moe_dir / "generation_config.json").is_file() else {}
    gen["use_cache"] = False
    atomic_write_json(moe_dir / "generation_config.json", gen)
