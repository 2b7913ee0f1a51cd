import json
import shutil
from pathlib import Path

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


# Class names transformers 4.x's AutoTokenizer resolves for a tokenizer.json-only checkpoint (its generic fast class);
# written out rather than imported: this venv has transformers 5, and 4.x is what must read the files.
KNOWN_TO_4X = {"PreTrainedTokenizerFast"}


def _tokenizer_class(path) -> str:
    return json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"]


def test_written_tokenizers_name_a_class_transformers_4_knows(tmp_path):
    """transformers 5 saves `TokenizersBackend`, which 4.x readers (llama.cpp's converter) cannot load. Every way we
    write tokenizer files -- the run's tokenizer, a checkpoint with its tokenizer, a MoE / oracle / average copying an
    expert's -- names `PreTrainedTokenizerFast` instead, and AutoTokenizer still gives the same ids."""
    from transformers import AutoTokenizer

    from dume.checkpoint.save import save_pretrained_atomic
    from dume.moe.edit import extend_moe
    from dume.moe.merge import average_experts, moerge_experts, write_oracle
    from dume.text.tokenizer import save_run_tokenizer
    from tests.helpers import tiny_llama

    tok = tiny_tokenizer()
    plain = tmp_path / "plain"
    tok.save_pretrained(plain)  # what transformers itself writes
    experts = []
    for i in range(2):
        d = tmp_path / f"e{i}"
        tiny_llama(seed=i).save_pretrained(d)
        tok.save_pretrained(d)  # the experts keep the 5.x-only name: the merges must fix their copies
        experts.append(d)
    assert _tokenizer_class(experts[0]) not in KNOWN_TO_4X  # else this test checks nothing
    save_run_tokenizer(tok, tmp_path / "run_tok", made_from="test")
    save_pretrained_atomic(tiny_llama(), tmp_path / "ckpt", tok)
    moe = moerge_experts(experts, tmp_path / "moe")
    old_moe = tmp_path / "old_moe"  # a MoE written before this fix: editing it fixes the copy, not the input
    shutil.copytree(moe, old_moe)
    shutil.copy2(plain / "tokenizer_config.json", old_moe / "tokenizer_config.json")
    written = [tmp_path / "run_tok", tmp_path / "ckpt", moe, write_oracle(experts, 1, tmp_path / "oracle"),
               average_experts(experts, tmp_path / "avg"), extend_moe(old_moe, experts[:1], tmp_path / "moe3")]
    texts = tiny_texts(10, seed=3) + ["def f(x):\n    return x ** 2  # ünïcödé ✓"]
    for d in map(Path, written):
        assert _tokenizer_class(d) in KNOWN_TO_4X, d
        assert (d / "tokenizer.json").read_bytes() == (plain / "tokenizer.json").read_bytes(), d
        again = AutoTokenizer.from_pretrained(d)
        assert [again(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts], d
        assert (again.bos_token, again.eos_token, again.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
