"""Loss-aware ridge targets: route each token to the expert that predicts it best.

DUME regresses the router onto the one-hot of the token's *domain* (paper Eq. 4). On overlapping topics (math
text the physics expert predicts as well as the math expert) that asks the router to separate tokens no expert
cares to separate. Here the target of token t is how well each expert predicts the next token:

    y_t = softmax(-loss_t / tau)        loss_t[e] = next-token loss of oracle e at t

oracle e being what the MoE becomes wherever the router picks e. The closed form is unchanged -- W = (A +
lambda I)^-1 X^T Y with the same A, only b = X^T Y changes -- so the result is still a stock checkpoint. Every
oracle reads each domain's text (D x D forward passes for the losses, then D for the features); nothing is
trained. A position with no next token (a document's last real token) keeps DUME's one-hot target, so with
losses that single out the own expert this is exactly DUME (`tests/test_routers_study.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dume.errors import DumeError


@torch.no_grad()
def token_losses(model, batches) -> list[torch.Tensor]:
    """Per batch, [B, T] float32: the next-token loss at each position; NaN where there is no next real token
    (the last real token, padding)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()
        loss = torch.full(ids.shape, float("nan"), device=device)
        loss[:, :-1] = torch.where(valid, ce, float("nan"))
        out.append(loss.cpu())
    return out


def soft_targets(losses: torch.Tensor, domain_index: int, tau: float) -> torch.Tensor:
    """losses [D, B, T] (NaN = no next token) -> targets [B, T, D]: softmax(-loss/tau) over the experts, and
    the one-hot of `domain_index` where the losses are NaN."""
    if not (math.isfinite(tau) and tau > 0):
        raise DumeError(f"target temperature must be positive and finite, got {tau!r}")
    D = losses.shape[0]
    y = torch.softmax(-losses.permute(1, 2, 0).double() / tau, dim=-1)
    missing = torch.isnan(losses).any(dim=0)
    onehot = F.one_hot(torch.tensor(domain_index), D).double()
    return torch.where(missing.unsqueeze(-1), onehot, y)


def collect_loss_aware_statistics(expert_dirs, domains, docs, tokenizer, *, num_dume_tokens: int | None,
                                  max_len: int, batch_size: int, tau: float = 1.0, device: str = "cpu", dtype=None,
                                  model_fingerprint: str | None = None, data_source: str = "",
                                  extra_meta: dict | None = None, max_batches: int | None = None, log=print):
    """RidgeStats whose `s` holds X^T Y with loss-aware targets (A and n as DUME's): `stats.solve` then gives
    the loss-aware router. Returns (stats, {domain: tokens})."""
    from dume.moe.merge import build_oracle_model, shared_state_dict
    from dume.runtime.memory import release_memory
    from dume.stats.capture import MLPInputCapture, token_mask
    from dume.stats.ridge import RidgeStats
    from dume.text.batches import document_batches

    dirs, domains = list(expert_dirs), list(domains)
    if len(dirs) != len(domains):
        raise DumeError(f"{len(dirs)} experts for {len(domains)} domains")
    batches = {}
    for d in domains:
        batches[d] = list(document_batches(docs[d], tokenizer, max_len, batch_size))[:max_batches]
        if not batches[d]:
            raise DumeError(f"domain {d!r} has no documents for the statistics")
    shared = shared_state_dict(dirs)
    losses = {d: [] for d in domains}  # domain -> per expert: per batch [B, T]
    for e in range(len(dirs)):
        model = build_oracle_model(dirs, e, shared=shared, dtype=dtype).to(device)
        for d in domains:
            losses[d].append(token_losses(model, tqdm(batches[d], desc=f"losses of expert {e} on {d}", leave=False)))
        del model
        release_memory()
    stats, counts = None, {}
    for j, d in enumerate(domains):
        model = build_oracle_model(dirs, j, shared=shared, dtype=dtype).to(device).eval()
        if stats is None:
            cfg = model.config
            stats = RidgeStats(cfg.num_hidden_layers, cfg.hidden_size, domains, model_fingerprint=model_fingerprint,
                               num_dume_tokens=num_dume_tokens, data_source=data_source,
                               extra_meta={**(extra_meta or {}), "experts": [str(p) for p in dirs],
                                           "targets": "loss-aware", "target_temperature": tau}, device=device)
        counts[d] = 0
        with MLPInputCapture(model) as capture, torch.no_grad():
            for i, (ids, mask) in enumerate(tqdm(batches[d], desc=f"features {d}", leave=False)):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
                keep = token_mask(mask, num_dume_tokens)
                y = soft_targets(torch.stack([losses[d][e][i] for e in range(len(dirs))]), j, tau)
                for layer, feats in enumerate(capture.features):
                    stats.update(layer, d, feats, keep, targets=y)
                counts[d] += int(keep.sum())
        if counts[d] == 0:
            raise DumeError(f"domain {d!r} gave no tokens for the statistics")
        log(f"loss-aware statistics {d}: {counts[d]} tokens per layer")
        del model
        release_memory()
    return stats, counts
