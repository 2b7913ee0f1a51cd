"""Router weights for a Mixtral MoE: DUME's ridge solution, the centroid and random baselines (docs/design.md §2).

DUME routes with g(x) = TopK(Softmax(Wᵀx / T)) (paper §2.2, temperature from §3). Hugging Face's
`MixtralTopKRouter` computes logits = x @ weightᵀ with weight [D, H], then a float32 softmax, top-k and
renormalisation of the k weights: the same function once weight = Wᵀ / T. So every router here is a list (one
per layer) of [D, H] float32 tensors that drops straight into `model.layers[l].mlp.gate.weight`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dume.errors import DumeError
from dume.stats.ridge import RidgeStats


def gates_from_solution(W: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    """W [L, H, D] (columns = domains) -> per-layer Mixtral gate weights Wᵀ/T, [D, H] float32. The division by T
    happens in float64, before the cast, so T does not add rounding."""
    if W.dim() != 3:
        raise DumeError(f"router solution must be [L, H, D], got shape {tuple(W.shape)}")
    T = _temperature(temperature)
    return [(W[l].to(torch.float64).T / T).to(torch.float32).contiguous() for l in range(W.shape[0])]


def dume_gates(stats: RidgeStats, lam: float, temperature: float = 1.0, domains: Sequence[str] | None = None,
               relative_lambda: bool = False) -> list[torch.Tensor]:
    """DUME's ridge-regression routers (expert j = domains[j], or stats.domains[j])."""
    _temperature(temperature)  # fail before the solve
    return gates_from_solution(stats.solve(lam, domains=domains, relative=relative_lambda), temperature)


def layer_solver(lam: float, temperature: float = 1.0, relative_lambda: bool = False):
    """DUME's router of one layer from its sums: what the layer-sequential collector (`dume.stats.sequential`)
    routes the earlier layers with."""
    _temperature(temperature)
    return lambda one_layer: dume_gates(one_layer, lam, temperature, relative_lambda=relative_lambda)[0]


def centroid_gates(stats: RidgeStats, temperature: float = 1.0,
                   domains: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Routers whose rows are the domains' normalised mean router inputs (the idea of mergekit's "hidden" gate on
    DUME's statistics): the baseline that isolates what DUME's A⁻¹ adds."""
    _temperature(temperature)
    return gates_from_solution(stats.centroid(domains=domains), temperature)


def random_gates(num_layers: int, num_experts: int, hidden_size: int, seed: int,
                 std: float = 0.02) -> list[torch.Tensor]:
    """The untrained router of the random-routing and BTX baselines: N(0, std²) entries, std = Mixtral's default
    initializer_range. A private generator keeps the result a function of `seed` alone, whatever else touched
    the global RNG."""
    if min(num_layers, num_experts, hidden_size) < 1:
        raise DumeError(f"num_layers, num_experts and hidden_size must be >= 1, got {num_layers}, {num_experts}, "
                        f"{hidden_size}")
    if not (math.isfinite(std) and std > 0):
        raise DumeError(f"std must be positive and finite, got {std!r}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return [torch.randn(num_experts, hidden_size, generator=gen, dtype=torch.float32) * std
            for _ in range(num_layers)]


def route(x: torch.Tensor, gate: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference TopK(Softmax(gate @ x)), the k weights renormalised to sum to 1, written out by hand so tests can
    check Mixtral's router against it: x [N, H], gate [D, H] -> (weights [N, k] float32, indices [N, k] int64)."""
    if gate.dim() != 2 or x.dim() != 2 or x.shape[1] != gate.shape[1]:
        raise DumeError(f"route needs x [N, H] and gate [D, H], got {tuple(x.shape)} and {tuple(gate.shape)}")
    D = gate.shape[0]
    if not 1 <= k <= D:
        raise DumeError(f"top-k must satisfy 1 <= k <= number of experts ({D}), got k={k}")
    logits = x.to(torch.float32) @ gate.to(torch.float32).T
    probs = torch.softmax(logits, dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True), idx


def _temperature(temperature: float) -> float:
    try:
        T = float(temperature)
    except (TypeError, ValueError):
        raise DumeError(f"temperature must be a number, got {temperature!r}") from None
    if not (math.isfinite(T) and T > 0):
        raise DumeError(f"temperature must be positive and finite, got {temperature!r}")
    return T
