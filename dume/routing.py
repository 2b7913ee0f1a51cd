"""Where tokens go: per layer, the share of each domain's tokens that each expert
receives as its top-1 choice. The diagonal share is the per-token routing accuracy, the
diagnostic that says why a router wins or loses (docs/design.md §4)."""

from __future__ import annotations

import torch


class RoutingRecorder:
    """Hooks every Mixtral router and counts top-1 choices of real (non-padding) tokens."""

    def __init__(self, model):
        self.layers = model.model.layers
        cfg = model.config
        self.num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        self.counts = torch.zeros(len(self.layers), self.num_experts, dtype=torch.long)
        self.mask: torch.Tensor | None = None
        self._handles = [layer.mlp.gate.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index):
        def hook(module, args, output):
            top1 = output[2][:, 0].detach().cpu()
            if self.mask is not None:
                top1 = top1[self.mask.reshape(-1).bool().cpu()]
            self.counts[index] += torch.bincount(top1, minlength=self.num_experts)
        return hook

    def reset(self):
        self.counts.zero_()

    def close(self):
        for h in self._handles:
            h.remove()


@torch.no_grad()
def routing_shares(model, blocks_by_domain: dict, batch_size: int = 32) -> dict:
    """{domain: [layer][expert] share of that domain's tokens} on the given blocks."""
    model.eval()
    device = next(model.parameters()).device
    recorder = RoutingRecorder(model)
    out = {}
    try:
        for domain, (ids, mask) in blocks_by_domain.items():
            recorder.reset()
            for i in range(0, len(ids), batch_size):
                recorder.mask = mask[i:i + batch_size]
                model(input_ids=ids[i:i + batch_size].to(device), attention_mask=recorder.mask.to(device))
            totals = recorder.counts.sum(dim=1, keepdim=True).clamp(min=1)
            out[domain] = (recorder.counts.double() / totals).tolist()
    finally:
        recorder.close()
    return out


def routing_accuracy(shares: dict, expert_of_domain: dict[str, int]) -> dict:
    """{domain: [per-layer share routed to the domain's own expert]}."""
    return {d: [layer[expert_of_domain[d]] for layer in shares[d]] for d in shares if d in expert_of_domain}
