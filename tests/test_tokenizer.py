from dume.text.tokenizer import load_tokenizer
from tests.helpers import tiny_texts, tiny_tokenizer


def test_round_trip_and_save_load(tmp_path):
    tok = tiny_tokenizer()
    texts = tiny_texts(20, seed=5) + ["def f(x):\n    return x ** 2  # ünïcödé ✓", "  leading spaces\ttab"]
    for t in texts:
        ids = tok(t)["input_ids"]
        assert tok.decode(ids) == t
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.eos_token_id is not None and again.pad_token_id is not None
    for t in texts:
        assert again(t)["input_ids"] == tok(t)["input_ids"]
