"""The reasoning setting's experts, strategies and the paper's settings (paper §3.1)."""

from __future__ import annotations

from typing import Mapping, Sequence

from dume.errors import DumeError
from dume.reasoning.tasks import DOMAINS
from dume.routers.registry import REGISTRY as _REGISTRY, names

DEFAULT_EXPERTS = {"math": "MergeBench/Llama-3.2-3B_math", "multilingual": "MergeBench/Llama-3.2-3B_multilingual",
                   "coding": "MergeBench/Llama-3.2-3B_coding",
                   "instruction": "MergeBench/Llama-3.2-3B_instruction"}

EXPERT_STRATEGIES = tuple(f"{d}_expert" for d in DOMAINS)

# Table 3's strategies in the paper's order: experts, model averaging, oracle, the registry's `reasoning` rows.
STRATEGIES = EXPERT_STRATEGIES + ("model_averaging", "oracle", *names(routed=True, reasoning=True))
# Table 3's rows: every strategy, and DUME OOD (DUME on the experts' training sets) after DUME.
ROWS = tuple(r for s in STRATEGIES for r in ((s, "DUME_OOD") if s == "DUME" else (s,)))

# Seeded strategies (random gates, the router training's data order): built once per seed, the others once.
SEEDED_STRATEGIES = tuple(s for s in STRATEGIES if s in _REGISTRY and _REGISTRY[s].seeded)

# The paper's reasoning settings (§3.1), and the original code's statistics cap.
PAPER = {"lam": 0.01, "k": 1, "temperature": 0.1, "num_dume_tokens": 1024, "max_num_samples": 2048}

ROUTER_TRAINING = {s.name: {"k": s.k, "lr": s.lr, "steps": s.steps} for s in _REGISTRY.values()
                   if s.trains_router and s.name in STRATEGIES}


def parse_experts(spec: str | Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """`math=PATH,coding=ID,...` (or a mapping, or four values in DOMAINS order) -> {domain: hub id or local
    path}, in DOMAINS order; missing domains get the paper's id."""
    out = dict(DEFAULT_EXPERTS)
    if spec is None:
        return out
    if isinstance(spec, Mapping):
        items = dict(spec)
    else:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        if all("=" in p for p in parts):
            items = dict(p.split("=", 1) for p in parts)
        elif len(parts) == len(DOMAINS):
            items = dict(zip(DOMAINS, parts))
        else:
            raise DumeError(f"--experts: give {len(DOMAINS)} values ({', '.join(DOMAINS)}) or domain=path pairs")
    for d in items:
        if d not in DOMAINS:
            raise DumeError(f"--experts: unknown domain {d!r}; domains are {', '.join(DOMAINS)}")
    out.update({d: str(v).strip() for d, v in items.items()})
    return {d: out[d] for d in DOMAINS}
