"""Where the oracle loses: which averaged parameter group costs an expert its edge.

MoErging keeps each expert's MLPs and averages everything else. The oracle (every token sent to its own
domain's expert) therefore differs from expert d only by the averaged non-MLP parameters, so its loss can be
split by averaging one group at a time (`GROUPS`) inside expert d and measuring d's test perplexity. A group
whose averaging keeps ~100 % is harmless to MoErging; the group that loses most is where expert drift hurts,
and the lever for "Oracle ≥ 90" (RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dume.report.clm_table import clm_scores

GROUPS = {
    "attention": lambda name: ".self_attn." in name,  # the q/k/v/o projections of every layer
    "embeddings": lambda name: "embed_tokens" in name or name.startswith("lm_head"),  # untied in every preset here
    "norms": lambda name: "norm" in name,  # every RMSNorm weight
    "non-MLP": lambda name: ".mlp." not in name,  # all three at once: exactly the oracle for domain d
}


@torch.no_grad()
def oracle_ablation(run, domains: list[str], made_by: str = "clm_train_experts.py") -> dict:
    """{domain: {group: normalised score of expert d with that group averaged}, "average": {...}}. Scores are
    100·p̂_d/p with p̂_d expert d's own test perplexity, as in Table 2."""
    from dume.moe.merge import shared_state_dict

    experts = {d: run.load(run.expert_dir(d), made_by) for d in domains}
    states = {d: {k: v.clone() for k, v in m.state_dict().items()} for d, m in experts.items()}
    avg = shared_state_dict([run.expert_dir(d) for d in domains])  # MoErging's own average
    per_domain = {}
    for d in domains:
        model = experts[d]
        own = run.evaluate(model, [d], label=f"{d}_expert")[d]["perplexity"]
        row = {}
        for group, member in GROUPS.items():
            model.load_state_dict({k: (avg[k] if member(k) and k in avg else v) for k, v in states[d].items()})
            ppl = run.evaluate(model, [d], label=f"{d} with averaged {group}")[d]["perplexity"]
            row[group] = clm_scores({d: ppl}, {d: own})["average"]
        model.load_state_dict(states[d])
        per_domain[d] = row
    average = {g: sum(per_domain[d][g] for d in domains) / len(domains) for g in GROUPS}
    return {"per_domain": per_domain, "average": average, "groups": list(GROUPS)}


def ablation_markdown(ablations: list[dict], domains: list[str]) -> str:
    """Mean over seeds of the ablation scores: rows = groups, columns = domains."""
    groups = ablations[0]["groups"]
    lines = ["| averaged inside expert d | " + " | ".join(domains) + " | average |",
             "|---|" + "---:|" * (len(domains) + 1)]
    for g in groups:
        cells = [sum(a["per_domain"][d][g] for a in ablations) / len(ablations) for d in domains]
        mean = sum(a["average"][g] for a in ablations) / len(ablations)
        lines.append(f"| {g} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | **{mean:.1f}** |")
    return "\n".join(lines) + "\n"


def ablation_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "results" / "oracle_ablation.json"
