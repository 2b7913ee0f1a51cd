"""Where tokens go: per layer, the share of each domain's tokens that each expert receives as its top-1 choice.
The diagonal is the per-token routing accuracy, which says why a router wins or loses (docs/design.md §4).

The routers' logits come from the MoE model itself (`output_router_logits=True`, per layer in Mixtral and
Qwen3-MoE); the top-1 expert is chosen as their routers choose it: top-k of the float32 softmax, first index.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def routing_shares(model, blocks_by_domain: dict, batch_size: int = 32) -> dict:
    """{domain: [layer][expert] share of its non-padding tokens} on the (input_ids, attention_mask) blocks."""
    model.eval()
    device = next(model.parameters()).device
    cfg = model.config
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    out = {}
    for domain, (ids, mask) in blocks_by_domain.items():
        counts = torch.zeros(cfg.num_hidden_layers, num_experts, dtype=torch.long)
        for i in range(0, len(ids), batch_size):
            m = mask[i:i + batch_size]
            res = model(input_ids=ids[i:i + batch_size].to(device), attention_mask=m.to(device),
                        output_router_logits=True, logits_to_keep=1)
            keep = m.reshape(-1).bool()
            for layer, logits in enumerate(res.router_logits):
                probs = torch.softmax(logits.float(), dim=-1)
                top1 = torch.topk(probs, cfg.num_experts_per_tok, dim=-1).indices[:, 0].cpu()
                counts[layer] += torch.bincount(top1[keep], minlength=num_experts)
        totals = counts.sum(dim=1, keepdim=True).clamp(min=1)
        out[domain] = (counts.double() / totals).tolist()
    return out


def routing_accuracy(shares: dict, expert_of_domain: dict[str, int]) -> dict:
    """{domain: [per-layer share routed to the domain's own expert]}."""
    return {d: [layer[expert_of_domain[d]] for layer in shares[d]] for d in shares if d in expert_of_domain}
