"""Capturing every layer's router input (the MLP's input) in one forward pass."""

from __future__ import annotations

import torch

from dume.errors import DumeError


class MLPInputCapture:
    """Forward pre-hooks on every decoder layer's MLP that keep its input."""

    def __init__(self, model):
        layers = model.model.layers
        self.features: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = [layer.mlp.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index):
        def hook(module, args):
            self.features[index] = args[0].detach()
        return hook

    def close(self):
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def token_mask(attention_mask: torch.Tensor, num_dume_tokens: int | None) -> torch.Tensor:
    """Which positions count: real tokens, and among them only each row's first N."""
    mask = attention_mask.bool()
    if num_dume_tokens is not None:
        if num_dume_tokens < 1:
            raise DumeError(f"num_dume_tokens must be at least 1, got {num_dume_tokens}")
        mask = mask & (mask.long().cumsum(dim=1) <= num_dume_tokens)
    return mask


def right_padded(mask: torch.Tensor) -> bool:
    """True when every row's real tokens come first (then padding)."""
    m = mask.long()
    return bool((m[:, 1:] <= m[:, :-1]).all())
