"""Exact layer-sequential statistics: layer l's router inputs with layers < l routed.

DUME's one pass through the oracles (paper Eq. 7) brings domain d's text to layer l through expert d's MLPs at
every earlier layer; the finished MoE brings it through whatever the earlier *routers* chose. The paper names
the exact alternative, one pass per layer: solve layer 0's router, route layer 0 with it, collect layer 1's
inputs through that, solve layer 1, and so on. That is done here on the MoE itself (its earlier routers set to
their solved gates; the forward stops at layer l, so the L passes cost about L/2 full forwards). Layer 0's
inputs depend on no MLP, so for layer 0 (and a one-layer model) this equals the one-pass statistics
(`tests/test_routers_study.py`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dume.errors import DumeError


class _StopForward(Exception):
    """Raised by the capture hook: nothing after layer l's router input is needed."""


def _routers(model):
    routers = [layer.mlp.gate for layer in model.model.layers]
    if not all(hasattr(r, "top_k") and hasattr(r, "weight") for r in routers):
        raise DumeError(f"{type(model).__name__}: expected routers with `weight` and `top_k` (Mixtral, Qwen3-MoE)")
    return routers


@torch.no_grad()
def collect_sequential_statistics(moe_dir, domains, docs, tokenizer, *, solve_layer, k: int = 1,
                                  num_dume_tokens: int | None, max_len: int, batch_size: int, device: str = "cpu",
                                  dtype=None, model_fingerprint: str | None = None, data_source: str = "",
                                  extra_meta: dict | None = None, max_batches: int | None = None, log=print):
    """RidgeStats of a MoE checkpoint (its experts in `domains` order), layer l collected with the layers before
    it routed (top-k = `k`) by the gates `solve_layer(one-layer RidgeStats) -> [D, H]` makes of their sums. The
    solver is the caller's (a router of `dume.routers`): statistics sit below the routers and never choose one.
    Returns (stats, {domain: tokens per layer})."""
    from dume.moe.edit import load_moe_streamed
    from dume.stats.capture import token_mask
    from dume.stats.ridge import RidgeStats
    from dume.text.batches import document_batches

    domains = list(domains)
    batches = {d: list(document_batches(docs[d], tokenizer, max_len, batch_size))[:max_batches] for d in domains}
    for d, b in batches.items():
        if not b:
            raise DumeError(f"domain {d!r} has no documents for the statistics")
    model = load_moe_streamed(moe_dir, dtype).to(device).eval()
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    routers = _routers(model)
    if len(domains) != routers[0].weight.shape[0]:
        raise DumeError(f"{moe_dir} has {routers[0].weight.shape[0]} experts for {len(domains)} domains")
    for r in routers:
        r.top_k = k
    stats = RidgeStats(L, H, domains, model_fingerprint=model_fingerprint, num_dume_tokens=num_dume_tokens,
                       data_source=data_source, extra_meta={**(extra_meta or {}), "statistics": "layer-sequential"},
                       device=device)
    counts = {}
    for layer in range(L):
        captured = {}

        def capture(module, args):
            captured["x"] = args[0].detach()
            raise _StopForward

        handle = model.model.layers[layer].mlp.register_forward_pre_hook(capture)
        try:
            for d in domains:
                n = 0
                for ids, mask in tqdm(batches[d], desc=f"layer {layer} {d}", leave=False):
                    try:
                        model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
                    except _StopForward:
                        pass
                    keep = token_mask(mask, num_dume_tokens)
                    stats.update(layer, d, captured.pop("x"), keep)
                    n += int(keep.sum())
                counts[d] = n
        finally:
            handle.remove()
        one = RidgeStats(1, H, domains, device=device)
        one.A[0], one.s[0], one.n[0] = stats.A[layer], stats.s[layer], stats.n[layer]
        gate = solve_layer(one)
        routers[layer].weight.copy_(gate.to(routers[layer].weight.dtype))
        log(f"sequential statistics: layer {layer} solved")
    return stats, counts
