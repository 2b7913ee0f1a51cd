"""Where tokens go: per layer, the share of each domain's tokens that each expert receives as its top-1 choice.
The diagonal is the per-token routing accuracy, which says why a router wins or loses (docs/design.md §4).

The routers' logits come from the MoE model itself (`output_router_logits=True`, per layer in Mixtral and
Qwen3-MoE); the top-1 expert is chosen as their routers choose it: top-k of the float32 softmax, first index.
"""

from __future__ import annotations

import torch


def top1_experts(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Each token's first choice as the router makes it (top-k of the float32 softmax, first index), on the CPU."""
    return torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1).indices[:, 0].cpu()


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
                top1 = top1_experts(logits, cfg.num_experts_per_tok)
                counts[layer] += torch.bincount(top1[keep], minlength=num_experts)
        totals = counts.sum(dim=1, keepdim=True).clamp(min=1)
        out[domain] = (counts.double() / totals).tolist()
    return out


def routing_accuracy(shares: dict, expert_of_domain: dict[str, int]) -> dict:
    """{domain: [per-layer share routed to the domain's own expert]}."""
    return {d: [layer[expert_of_domain[d]] for layer in shares[d]] for d in shares if d in expert_of_domain}


@torch.no_grad()
def streamed_routing_shares(moe_dir, blocks_by_domain: dict, batch_size: int = 32, device: str = "cpu",
                            dtype=None) -> dict:
    """`routing_shares` of the MoE checkpoint at `moe_dir` without holding the MoE (`dume.moe.streamed`): every
    domain's blocks at once, one decoder layer in memory at a time. `tests/test_architectures.py` checks it equals
    `routing_shares` of the loaded model."""
    from dume.moe.edit import num_experts, open_moe
    from dume.moe.streamed import streamed_forward

    moe_dir, cfg, _ = open_moe(moe_dir)
    domains = [d for d, (ids, _) in blocks_by_domain.items() if len(ids)]
    ids, mask, owner = stack_blocks({d: blocks_by_domain[d] for d in domains})
    counter = ShareCounter(mask, owner, domains, cfg.num_hidden_layers, num_experts(cfg), cfg.num_experts_per_tok)
    streamed_forward(moe_dir, ids, mask, batch_size=batch_size, device=device, dtype=dtype, on_router_logits=counter)
    return counter.shares()


class ShareCounter:
    """Counts, per domain and layer, each expert's top-1 picks among the real tokens of stacked blocks (rows owned
    by `owner`); called with (layer, [router logits per row batch]) as `streamed_forward`'s `on_router_logits`."""

    def __init__(self, mask, owner, domains, num_layers: int, num_experts: int, k: int):
        self.token_owner = owner[:, None].expand_as(mask).reshape(-1)
        self.keep = mask.reshape(-1).bool()
        self.domains, self.D, self.k = list(domains), num_experts, k
        self.counts = torch.zeros(len(self.domains), num_layers, num_experts, dtype=torch.long)

    def __call__(self, layer: int, logits: list) -> None:
        top1 = torch.cat([top1_experts(x, self.k) for x in logits])
        for j in range(len(self.domains)):
            self.counts[j, layer] += torch.bincount(top1[self.keep & (self.token_owner == j)], minlength=self.D)

    def shares(self) -> dict:
        """{domain: [layer][expert] share of its tokens}."""
        totals = self.counts.sum(dim=2, keepdim=True).clamp(min=1)
        return {d: (self.counts[j].double() / totals[j]).tolist() for j, d in enumerate(self.domains)}


def stack_blocks(blocks_by_domain: dict):
    """(input_ids, attention_mask, owner): every domain's (ids, mask) blocks in one tensor, right-padded to the
    widest, and the index of the domain each row belongs to."""
    domains = list(blocks_by_domain)
    width = max(blocks_by_domain[d][0].shape[1] for d in domains)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # right padding
    ids = torch.cat([pad(blocks_by_domain[d][0]) for d in domains])
    mask = torch.cat([pad(blocks_by_domain[d][1]) for d in domains])
    owner = torch.cat([torch.full((len(blocks_by_domain[d][0]),), j) for j, d in enumerate(domains)])
    return ids, mask, owner
