"""Perplexity, the CLM metric: exp of the mean next-token NLL over every real target token of the test blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dume.errors import DumeError


def token_nll(model, input_ids, attention_mask) -> tuple[float, int]:
    """Summed NLL (float64) and count of predicted tokens. A target counts when it and the
    token before it are real tokens (mask 1); padding never counts."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    targets = input_ids[:, 1:]
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    nll = nll.view_as(targets)[valid]
    return float(nll.double().sum()), int(valid.sum())


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
