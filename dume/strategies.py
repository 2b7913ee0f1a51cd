"""The strategy registry: one record per way of combining the experts.

Every recipe (the CLM strategies script, the reasoning recipes, `dume build`, the
dynamic-experts tools, the reports) asks this module what a strategy is: whether it is a
routed MoE, how its gates are made, whether it needs DUME's statistics or router
training, its k / lr defaults, whether its checkpoint depends on the seed, whether its
router can be re-solved from the statistics, and where its row goes in the tables.
Adding a strategy is adding one `Strategy` here (and its gate function); see
docs/design.md §8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import DumeError


@dataclass(frozen=True)
class GateContext:
    """What a gate function may use besides the statistics."""

    num_layers: int
    num_experts: int
    hidden_size: int
    lam: float = 0.01
    temperature: float = 1.0
    relative_lambda: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    routed: bool = True                      # a MoE with routers (else a dense model: the oracle)
    gates: Callable | None = None            # (stats or None, GateContext) -> [D, H] per layer
    needs_statistics: bool = False
    trains_router: bool = False              # BTX / DUME+: the gates are then trained
    k: int = 1                               # experts per token (the paper's default)
    lr: float | None = None                  # router-training lr (the paper's)
    steps: int | None = None                 # router-training steps (the paper's)
    seeded: bool = False                     # the checkpoint depends on the seed
    closed_form: bool = False                # re-solvable from the statistics (dume.dynamic)


def _dume(stats, ctx: GateContext):
    from .routers import dume_gates

    return dume_gates(stats, ctx.lam, ctx.temperature, relative_lambda=ctx.relative_lambda)


def _centroid(stats, ctx: GateContext):
    from .routers import centroid_gates

    return centroid_gates(stats, ctx.temperature)


def _random(stats, ctx: GateContext):
    from .routers import random_gates

    return random_gates(ctx.num_layers, ctx.num_experts, ctx.hidden_size, seed=ctx.seed)


# In table order (after the experts, the seed model and model averaging).
REGISTRY: dict[str, Strategy] = {s.name: s for s in (
    Strategy("random_routing", "MoErged, seeded random gates, no training", gates=_random, seeded=True),
    Strategy("centroid", "each gate = the normalised mean feature of its domain (mergekit's 'hidden' gate; "
             "DUME's λ→∞ limit)", gates=_centroid, needs_statistics=True, closed_form=True),
    Strategy("BTX", "random gates trained on the shuffled union of the domains", gates=_random, trains_router=True,
             k=2, lr=1e-4, steps=1000, seeded=True),
    Strategy("DUME", "gates = the column-normalised ridge solution (A + λI)⁻¹b", gates=_dume, needs_statistics=True,
             closed_form=True),
    Strategy("DUMEplus", "DUME gates, then trained like BTX", gates=_dume, needs_statistics=True,
             trains_router=True, k=1, lr=1e-5, steps=1000, seeded=True),
    Strategy("oracle", "every token of domain d goes to expert d (a dense model per domain)", routed=False),
)}

# Rows of Table 2 in order: the dense baselines, then the registry's strategies.
TABLE_ORDER = ("seed", "model_averaging", *REGISTRY)


def get(name: str) -> Strategy:
    if name not in REGISTRY:
        raise DumeError(f"unknown strategy {name!r}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def names(*, routed: bool | None = None, closed_form: bool | None = None, seeded: bool | None = None) -> tuple[str, ...]:
    """Registered strategy names, optionally filtered by their properties."""
    return tuple(s.name for s in REGISTRY.values()
                 if (routed is None or s.routed == routed) and (closed_form is None or s.closed_form == closed_form)
                 and (seeded is None or s.seeded == seeded))


def make_gates(name: str, stats, ctx: GateContext):
    """The strategy's initial gates (before any router training)."""
    s = get(name)
    if s.gates is None:
        raise DumeError(f"{name} has no routers")
    if s.needs_statistics and stats is None:
        raise DumeError(f"{name} needs DUME statistics")
    return s.gates(stats, ctx)
