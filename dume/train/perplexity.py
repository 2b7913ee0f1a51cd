"""Perplexity, the CLM metric: exp of the mean next-token NLL over every real target token of the test blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dume.errors import DumeError


def _target_nll(logits, input_ids, attention_mask):
    """(NLL of every next token [B, L-1] in float32, which of them count). A target counts when it and the token
    before it are real tokens (mask 1); padding never counts."""
    targets = input_ids[:, 1:]
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return nll.view_as(targets), valid


def token_nll(model, input_ids, attention_mask) -> tuple[float, int]:
    """Summed NLL (float64) and count of predicted tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    nll, valid = _target_nll(logits, input_ids, attention_mask)
    return float(nll[valid].double().sum()), int(valid.sum())


def row_nll(logits, input_ids, attention_mask):
    """Per row: summed NLL (float64) and count of predicted tokens, from logits already computed."""
    nll, valid = _target_nll(logits, input_ids, attention_mask)
    return torch.where(valid, nll, 0).double().sum(dim=1), valid.sum(dim=1)


def summed_nll(model, input_ids, attention_mask, batch_size: int, desc: str | None = None) -> tuple[float, int]:
    """`token_nll` over all blocks, `batch_size` at a time on the model's device (a bar with `desc`)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in tqdm(range(0, len(input_ids), batch_size), desc=desc, disable=desc is None, leave=False):
        nll, n = token_nll(model, input_ids[i:i + batch_size].to(device), attention_mask[i:i + batch_size].to(device))
        total += nll
        count += n
    return total, count


@torch.no_grad()
def perplexity(model, input_ids, attention_mask, batch_size: int = 16, desc: str | None = None) -> dict:
    model.eval()
    total, count = summed_nll(model, input_ids, attention_mask, batch_size, desc)
    if count == 0:
        raise DumeError("no tokens to evaluate")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def normalised_scores(perplexity: dict[str, float], reference: dict[str, float]) -> dict:
    """The paper's normalised score (docs/design.md §3): per domain 100·p̂_d/p_d for perplexity p_d and the
    domain's own expert's p̂_d, and their average; 100 is "as good as the specialist", above 100 is possible."""
    per_domain = {d: 100.0 * reference[d] / perplexity[d] for d in reference}
    return {"per_domain": per_domain, "average": sum(per_domain.values()) / len(per_domain)}


def gap_closed(score: float, averaging: float, target: float) -> float:
    """The share (%) of the distance from model averaging's score to `target`'s (the oracle's, or 100 = each
    domain's own expert) that `score` covers: 0 = no better than averaging, 100 = all the way."""
    if target <= averaging:
        raise DumeError(f"the reference ({target:.2f}) does not beat model averaging ({averaging:.2f}): no gap to "
                        "close")
    return 100.0 * (score - averaging) / (target - averaging)
