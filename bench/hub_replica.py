"""Local stand-ins for what the paper's path downloads, in the hub's own layouts: the
OpenWebText parquet shards and M2D2 folders `--source hub --data-dir` reads, a tokenizer
with Llama-3's vocabulary size, and the four reasoning tasks' files as `--data-dir`
takes them. Used by the README-commands test and the GPU acceptance run (no hub here)."""

from __future__ import annotations

import json
from pathlib import Path

M2D2_CONFIGS = ("cs_l1", "math_l1", "physics_l1", "History_and_events", "Philosophy_and_thinking")


def write_hub_replica(root: Path, short_train: tuple[str, ...] = ()) -> list[str]:
    """OpenWebText (2 parquet shards of 400 pages) and the five M2D2 configs under `root`;
    the configs in `short_train` get 8 training lines (shorter than a step budget). Returns
    every text written, for training a tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = {c: f"{c.lower()} alpha beta gamma delta".split() for c in M2D2_CONFIGS}
    owt = Path(root) / "vietgpt" / "openwebtext_en" / "data"
    owt.mkdir(parents=True)
    texts = []
    for shard in range(2):
        docs = [f"web page {shard} {i} " + " ".join(words[M2D2_CONFIGS[i % 5]] * 3) for i in range(400)]
        pq.write_table(pa.table({"text": docs}), owt / f"train-{shard:05d}-of-00002.parquet")
        texts += docs
    for c in M2D2_CONFIGS:
        d = Path(root) / "machelreid" / "m2d2" / c
        d.mkdir(parents=True)
        for split, n in (("train", 8 if c in short_train else 120), ("valid", 20), ("test", 20)):
            (d / f"{split}.txt").write_text("\n".join(f"{split} {i} " + " ".join(words[c] * 4) for i in range(n)) + "\n")
    return texts


def large_vocab_tokenizer(path: Path, texts, vocab_size: int | None = None) -> Path:
    """A small byte-level BPE saved with Llama-3's special-token names; with `vocab_size`,
    its vocabulary padded with unreachable entries to that size (Llama-3's 128 256: what
    the embedding and lm_head cost), tokenizing as fast as the small one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    if vocab_size:
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), vocab_size)})
        tok = Tokenizer.from_str(json.dumps(spec))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1]).save_pretrained(path)
    return Path(path)


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_task_data(root: Path) -> Path:
    """A few documents of each reasoning task in its format (gsm8k, m_arc de/fr, HumanEval, IFEval)."""
    root = Path(root)
    gsm = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            "answer": f"He has {a}+{b}={a + b} apples.\n#### {a + b}"}
           for a, b in [(2, 3), (4, 5), (1, 1), (7, 2), (3, 3), (6, 1), (2, 2), (5, 4), (8, 1), (9, 3)]]
    _jsonl(root / "gsm8k" / "train.jsonl", gsm[:2])
    _jsonl(root / "gsm8k" / "test.jsonl", gsm[2:])
    arc = [{"id": f"q{i}", "instruction": f"Which is a {w}?", "option_a": "the cat", "option_b": "the atom",
            "option_c": "a war", "option_d": "a king", "option_e": "", "answer": "ABCD"[i]}
           for i, w in enumerate(["animal", "particle", "conflict"])]
    for lang in ("de", "fr"):
        _jsonl(root / "m_arc" / lang / "train.jsonl", arc)
        _jsonl(root / "m_arc" / lang / "test.jsonl", arc)
    _jsonl(root / "humaneval" / "test.jsonl", [{
        "task_id": "Local/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
        "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}])
    _jsonl(root / "ifeval" / "train.jsonl", [{"key": 1, "prompt": "Write a poem. Do not use any commas.",
                                             "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}])
    return root
