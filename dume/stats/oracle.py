"""Collecting DUME's ridge statistics: one forward pass through each domain's oracle serves every layer (the
paper's Eq. 7; docs/design.md §2 says what counts). No gradients, no backward."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from dume.errors import DumeError
from dume.stats.capture import MLPInputCapture, right_padded, token_mask


@torch.no_grad()
def collect_domain(model, stats, domain: str, batches, num_dume_tokens: int | None = None,
                   max_batches: int | None = None, desc: str | None = None) -> int:
    """Add `domain`'s statistics from `batches` of (input_ids, attention_mask) into `stats`; returns the tokens
    counted per layer."""
    model.eval()
    device = next(model.parameters()).device
    counted = 0
    with MLPInputCapture(model) as capture:
        for i, (ids, mask) in enumerate(tqdm(batches, desc=desc or f"stats {domain}", leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            ids, mask = ids.to(device), mask.to(device)
            if num_dume_tokens is not None and right_padded(mask):
                # Causal attention: later positions cannot change earlier ones, so stop at the last that counts.
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

    Domain i's documents (`docs[domains[i]]`, any iterable of texts, read once) go through the oracle of expert i
    (`merge.build_oracle_model`), cut into `document_batches(max_len, batch_size)` (at most `max_batches`); the
    shared weights are averaged once for all domains. Returns (RidgeStats, {domain: tokens counted per layer})."""
    from dume.moe.merge import build_oracle_model, shared_state_dict
    from dume.runtime.memory import release_memory
    from dume.stats.ridge import RidgeStats
    from dume.text.batches import document_batches

    dirs = list(expert_dirs)
    if len(dirs) != len(domains):
        raise DumeError(f"{len(dirs)} experts for {len(domains)} domains")
    shared = shared_state_dict(dirs)
    stats = None
    counts = {}
    for i, d in enumerate(domains):
        start = time.perf_counter()
        model = build_oracle_model(dirs, i, shared=shared, dtype=dtype).to(device)
        built = time.perf_counter()
        if stats is None:
            cfg = model.config
            stats = RidgeStats(cfg.num_hidden_layers, cfg.hidden_size, list(domains),
                               model_fingerprint=model_fingerprint, num_dume_tokens=num_dume_tokens,
                               data_source=data_source,
                               extra_meta={**(extra_meta or {}), "experts": [str(e) for e in dirs]}, device=device)
        counts[d] = collect_domain(model, stats, d, document_batches(docs[d], tokenizer, max_len, batch_size),
                                   num_dume_tokens, max_batches)
        seconds = time.perf_counter() - built
        log(f"statistics {d}: {counts[d]} tokens per layer in {seconds:.1f} s ({counts[d] / max(seconds, 1e-9):.0f} "
            f"tokens/s; its oracle built in {built - start:.1f} s)")
        del model
        release_memory()
    del shared
    release_memory()
    return stats, counts


