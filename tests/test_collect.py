"""DUME's statistics collection: the captured router inputs are the MLP inputs, the
statistics are XᵀX and Σx over exactly the counted tokens, and padding never leaks."""

from __future__ import annotations

import pytest
import torch

from dume.stats.capture import MLPInputCapture, token_mask
from dume.stats.oracle import collect_domain
from dume.errors import DumeError
from dume.stats.ridge import RidgeStats
from tests.fixtures import datasets_cache, single_thread  # noqa: F401  (pytest fixtures)
from tests.helpers import tiny_llama, tiny_texts, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTHS = (10, 6, 3)  # a right-padded batch of three documents of different lengths
VOCAB = 300
MAX_LEN = 32  # document_batches truncation


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, seed=3).eval()  # hidden 32, 2 layers, grouped-query attention


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    T = max(LENGTHS)
    ids = torch.full((len(LENGTHS), T), 1, dtype=torch.long)  # pad id 1
    mask = torch.zeros((len(LENGTHS), T), dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


@torch.no_grad()
def mlp_inputs_by_hand(model, ids, mask) -> list[torch.Tensor]:
    """Each layer's MLP input, computed layer by layer: embeddings, rotary embeddings,
    then per layer input norm -> attention (causal, padding keys masked) -> residual ->
    post_attention_layernorm (= the MLP input) -> MLP -> residual."""
    inner = model.model
    B, T = ids.shape
    h = inner.embed_tokens(ids)
    position_ids = torch.arange(T).unsqueeze(0).expand(B, T)
    cos_sin = inner.rotary_emb(h, position_ids)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool)) & mask.bool()[:, None, :]  # [B, q, k]
    additive = torch.zeros(B, 1, T, T, dtype=h.dtype).masked_fill(~allowed[:, None], torch.finfo(h.dtype).min)
    out = []
    for layer in inner.layers:
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=cos_sin,
                                  attention_mask=additive)
        h = h + attn
        x = layer.post_attention_layernorm(h)
        out.append(x.clone())
        h = h + layer.mlp(x)
    return out


def stats_by_hand(features, mask, num_dume_tokens=None):
    """(A [L, H, H], s [L, H], n) in float64 over the first `num_dume_tokens` real tokens of each row."""
    keep = []
    for row in range(mask.shape[0]):
        n_real = int(mask[row].sum())
        n = n_real if num_dume_tokens is None else min(n_real, num_dume_tokens)
        keep += [(row, t) for t in range(n)]
    A = torch.stack([sum(f[r, t].double().outer(f[r, t].double()) for r, t in keep) for f in features])
    s = torch.stack([sum(f[r, t].double() for r, t in keep) for f in features])
    return A, s, len(keep)


@torch.no_grad()
def test_capture_equals_mlp_inputs_by_hand(model, batch):
    ids, mask = batch
    expected = mlp_inputs_by_hand(model, ids, mask)
    with MLPInputCapture(model) as capture:
        model(input_ids=ids, attention_mask=mask)
        captured = list(capture.features)
    assert len(captured) == model.config.num_hidden_layers
    real = mask.bool()
    for got, want in zip(captured, expected):
        assert got.shape == want.shape == (*ids.shape, model.config.hidden_size)
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    # The inputs of different layers differ (a hook on the wrong module would repeat one).
    assert not torch.allclose(captured[0][real], captured[1][real])
    # The hooks are gone after the context.
    assert all(not layer.mlp._forward_pre_hooks for layer in model.model.layers)


@pytest.mark.parametrize("num_dume_tokens", [None, 4, 100])
def test_collected_statistics_are_xtx_of_the_counted_tokens(model, batch, num_dume_tokens):
    ids, mask = batch
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    A, s, n = stats_by_hand(mlp_inputs_by_hand(model, ids, mask), mask, num_dume_tokens)
    stats = RidgeStats(L, H, ["other", "d"], num_dume_tokens=num_dume_tokens)
    counted = collect_domain(model, stats, "d", [(ids, mask)], num_dume_tokens)
    assert counted == n == sum(min(k, num_dume_tokens or k) for k in LENGTHS)
    assert stats.n[:, 1].tolist() == [n] * L
    torch.testing.assert_close(stats.A[:, 1], A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.s[:, 1], s, rtol=1e-5, atol=1e-5)
    assert stats.A[:, 0].abs().sum() == 0 and stats.n[:, 0].sum() == 0  # other domains untouched


def test_token_mask_counts_first_real_tokens():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])
    assert token_mask(mask, None).tolist() == mask.bool().tolist()
    assert token_mask(mask, 2).long().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]
    with pytest.raises(DumeError):
        token_mask(mask, 0)


def _docs_stats(model, tokenizer, docs, batch_size, num_dume_tokens):
    from dume.text.batches import document_batches

    stats = RidgeStats(model.config.num_hidden_layers, model.config.hidden_size, ["d"],
                       num_dume_tokens=num_dume_tokens)
    collect_domain(model, stats, "d", document_batches(docs, tokenizer, MAX_LEN, batch_size), num_dume_tokens)
    return stats


@pytest.mark.parametrize("num_dume_tokens", [None, 5])
def test_statistics_do_not_depend_on_batch_composition(model, num_dume_tokens):
    tokenizer = tiny_tokenizer(VOCAB)
    docs = tiny_texts(13, seed=5)  # 5 to 30 words: rows of very different lengths, some truncated
    lengths = [1 + len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]  # bos + tokens
    assert min(lengths) < MAX_LEN / 2 and max(lengths) > MAX_LEN
    one = _docs_stats(model, tokenizer, docs, 1, num_dume_tokens)   # no padding at all
    four = _docs_stats(model, tokenizer, docs, 4, num_dume_tokens)  # padded to the longest of four
    assert torch.equal(one.n, four.n)
    scale = float(one.A.abs().max())
    torch.testing.assert_close(four.A, one.A, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(four.s, one.s, rtol=1e-5, atol=1e-6 * float(one.s.abs().max()))


def test_domain_without_tokens_is_an_error(model, batch):
    ids, mask = batch
    stats = RidgeStats(model.config.num_hidden_layers, model.config.hidden_size, ["d"])
    with pytest.raises(DumeError, match="'d'.*no tokens"):
        collect_domain(model, stats, "d", [])
    with pytest.raises(DumeError, match="no tokens"):
        collect_domain(model, stats, "d", [(ids, torch.zeros_like(mask))])
    assert stats.n.sum() == 0 and stats.A.abs().sum() == 0
    with pytest.raises(DumeError, match="'d'.*no tokens"):
        stats.solve(0.01)  # and the solve refuses the empty domain rather than dividing by zero


def test_domain_whose_documents_give_no_tokens(model):
    """A tokenizer without bos and documents that tokenize to nothing: no batch at all."""
    from dume.text.batches import document_batches

    class NoBos:
        bos_token_id, eos_token_id, pad_token_id = None, 0, 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[] for _ in texts]}

    batches = document_batches(["", "  ", "x"], NoBos(), max_len=8, batch_size=2)
    stats = RidgeStats(model.config.num_hidden_layers, model.config.hidden_size, ["d"])
    with pytest.raises(DumeError, match="'d'.*no tokens"):
        collect_domain(model, stats, "d", batches)
