"""Token files and the two window recipes, against hand computations on a tiny corpus.

A word-level tokenizer makes every id predictable: "<bos>"=0, "<eos>"=1, "<pad>"=2,
then the words in order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dume.errors import DumeError
from dume.clm.tokens import RECIPES, TokenWindows, prepare_tokens, token_dtype, tokens_needed

WORDS = "a b c d e f g h i j k l".split()
DOCS = ["a b c", "d e", "", "f g h i"]  # the empty document is skipped, as the original did
BOS, EOS, PAD = 0, 1, 2
ID = {w: i + 3 for i, w in enumerate(WORDS)}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUME_TOKEN_CACHE", str(tmp_path / "token_cache"))


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD, **ID}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def _prepare(tok, recipe, min_tokens=None, docs=DOCS):
    calls = {"n": 0}

    def docs_fn():
        calls["n"] += 1
        return iter(docs)

    tf = prepare_tokens(docs_fn, tok, RECIPES[recipe], {"test": "tiny", "docs": len(docs)}, min_tokens)
    return tf, calls


def test_original_recipe_equals_the_hand_computation(word_tokenizer):
    """BOS per document, no EOS; windows of L+1 tokens with stride L, so each window's L
    positions are all predicted and the next window starts at this one's last token."""
    tf, _ = _prepare(word_tokenizer, "original")
    stream = [BOS, *_ids("a b c"), BOS, *_ids("d e"), BOS, *_ids("f g h i")]
    assert tf.tokens().tolist() == stream and tf.complete
    L = 3
    w = TokenWindows(tf.tokens(), L, RECIPES["original"])
    assert len(w) == (len(stream) - 1) // L == 3
    ids, mask = w.tensors()
    assert ids.tolist() == [stream[0:4], stream[3:7], stream[6:10]]
    assert ids.tolist() == [[BOS, ID["a"], ID["b"], ID["c"]], [ID["c"], BOS, ID["d"], ID["e"]],
                            [ID["e"], BOS, ID["f"], ID["g"]]]
    assert mask.all()
    # Labels: Hugging Face shifts inside the model, so window i predicts stream[iL+1 .. iL+L]:
    # L targets per window, exactly the original's `label = buffer[1:L+1]`.
    from dume.train.perplexity import token_nll

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 16)})()

    nll, count = token_nll(Uniform(), ids, mask)
    assert count == len(w) * L
    assert nll == pytest.approx(count * np.log(16))


def test_eos_recipe_equals_pack_documents(word_tokenizer):
    """The embedded default's recipe is unchanged: [BOS] doc [EOS] ..., disjoint L-blocks."""
    from dume.text.batches import pack_documents

    tf, _ = _prepare(word_tokenizer, "eos")
    stream = [BOS, *_ids("a b c"), EOS, BOS, *_ids("d e"), EOS, BOS, *_ids("f g h i"), EOS]
    assert tf.tokens().tolist() == stream
    for L in (2, 3, 5, 15, 40):
        w = TokenWindows(tf.tokens(), L, RECIPES["eos"], pad_id=PAD)
        ids, mask = w.tensors()
        ref_ids, ref_mask = pack_documents([d for d in DOCS if d], word_tokenizer, L)
        assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask), L
    assert TokenWindows(tf.tokens(), 40, RECIPES["eos"], pad_id=PAD).tensors()[1].sum() == len(stream)


def test_budget_reads_only_what_it_needs_and_is_a_prefix(word_tokenizer):
    docs = [" ".join(WORDS[i % 12] for i in range(k, k + 5)) for k in range(200)]
    L = 4
    need = tokens_needed(3, L, RECIPES["original"])
    part, calls = _prepare(word_tokenizer, "original", need, docs)
    part_tokens = part.tokens().tolist()
    # Stopped after the document that crossed the budget (whole documents only).
    assert not part.complete and need <= part.n_tokens < need + 6
    full, _ = _prepare(word_tokenizer, "original", None, docs)  # more is asked: tokenized again, in full
    assert full.complete and full.n_tokens == 200 * 6
    assert part_tokens == full.tokens().tolist()[: len(part_tokens)]  # the budgeted file was a prefix
    # Same key: the complete file made first serves the budget without re-tokenizing.
    again, calls2 = _prepare(word_tokenizer, "original", need, docs)
    assert calls2["n"] == 0 and again.complete
    w = TokenWindows(part.tokens(), L, RECIPES["original"], max_windows=3)
    assert len(w) == 3 and torch.equal(w.tensors()[0], TokenWindows(full.tokens(), L, RECIPES["original"]).tensors(
        range(3))[0])


def test_a_smaller_file_is_extended_when_more_is_needed(tmp_path, word_tokenizer):
    docs = [" ".join(WORDS[i % 12] for i in range(k, k + 5)) for k in range(50)]
    small, _ = _prepare(word_tokenizer, "original", 10, docs)
    assert small.n_tokens < 20
    big, calls = _prepare(word_tokenizer, "original", 100, docs)
    assert calls["n"] == 1 and big.n_tokens >= 100
    assert big.tokens().tolist()[: small.n_tokens] == small.tokens().tolist()


def test_dtype_follows_the_vocabulary():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(128256) == np.int32


def test_large_vocabulary_ids_round_trip(tmp_path, monkeypatch):
    """Ids above 65535 (Llama-3's vocabulary) survive the file."""
    from dume.clm.tokens import RECIPES as R

    class Big:
        bos_token_id, eos_token_id = 128000, 128001

        def __len__(self):
            return 128256

        def get_vocab(self):
            return {"x": 0}

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[100000 + len(t), 127999] for t in texts]}

    tf = prepare_tokens(lambda: iter(["ab", "abc"]), Big(), R["original"], {"big": 1})
    assert tf.tokens().tolist() == [128000, 100002, 127999, 128000, 100003, 127999]
    assert tf.meta["dtype"] == "int32"


def test_empty_corpus_gives_no_windows(word_tokenizer):
    tf, _ = _prepare(word_tokenizer, "original", None, ["", ""])
    assert tf.n_tokens == 0
    with pytest.raises(DumeError, match="no tokens"):
        TokenWindows(tf.tokens(), 4, RECIPES["original"])
