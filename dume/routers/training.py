"""Router fine-tuning for BTX and DUME+: only the gates train, on the shuffled union of the domains' training data.

A subtlety the paper does not discuss: Mixtral's router renormalises the top-k weights, so with k = 1 the chosen
expert's weight is exactly 1 whatever the logits are, and the language-model loss gives the gate *no gradient*
(the original code had the same property). For k = 1 we therefore train through a straight-through router: the
forward is unchanged (weight 1, identical to inference) while the backward uses the chosen expert's softmax
probability, d(p / stopgrad(p)) = dp / p. For k >= 2 the router is Mixtral's own and its gradient is exact.
The optional load-balancing loss is Mixtral's `router_aux_loss_coef`, off by default as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from dume.errors import DumeError
from dume.train.loop import TrainConfig, train


class StraightThroughTop1Router(MixtralTopKRouter):
    """MixtralTopKRouter whose top-1 weight is 1 in value but carries dp/p as gradient."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        probs = torch.softmax(router_logits.float(), dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        scores = top_value / top_value.detach().sum(dim=-1, keepdim=True)
        return router_logits, scores, top_index


def gate_parameters(model) -> list[torch.nn.Parameter]:
    return [layer.mlp.gate.weight for layer in model.model.layers]


def _swap_routers(model, cls):
    for layer in model.model.layers:
        old = layer.mlp.gate
        new = cls.__new__(cls)
        new.__dict__ = old.__dict__.copy()   # same parameters, same settings
        layer.mlp.gate = new


def set_load_balancing(model, alpha: float) -> None:
    """Add (alpha > 0) or remove Mixtral's load-balancing loss. `MixtralForCausalLM` copies `router_aux_loss_coef`
    from its config at construction and its forward reads the copy, so setting only the config -- as this project
    once did -- leaves the loss unweighted by alpha (0): the attribute is set too."""
    model.config.output_router_logits = alpha > 0
    model.config.router_aux_loss_coef = alpha
    model.router_aux_loss_coef = alpha


def train_routers(model, train_data, val_data, cfg: TrainConfig, *, alpha: float = 0.0, desc: str = "routers"):
    """Fine-tune the gates of a MixtralForCausalLM in place; return (model, history)."""
    k = model.config.num_experts_per_tok
    if not 1 <= k <= model.config.num_local_experts:
        raise DumeError(f"k={k} must be between 1 and the number of experts ({model.config.num_local_experts})")
    if alpha < 0:
        raise DumeError(f"load-balancing coefficient alpha must be >= 0, got {alpha}")
    set_load_balancing(model, alpha)
    if k == 1:
        _swap_routers(model, StraightThroughTop1Router)
    try:
        model, history = train(model, train_data, val_data, cfg, params=gate_parameters(model), desc=desc)
    finally:
        if k == 1:
            _swap_routers(model, MixtralTopKRouter)
        set_load_balancing(model, 0.0)
    history["straight_through_top1"] = k == 1
    history["alpha"] = alpha
    return model, history


def mixed_blocks(blocks: list):
    """The union of several domains' blocks (the loader shuffles them): tensors pairs are concatenated, lazy window
    datasets chained (same indices either way)."""
    if all(isinstance(b, (tuple, list)) for b in blocks):
        return torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
    from torch.utils.data import ConcatDataset, TensorDataset

    return ConcatDataset([TensorDataset(*b) if isinstance(b, (tuple, list)) else b for b in blocks])
