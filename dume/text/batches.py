"""Texts to token batches: packed training blocks and per-document batches for the statistics."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from dume.checks import positive_int
from dume.errors import DumeError


def _special_ids(tokenizer) -> tuple[int | None, int, int]:
    """(bos or None, eos, pad); pad falls back to eos, which the attention mask hides."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DumeError("the tokenizer has no eos token: documents need a separator")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return tokenizer.bos_token_id, eos, pad


def _token_ids(docs: Sequence[str], tokenizer, batch: int = 1000) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens (added here, explicitly)."""
    for i in range(0, len(docs), batch):
        yield from tokenizer(list(docs[i:i + batch]), add_special_tokens=False)["input_ids"]


def right_pad(rows: Sequence[Sequence[int]], width: int, pad: int):
    """``(input_ids, attention_mask)``, both [len(rows), width] int64: each row's ids, then `pad` (mask 0)."""
    import torch

    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    return ids, mask


def pack_documents(docs: Sequence[str], tokenizer, seq_len: int):
    """Documents as one token stream cut into blocks: ``(input_ids, attention_mask)``, both ``[N, seq_len]``.

    The stream is ``[bos] doc1 [eos] [bos] doc2 [eos] ...`` (no bos when the tokenizer has none), so blocks carry
    whole context windows and the model learns where documents end. The remainder shorter than a block is
    dropped, except when the stream is shorter than one block: then it is one right-padded block (mask 0 on the
    padding), so that a tiny split still gives something to evaluate. Callers turn the mask into ignored labels.
    """
    import numpy as np
    import torch

    positive_int("seq_len", seq_len)
    bos, eos, pad = _special_ids(tokenizer)
    head, tail = ([bos] if bos is not None else []), [eos]
    parts = [np.asarray(head + ids + tail, dtype=np.int64) for ids in _token_ids(docs, tokenizer) if ids]
    if not parts:
        raise DumeError("no tokens to pack: the documents are empty")
    stream = np.concatenate(parts)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        return right_pad([stream], seq_len, pad)
    ids = stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    return torch.from_numpy(ids.copy()), torch.ones((n_blocks, seq_len), dtype=torch.long)


def document_batches(docs: Iterable[str], tokenizer, max_len: int, batch_size: int):
    """Batches ``(input_ids, attention_mask)`` with one document per row, for DUME's statistics.

    Each row is ``[bos] + the document's first tokens``, truncated to `max_len` tokens in all, right-padded (pad
    id, else eos) to the longest row of its batch, with mask 0 on the padding. No eos is appended: the statistics
    are about the document's own tokens. Documents that give no token at all (and no bos) are skipped. Reads
    `docs` (any iterable, e.g. `iter_documents`) and tokenizes lazily, one batch at a time.
    """
    import itertools

    positive_int("max_len", max_len)
    positive_int("batch_size", batch_size)
    bos, _, pad = _special_ids(tokenizer)
    head = [bos] if bos is not None else []
    docs = iter(docs)
    while True:
        chunk = list(itertools.islice(docs, batch_size))
        if not chunk:
            return
        rows = [(head + ids)[:max_len] for ids in _token_ids(chunk, tokenizer, batch_size)]
        rows = [r for r in rows if r]
        if not rows:
            continue
        yield right_pad(rows, max(len(r) for r in rows), pad)
