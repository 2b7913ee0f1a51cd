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


class _LayerRun(torch.nn.Module):
    """Stands in for decoder layer `index` inside the model's own forward: fills the real layer from the
    checkpoint, runs it over the hidden states `batch_size` rows at a time, counts each row's top-1 experts from
    its router's logits, and empties the layer again (back to the meta device)."""

    def __init__(self, index: int, layer, fill, batch_size: int, count):
        super().__init__()
        self.index, self.batch_size = index, batch_size
        self._layer, self._fill, self._count = [layer], fill, count  # in a list: not a registered submodule

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        layer = self._fill(self.index, self._layer[0], hidden_states.device)
        logits = []
        hook = layer.mlp.gate.register_forward_hook(lambda m, a, out: logits.append(out[0] if isinstance(out, tuple)
                                                                                    else out))
        outs = []
        try:
            for i in range(0, len(hidden_states), self.batch_size):
                mask = attention_mask[i:i + self.batch_size] if isinstance(attention_mask, torch.Tensor) else None
                outs.append(layer(hidden_states[i:i + self.batch_size], attention_mask=mask, **kwargs))
        finally:
            hook.remove()
            layer.to("meta")
        self._count(self.index, logits)
        return torch.cat(outs)


@torch.no_grad()
def streamed_routing_shares(moe_dir, blocks_by_domain: dict, batch_size: int = 32, device: str = "cpu",
                            dtype=None) -> dict:
    """`routing_shares` of the MoE checkpoint at `moe_dir` without holding the MoE: it is made on the meta
    device and runs its own forward over every domain's blocks at once, with each decoder layer filled from the
    checkpoint just before it runs and emptied after. The peak is one layer plus the blocks' hidden states
    (tokens × hidden), not the whole MoE -- 14.6 GB in float32 for four Llama-3.2-1B experts (issue 23).
    `tests/test_architectures.py` checks it equals `routing_shares` of the loaded model."""
    from transformers import AutoModelForCausalLM

    from dume.checkpoint.reader import CheckpointReader, majority_dtype
    from dume.moe.edit import fill_parameters, num_experts, open_moe

    moe_dir, cfg, arch = open_moe(moe_dir)
    domains = [d for d, (ids, _) in blocks_by_domain.items() if len(ids)]
    width = max(blocks_by_domain[d][0].shape[1] for d in domains)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731  (right padding)
    ids = torch.cat([pad(blocks_by_domain[d][0]) for d in domains])
    mask = torch.cat([pad(blocks_by_domain[d][1]) for d in domains])
    owner = torch.cat([torch.full((len(blocks_by_domain[d][0]),), j) for j, d in enumerate(domains)])
    token_owner = owner[:, None].expand_as(mask).reshape(-1)
    keep = mask.reshape(-1).bool()
    D, k = num_experts(cfg), cfg.num_experts_per_tok
    counts = torch.zeros(len(domains), cfg.num_hidden_layers, D, dtype=torch.long)

    def count(layer: int, logits: list) -> None:
        top1 = torch.cat([top1_experts(x, k) for x in logits])
        for j in range(len(domains)):
            counts[j, layer] += torch.bincount(top1[keep & (token_owner == j)], minlength=D)

    with CheckpointReader(moe_dir) as rd:
        dtype = dtype or majority_dtype(rd.dtype(n) for n in rd.keys())

        def fill(index: int, layer, where):
            layer.to_empty(device="cpu")
            fill_parameters(((f"model.layers.{index}.{n}", p) for n, p in layer.named_parameters()), rd, moe_dir,
                            cfg, arch)
            return layer.to(where).eval()

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        base = model.model
        for prefix, module in (("model.embed_tokens", base.embed_tokens), ("model.norm", base.norm)):
            module.to_empty(device="cpu")
            fill_parameters(((f"{prefix}.{n}", p) for n, p in module.named_parameters()), rd, moe_dir, cfg, arch)
            module.to(device)
        base.rotary_emb = type(base.rotary_emb)(config=cfg).to(device)
        base.layers = torch.nn.ModuleList(_LayerRun(i, layer, fill, batch_size, count)
                                          for i, layer in enumerate(base.layers))
        base.eval()
        base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    totals = counts.sum(dim=2, keepdim=True).clamp(min=1)
    return {d: (counts[j].double() / totals[j]).tolist() for j, d in enumerate(domains)}
