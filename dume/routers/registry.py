"""The strategy registry: one record per way of combining the experts (docs/design.md §8).

Every recipe (the CLM strategies script, the reasoning recipes, `dume build`, the dynamic-experts tools, the
reports) asks this module what a strategy is; adding one is adding a `Strategy` here (and its gate function).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from dume.errors import DumeError


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
    expert_dirs: tuple = ()                  # the experts, in expert order (data-free gates)
    base_model: Any = None                   # the model the experts came from (prompt gates)
    tokenizer: Any = None
    prompts: dict = field(default_factory=dict)  # domain -> a few prompts (prompt gates)
    device: str = "cpu"


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    routed: bool = True                      # a MoE with routers (else a dense model: the oracle)
    gates: Callable | None = None            # (stats or None, GateContext) -> [D, H] per layer
    needs_statistics: bool = False
    statistics: str = "dume"                 # collector: dume, loss_aware or sequential (collectors.collect_for)
    trains_router: bool = False              # BTX / DUME+: the gates are then trained
    k: int = 1                               # experts per token (the paper's default)
    lr: float | None = None                  # router-training lr (the paper's)
    steps: int | None = None                 # router-training steps (the paper's)
    seeded: bool = False                     # the checkpoint depends on the seed
    closed_form: bool = False                # re-solvable from the statistics (dume.upcycle.dynamic)
    paper: bool = True                       # a row of Table 2 (run_clm.py); else of the routers study, ROUTERS.md
    needs_prompts: bool = False              # reads GateContext.base_model / tokenizer / prompts
    stock_checkpoint: bool = True            # loads as a stock transformers class (else a dume subclass)
    context_routing: bool = False            # routers decide from prefix-mean logits (dume.moe.context_moe)
    reasoning: bool = False                  # a row of the paper's Table 3 (dume.reasoning)
    build_gate: str | None = None            # its name as `gate:` of `dume build` (None: not offered there)
    card: str = ""                           # how the routers were set, for the model card `dume build` writes


def _dume(stats, ctx: GateContext):
    from dume.routers.closed_form import dume_gates

    return dume_gates(stats, ctx.lam, ctx.temperature, relative_lambda=ctx.relative_lambda)


def _centroid(stats, ctx: GateContext):
    from dume.routers.closed_form import centroid_gates

    return centroid_gates(stats, ctx.temperature)


def _random(stats, ctx: GateContext):
    from dume.routers.closed_form import random_gates

    return random_gates(ctx.num_layers, ctx.num_experts, ctx.hidden_size, seed=ctx.seed)


def _dume_balanced(stats, ctx: GateContext):
    """DUME on domain-balanced statistics: each domain's A and b scaled to the mean token count, so a large domain
    does not dominate the shared A."""
    from dume.routers.closed_form import dume_gates

    counts = stats.n[0].double()
    balanced = stats.scale_domains({d: float(counts.mean() / counts[j]) for j, d in enumerate(stats.domains)})
    return dume_gates(balanced, ctx.lam, ctx.temperature, relative_lambda=ctx.relative_lambda)


def _weights(stats, ctx: GateContext):
    from dume.routers.weights import weight_gates

    if len(ctx.expert_dirs) != ctx.num_experts:
        raise DumeError("the weight-based gate needs the experts' checkpoints (GateContext.expert_dirs)")
    return weight_gates(ctx.expert_dirs, ctx.temperature)


def _prompt_hidden(stats, ctx: GateContext):
    from dume.routers.prompt_hidden import prompt_hidden_gates

    if ctx.base_model is None or ctx.tokenizer is None or len(ctx.prompts) != ctx.num_experts:
        raise DumeError("mergekit's hidden gate needs a base model, a tokenizer and prompts for every expert")
    return prompt_hidden_gates(ctx.base_model, ctx.tokenizer, ctx.prompts, list(ctx.prompts), device=ctx.device)


# In table order (after the experts, the seed model and model averaging).
REGISTRY: dict[str, Strategy] = {s.name: s for s in (
    Strategy("random_routing", "MoErged, seeded random gates, no training", gates=_random, seeded=True,
             reasoning=True, build_gate="random", card="at random (a baseline)."),
    Strategy("centroid", "each gate = the normalised mean router input of its domain (DUME's λ→∞ limit)",
             gates=_centroid, needs_statistics=True, closed_form=True, build_gate="centroid",
             card="to the normalised mean hidden state of each expert's text (no training)."),
    Strategy("BTX", "random gates trained on the shuffled union of the domains", gates=_random, trains_router=True,
             k=2, lr=1e-4, steps=1000, seeded=True, reasoning=True),
    Strategy("DUME", "gates = the column-normalised ridge solution (A + λI)⁻¹b", gates=_dume, needs_statistics=True,
             closed_form=True, reasoning=True, build_gate="dume",
             card="by DUME's closed-form ridge regression on each expert's text (no training)."),
    Strategy("DUMEplus", "DUME gates, then trained like BTX", gates=_dume, needs_statistics=True,
             trains_router=True, k=1, lr=1e-5, steps=1000, seeded=True, reasoning=True),
    Strategy("oracle", "every token of domain d goes to expert d (a dense model per domain)", routed=False,
             reasoning=True),
    # The routers study (issue 14): training-free routers beyond the paper, not in Table 2.
    Strategy("DUME_balanced", "DUME with each domain's statistics weighted to equal token mass",
             gates=_dume_balanced, needs_statistics=True, closed_form=True, paper=False),
    Strategy("DUME_loss", "ridge targets = softmax of the experts' negative next-token losses",
             gates=_dume, needs_statistics=True, statistics="loss_aware", paper=False),
    Strategy("DUME_loss_balanced", "loss-aware targets on domain-balanced statistics",
             gates=_dume_balanced, needs_statistics=True, statistics="loss_aware", paper=False),
    Strategy("DUME_sequential", "DUME with layer l's statistics collected through layers < l routed",
             gates=_dume, needs_statistics=True, statistics="sequential", paper=False),
    # `dume build`'s sequential_balanced: the routers study's verdict (reproduction/clm/ROUTERS.md), the one
    # stock-checkpoint router that beat DUME on every seed of both domain sets. DUME stays the default: the
    # margin on the held-out set was 0.1 points (1 % of the gap).
    Strategy("DUME_sequential_balanced", "layer-sequential statistics, domain-balanced",
             gates=_dume_balanced, needs_statistics=True, statistics="sequential", paper=False,
             build_gate="sequential_balanced",
             card="by DUME's closed-form ridge regression on each expert's text, collected layer by layer through "
                  "the routed MoE with each domain weighted equally (no training)."),
    Strategy("DUME_context", "DUME gates; each router decides from its logits averaged over the sequence so far "
             "(a registered Mixtral subclass, not a stock checkpoint)", gates=_dume, needs_statistics=True,
             context_routing=True, stock_checkpoint=False, paper=False),
    Strategy("DUME_context_balanced", "context-aware routing with domain-balanced DUME gates", gates=_dume_balanced,
             needs_statistics=True, context_routing=True, stock_checkpoint=False, paper=False),
    Strategy("weights", "data-free: each expert's top singular direction of its MLP change (Arrow-style)",
             gates=_weights, paper=False),
    Strategy("mergekit_hidden", "mergekit's prompt 'hidden' gate: the base model's last-token residual "
             "stream per layer, averaged over a few prompts per expert", gates=_prompt_hidden, needs_prompts=True,
             paper=False),
)}

# Rows of Table 2 in order: the dense baselines, then the registry's strategies.
TABLE_ORDER = ("seed", "model_averaging", *REGISTRY)


def build_gates() -> dict[str, str]:
    """`dume build`'s `gate:` values -> strategy names, the default (dume) first."""
    offered = [s for s in REGISTRY.values() if s.build_gate]
    offered.sort(key=lambda s: s.build_gate != "dume")
    return {s.build_gate: s.name for s in offered}


def get(name: str) -> Strategy:
    if name not in REGISTRY:
        raise DumeError(f"unknown strategy {name!r}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def names(*, routed: bool | None = None, closed_form: bool | None = None, seeded: bool | None = None,
          paper: bool | None = None, reasoning: bool | None = None) -> tuple[str, ...]:
    """Registered strategy names, optionally filtered by their properties."""
    return tuple(s.name for s in REGISTRY.values()
                 if (routed is None or s.routed == routed) and (closed_form is None or s.closed_form == closed_form)
                 and (seeded is None or s.seeded == seeded) and (paper is None or s.paper == paper)
                 and (reasoning is None or s.reasoning == reasoning))


def make_gates(name: str, stats, ctx: GateContext):
    """The strategy's initial gates (before any router training)."""
    s = get(name)
    if s.gates is None:
        raise DumeError(f"{name} has no routers")
    if s.needs_statistics and stats is None:
        raise DumeError(f"{name} needs DUME statistics")
    return s.gates(stats, ctx)
