"""The model card `dume build` writes beside the MoE."""

from __future__ import annotations

from dume.routers.registry import get
from dume.upcycle.spec import GATES, BuildSpec


def model_card(summary: dict, spec: BuildSpec) -> str:
    s = summary["settings"]
    lines = ["---", "library_name: transformers", "tags: [moe, dume, merge]", "---", "",
             f"# DUME MoE of {len(summary['experts'])} experts", "",
             f"Built with `dume build` ({summary['architecture']}): the experts' MLPs became the experts of "
             "every layer, their other weights were averaged, and the routers were set "
             + get(GATES[s["gate"]]).card, "",
             "| expert | model | data | documents | held out | tokens |", "|---|---|---|---:|---:|---:|"]
    for e in summary["experts"]:
        model = f"`{e['model']}` + adapter `{e['adapter']}`" if e.get("adapter") else f"`{e['model']}`"
        lines.append(f"| {e['name']} | {model} | `{e['data']}` | {e['documents']} | {e['held_out']} | "
                     f"{e['tokens'] if e['tokens'] is not None else '—'} |")
    if any(e.get("adapter") for e in summary["experts"]):
        lines += ["", ("Experts given as base + adapter (LoRA) were merged into their base with peft "
                       "(`merge_and_unload`) before the build; `dume_build.json` names each merged checkpoint.")]
    lines += ["", "Settings: " + ", ".join(f"{k} = {v}" for k, v in s.items()), ""]
    shares = summary.get("routing_shares")
    if shares:
        lines += ["Routing on held-out documents: the share of each domain's tokens whose top-1 expert is its own "
                  "(mean over layers).", "", "| domain | own expert |", "|---|---:|"]
        lines += [f"| {d} | {v['own']:.1%} |" for d, v in shares.items()]
    else:
        lines.append("No held-out documents: routing shares not measured.")
    lines += ["", "Load it with `transformers.AutoModelForCausalLM.from_pretrained(path)`. `dume_stats/` and "
              "`dume_router.json` let `dume_experts.py` add, remove or re-weight an expert without retraining.", ""]
    return "\n".join(lines)
