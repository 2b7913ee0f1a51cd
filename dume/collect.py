"""Collecting DUME's ridge statistics.

Domain d's documents go through the dense model "averaged non-MLP + expert d's MLPs" —
exactly what the MoErged model computes with every router forced to expert d — and the
input of every layer's MLP (the output of `post_attention_layernorm`) is captured by a
forward hook in the same pass (the paper's Eq. 7: one pass serves every layer). Only the
first `num_dume_tokens` real tokens of each document count; padding never does. No
gradients, no backward.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .errors import DumeError


class MLPInputCapture:
    """Forward pre-hooks on every decoder layer's MLP that keep its input."""

    def __init__(self, model):
        layers = model.model.layers
        self.features: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = [layer.mlp.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index):
        def hook(module, args):
            self.features[index] = args[0].detach()
        return hook

    def close(self):
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def token_mask(attention_mask: torch.Tensor, num_dume_tokens: int | None) -> torch.Tensor:
    """Which positions count: real tokens, and among them only each row's first N."""
    mask = attention_mask.bool()
    if num_dume_tokens is not None:
        if num_dume_tokens < 1:
            raise DumeError(f"num_dume_tokens must be at least 1, got {num_dume_tokens}")
        mask = mask & (mask.long().cumsum(dim=1) <= num_dume_tokens)
    return mask


def _right_padded(mask: torch.Tensor) -> bool:
    """True when every row's real tokens come first (then padding)."""
    m = mask.long()
    return bool((m[:, 1:] <= m[:, :-1]).all())


@torch.no_grad()
def collect_domain(model, stats, domain: str, batches, num_dume_tokens: int | None = None,
                   max_batches: int | None = None, desc: str | None = None) -> int:
    """Add `domain`'s statistics from `batches` of (input_ids, attention_mask) into `stats`.

    Returns the number of tokens counted per layer.
    """
    model.eval()
    device = next(model.parameters()).device
    counted = 0
    with MLPInputCapture(model) as capture:
        for i, (ids, mask) in enumerate(tqdm(batches, desc=desc or f"stats {domain}", leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            ids, mask = ids.to(device), mask.to(device)
            if num_dume_tokens is not None and _right_padded(mask):
                # Later positions cannot influence earlier ones (causal attention), so
                # the forward can stop at the last position that counts.
                ids, mask = ids[:, :num_dume_tokens], mask[:, :num_dume_tokens]
            # The logits are never read: logits_to_keep=1 skips most of the lm_head's work.
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            keep = token_mask(mask, num_dume_tokens)
            for layer, feats in enumerate(capture.features):
                stats.update(layer, domain, feats, keep)
            counted += int(keep.sum())
    if counted == 0:
        raise DumeError(f"domain {domain!r} gave no tokens for the DUME statistics")
    return counted


def collect_statistics(expert_dirs, domains, docs, tokenizer, *, num_dume_tokens: int | None, max_len: int,
                       batch_size: int, device: str = "cpu", dtype=None, model_fingerprint: str | None = None,
                       data_source: str = "", extra_meta: dict | None = None, max_batches: int | None = None,
                       log=print):
    """The ridge statistics of every domain -- the one collector every recipe uses.

    Domain i's documents (`docs[domains[i]]`, any iterable of texts, read once) go through
    the oracle of expert i (`merge.build_oracle_model`: averaged shared weights + that
    expert's MLPs), cut into `document_batches(max_len, batch_size)` (at most
    `max_batches`). The shared weights are averaged once for all domains. Returns
    (RidgeStats, {domain: tokens counted per layer})."""
    from .data import document_batches
    from .memory import release_memory
    from .merge import build_oracle_model, shared_state_dict
    from .ridge import RidgeStats

    dirs = list(expert_dirs)
    if len(dirs) != len(domains):
        raise DumeError(f"{len(dirs)} experts for {len(domains)} domains")
    shared = shared_state_dict(dirs)
    stats = None
    counts = {}
    for i, d in enumerate(domains):
        model = build_oracle_model(dirs, i, shared=shared, dtype=dtype).to(device)
        if stats is None:
            cfg = model.config
            stats = RidgeStats(cfg.num_hidden_layers, cfg.hidden_size, list(domains),
                               model_fingerprint=model_fingerprint, num_dume_tokens=num_dume_tokens,
                               data_source=data_source,
                               extra_meta={**(extra_meta or {}), "experts": [str(e) for e in dirs]}, device=device)
        counts[d] = collect_domain(model, stats, d, document_batches(docs[d], tokenizer, max_len, batch_size),
                                   num_dume_tokens, max_batches)
        log(f"statistics {d}: {counts[d]} tokens per layer")
        del model
        release_memory()
    del shared
    release_memory()
    return stats, counts


def collect_for(kind: str, expert_dirs, domains, docs, tokenizer, *, moe_dir=None, lam: float = 0.01,
                temperature: float = 1.0, relative_lambda: bool = False, k: int = 1, **common):
    """The statistics a strategy's `statistics` kind names (dume.strategies):

    - "dume": one pass through the oracles (`collect_statistics`, the paper's Eq. 7);
    - "loss_aware": the same A, targets from the experts' token losses (`dume.loss_targets`);
    - "sequential": layer by layer through the MoE at `moe_dir` with the earlier layers
      routed by their solved gates (`dume.sequential_stats`; needs λ, T, k).
    `common` is what every collector takes (num_dume_tokens, max_len, batch_size, device,
    dtype, model_fingerprint, data_source, extra_meta, max_batches, log)."""
    if kind == "dume":
        return collect_statistics(expert_dirs, domains, docs, tokenizer, **common)
    if kind == "loss_aware":
        from .loss_targets import collect_loss_aware_statistics

        return collect_loss_aware_statistics(expert_dirs, domains, docs, tokenizer, **common)
    if kind == "sequential":
        from .sequential_stats import collect_sequential_statistics

        if moe_dir is None:
            raise DumeError("layer-sequential statistics need the MoE (moe_dir)")
        return collect_sequential_statistics(moe_dir, domains, docs, tokenizer, lam=lam, temperature=temperature,
                                             relative_lambda=relative_lambda, k=k, **common)
    raise DumeError(f"unknown statistics kind {kind!r}: dume, loss_aware or sequential")
