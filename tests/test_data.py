"""dume.corpora.documents: the offline corpus's splits, the local and hub sources on local files, and
the two tokenization helpers. Offline and fast: the hub source is exercised on files laid
out like the hub repos, never on the network."""

from __future__ import annotations

import json
import tarfile

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dume.corpora import documents as data, offline, source as corpus_source
from dume.text import batches as text_batches
from dume.errors import DumeError

WIKI_DOMAINS = ("math", "physics", "history", "philosophy")


# ---- helpers ------------------------------------------------------------------------------


def keys(domain, split):
    return [k for k, _ in offline._offline_records(domain, split)]


def code_files(domain, split):
    return {k for k in keys(domain, split) if k.startswith("stdlib:")}


def chars(domain):
    return sum(len(t) for s in data.SPLITS for t in data.load_documents(domain, s))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (and M2D2 extractions) inside the test's tmp dir."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["the cat sat on the mat", "a dog ate the bone", "def f(x): return x + 1",
              "import os", "print('hello world')"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


# ---- offline source --------------------------------------------------------------------------


def test_offline_splits_are_deterministic():
    first = {(d, s): data.load_documents(d, s) for d in (*corpus_source.EXPERT_DOMAINS, "pretrain") for s in data.SPLITS}
    offline._clear_caches()
    for (d, s), docs in first.items():
        assert data.load_documents(d, s) == docs, (d, s)


def test_offline_every_domain_and_split_is_nonempty():
    assert data.available_domains("offline") == corpus_source.EXPERT_DOMAINS
    for d in (*corpus_source.EXPERT_DOMAINS, "pretrain"):
        for s in data.SPLITS:
            docs = data.load_documents(d, s)
            assert docs and all(isinstance(x, str) and x.strip() for x in docs), (d, s)


def test_offline_splits_are_disjoint_and_whole_files_stay_in_one_split():
    for d in (*corpus_source.EXPERT_DOMAINS, "pretrain"):
        per_split = {s: set(keys(d, s)) for s in data.SPLITS}
        docs = {s: set(data.load_documents(d, s)) for s in data.SPLITS}
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            assert not per_split[a] & per_split[b], (d, a, b)  # titles / stdlib files
            assert not docs[a] & docs[b], (d, a, b)


def test_offline_wiki_topics_map_to_domains():
    by_title = {t: dom for t, dom, _ in offline._wiki_articles()}
    for d in WIKI_DOMAINS:
        assert all(by_title[k] == d for s in data.SPLITS for k in keys(d, s))
    pretrain_titles = [k for s in data.SPLITS for k in keys("pretrain", s) if not k.startswith("stdlib:")]
    assert pretrain_titles and all(by_title[k] == "pretrain" for k in pretrain_titles)
    # every article with an extract is used exactly once
    used = [k for d in (*WIKI_DOMAINS, "pretrain") for s in data.SPLITS for k in keys(d, s)
            if not k.startswith("stdlib:")]
    assert len(used) == len(set(used)) == len(offline._wiki_articles())


def test_split_fractions_are_about_80_10_10():
    n = {s: sum(len(keys(d, s)) for d in WIKI_DOMAINS + ("pretrain",)) for s in data.SPLITS}
    total = sum(n.values())
    assert 0.77 < n["train"] / total < 0.83
    assert 0.08 < n["validation"] / total < 0.12
    assert 0.08 < n["test"] / total < 0.12


def test_code_domain_is_capped_near_physics():
    ratio = chars("code") / chars("physics")
    assert 0.5 <= ratio <= 1.5, ratio
    code = [k for s in data.SPLITS for k in keys("code", s)]
    assert all(k.startswith("stdlib:") for k in code)
    assert not any("/test/" in k or "/tests/" in k or k.startswith("stdlib:test/") for k in code)


def test_pretraining_code_slice_is_disjoint_from_the_code_domain():
    code = set().union(*(code_files("code", s) for s in data.SPLITS))
    pre = set().union(*(code_files("pretrain", s) for s in data.SPLITS))
    assert code and pre and not code & pre
    pre_code_chars = sum(len(t) for s in data.SPLITS for k, t in offline._offline_records("pretrain", s)
                         if k.startswith("stdlib:"))
    assert 0.05 < pre_code_chars / chars("pretrain") < 0.15


def test_chunk_code_cuts_at_blank_lines_and_hard_cuts_giant_blocks():
    src = "import os\n\n\ndef f():\n    return 1\n\n" + "x = 1\n" * 600
    chunks = offline.chunk_code(src, max_chars=1500, target_chars=500)
    assert all(len(c) <= 1500 for c in chunks)
    assert chunks[0].startswith("import os\n\ndef f():\n    return 1")
    assert "".join(c.replace("\n", "") for c in chunks) == src.replace("\n", "")
    assert offline.chunk_code("a" * 4000, max_chars=1500) == ["a" * 1500, "a" * 1500, "a" * 1000]


def test_hash_split_is_stable():
    # sha256-based, so these hold on every machine and Python process
    assert [corpus_source.hash_split(k) for k in ("Albert Einstein", "os.py", "x")] == [
        corpus_source.hash_split("Albert Einstein"), corpus_source.hash_split("os.py"), corpus_source.hash_split("x")]
    counts = {s: 0 for s in data.SPLITS}
    for i in range(5000):
        counts[corpus_source.hash_split(f"doc {i}")] += 1
    assert 3850 < counts["train"] < 4150 and 400 < counts["validation"] < 600


def test_max_docs_and_bad_arguments():
    assert len(data.load_documents("math", "train", max_docs=5)) == 5
    assert data.load_documents("math", "train", max_docs=5) == data.load_documents("math", "train")[:5]
    with pytest.raises(DumeError, match="unknown domain"):
        data.load_documents("biology", "train")
    with pytest.raises(DumeError, match="unknown split"):
        data.load_documents("math", "dev")
    with pytest.raises(DumeError, match="unknown data source"):
        data.load_documents("math", "train", "web")
    with pytest.raises(DumeError, match="max_docs"):
        data.load_documents("math", "train", max_docs=0)
    with pytest.raises(DumeError, match="data_dir"):
        data.load_documents("math", "train", "offline", data_dir="/tmp")


def test_corpus_summary_counts_match():
    summary = data.corpus_summary("offline")
    assert list(summary) == ["pretrain", *corpus_source.EXPERT_DOMAINS]
    assert summary["math"]["test"]["docs"] == len(data.load_documents("math", "test"))
    assert "| physics |" in data.format_summary(summary)


# ---- local source -------------------------------------------------------------------------------


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))


def write_parquet(path, texts):
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(path))


def test_local_source_round_trips_txt_jsonl_parquet(tmp_path, hf_cache):
    root = tmp_path / "corpus"
    root.mkdir()
    txt_docs = [f"Paragraph {i} about numbers.\nIt has two lines." for i in range(60)]
    (root / "math.txt").write_text("\n\n".join(txt_docs) + "\n")
    json_docs = [f"physics document {i}" for i in range(50)]
    write_jsonl(root / "physics.jsonl", json_docs)
    pq_docs = [f"history document {i}" for i in range(50)]
    write_parquet(root / "history.parquet", pq_docs)
    (root / "code").mkdir()
    (root / "code" / "train.txt").write_text("def a():\n    pass\n\nclass B:\n    x = 1\n")
    write_jsonl(root / "code" / "validation.jsonl", ["print(1)"])
    write_parquet(root / "code" / "test.parquet", ["import os", "import sys"])
    (root / "philosophy").mkdir()
    write_jsonl(root / "philosophy" / "part1.jsonl", [f"thought {i}" for i in range(30)])
    write_parquet(root / "philosophy" / "part2.parquet", [f"idea {i}" for i in range(30)])

    (root / "pretrain.txt").write_text("\n\n".join(f"general text {i}" for i in range(40)))

    assert data.available_domains("local", root) == ("code", "math", "physics", "history", "philosophy")
    for name, expected in (("math", txt_docs), ("physics", json_docs), ("history", pq_docs),
                           ("philosophy", [f"thought {i}" for i in range(30)] + [f"idea {i}" for i in range(30)])):
        splits = {s: data.load_documents(name, s, "local", data_dir=root) for s in data.SPLITS}
        assert sorted(sum(splits.values(), [])) == sorted(expected), name
        assert not set(splits["train"]) & (set(splits["validation"]) | set(splits["test"]))
        assert splits == {s: data.load_documents(name, s, "local", data_dir=root) for s in data.SPLITS}
    assert data.load_documents("code", "train", "local", data_dir=root) == ["def a():\n    pass", "class B:\n    x = 1"]
    assert data.load_documents("code", "validation", "local", data_dir=root) == ["print(1)"]
    assert data.load_documents("code", "test", "local", data_dir=root, max_docs=1) == ["import os"]
    assert len(data.load_documents("pretrain", "train", "local", data_dir=root)) > 20
    summary = data.corpus_summary("local", root)
    assert list(summary) == ["pretrain", "code", "math", "physics", "history", "philosophy"]
    assert summary["code"]["test"] == {"docs": 2, "chars": len("import os") + len("import sys")}
    assert sum(summary["math"][s]["docs"] for s in data.SPLITS) == len(txt_docs)


def test_local_source_errors(tmp_path, hf_cache):
    with pytest.raises(DumeError, match="needs a data dir"):
        data.load_documents("math", "train", "local")
    with pytest.raises(DumeError, match="does not exist"):
        data.load_documents("math", "train", "local", data_dir=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DumeError, match="holds no domain"):
        data.load_documents("math", "train", "local", data_dir=empty)
    with pytest.raises(DumeError, match="holds no domain"):
        data.available_domains("local", empty)
    (empty / "physics.txt").write_text("one document\n")
    with pytest.raises(DumeError, match="not found"):
        data.load_documents("math", "train", "local", data_dir=empty)
    (empty / "code").mkdir()
    (empty / "code" / "train.txt").write_text("x = 1\n")
    with pytest.raises(DumeError, match="has no documents"):
        data.load_documents("code", "test", "local", data_dir=empty)
    assert data.corpus_summary("local", empty)["code"]["test"] == {"docs": 0, "chars": 0}
    (empty / "code" / "extra.txt").write_text("y = 2\n")
    with pytest.raises(DumeError, match="files of no split"):
        data.load_documents("code", "train", "local", data_dir=empty)


# ---- hub source on a local mirror -----------------------------------------------------------------


def make_hub_mirror(root):
    owt = root / "vietgpt" / "openwebtext_en" / "data"
    owt.mkdir(parents=True)
    owt_docs = [f"web page number {i} with some text" for i in range(300)]
    write_parquet(owt / "train-00000-of-00001.parquet", owt_docs)
    m2d2 = root / "machelreid" / "m2d2"
    # math as the hub ships it: data/<config>.tar.gz holding <config>/{train,valid,test}.txt
    staging = root / "staging" / "math_l1"
    staging.mkdir(parents=True)
    lines = {"train": [f"theorem {i}" for i in range(20)], "valid": ["lemma a", "lemma b"], "test": ["proof x"]}
    for name, ls in lines.items():
        (staging / f"{name}.txt").write_text("\n".join(ls) + "\n")
    (m2d2 / "data").mkdir(parents=True)
    with tarfile.open(m2d2 / "data" / "math_l1.tar.gz", "w:gz") as tar:
        tar.add(staging, arcname="math_l1")
    # physics already extracted
    (m2d2 / "physics_l1").mkdir()
    for name in ("train", "valid", "test"):
        (m2d2 / "physics_l1" / f"{name}.txt").write_text(f"{name} physics line one\n{name} physics line two\n")
    return owt_docs, lines


def test_hub_source_on_local_files_in_the_hub_layout(tmp_path, hf_cache):
    owt_docs, lines = make_hub_mirror(tmp_path / "hub")
    root = tmp_path / "hub"
    pre = {s: data.load_documents("pretrain", s, "hub", data_dir=root) for s in data.SPLITS}
    assert sorted(sum(pre.values(), [])) == sorted(owt_docs)  # OWT has train only: split as the original
    # The original's split: document i went to tokenizer worker i % 32; workers 0-20 train,
    # 21-24 validation, 25-31 test.
    assert pre["train"] == [d for i, d in enumerate(owt_docs) if i % 32 <= 20]
    assert pre["validation"] == [d for i, d in enumerate(owt_docs) if 21 <= i % 32 <= 24]
    assert pre["test"] == [d for i, d in enumerate(owt_docs) if i % 32 >= 25]
    assert data.load_documents("pretrain", "validation", "hub", data_dir=root, max_docs=3) == pre["validation"][:3]

    assert data.load_documents("math", "train", "hub", data_dir=root) == lines["train"]
    assert data.load_documents("math", "validation", "hub", data_dir=root) == lines["valid"]
    assert data.load_documents("math", "test", "hub", data_dir=root) == lines["test"]
    assert list(hf_cache.glob("dume_m2d2/math_l1-*/math_l1/train.txt"))  # extracted once, into the cache
    assert data.load_documents("math", "test", "hub", data_dir=root) == lines["test"]
    assert data.load_documents("physics", "validation", "hub", data_dir=root) == [
        "valid physics line one", "valid physics line two"]

    with pytest.raises(DumeError, match="hf download"):
        data.load_documents("history", "train", "hub", data_dir=root)
    with pytest.raises(DumeError, match="unknown domain"):
        data.load_documents("cs_l1", "train", "hub", data_dir=root)
    with pytest.raises(DumeError, match="not found"):
        data.load_documents("pretrain", "train", "hub", data_dir=tmp_path / "nowhere")


# ---- tokenization ------------------------------------------------------------------------------


def stream_of(docs, tok):
    out = []
    for d in docs:
        out += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_pack_documents_conserves_tokens_and_separates_with_eos(tokenizer):
    docs = ["the cat sat on the mat", "a dog ate the bone", "def f(x): return x + 1"] * 7
    seq_len = 16
    ids, mask = text_batches.pack_documents(docs, tokenizer, seq_len)
    stream = stream_of(docs, tokenizer)
    n = len(stream) // seq_len
    assert ids.shape == mask.shape == (n, seq_len) and ids.dtype == torch.long
    assert ids.flatten().tolist() == stream[: n * seq_len]
    assert len(stream) - ids.numel() < seq_len and bool(mask.all())
    flat = ids.flatten().tolist()
    eos_at = [i for i, t in enumerate(flat) if t == tokenizer.eos_token_id]
    assert eos_at and all(flat[i + 1] == tokenizer.bos_token_id for i in eos_at if i + 1 < len(flat))
    assert flat.count(tokenizer.eos_token_id) >= len(docs) - 2


def test_pack_documents_pads_a_stream_shorter_than_one_block(tokenizer):
    ids, mask = text_batches.pack_documents(["the cat"], tokenizer, 64)
    stream = stream_of(["the cat"], tokenizer)
    assert ids.shape == (1, 64)
    assert mask[0].tolist() == [1] * len(stream) + [0] * (64 - len(stream))
    assert ids[0, : len(stream)].tolist() == stream
    assert (ids[0, len(stream):] == tokenizer.pad_token_id).all()
    with pytest.raises(DumeError, match="no tokens"):
        text_batches.pack_documents(["", ""], tokenizer, 8)


def test_document_batches_one_row_per_document_truncated_and_padded(tokenizer):
    docs = ["the cat sat on the mat " * 10, "a dog", "import os", "print('hello world')", "the bone"]
    batches = list(text_batches.document_batches(docs, tokenizer, max_len=12, batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    rows = [r for ids, mask in batches for r in zip(ids, mask)]
    for doc, (ids, mask) in zip(docs, rows):
        expected = ([tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"])[:12]
        n = int(mask.sum())
        assert ids[:n].tolist() == expected
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == tokenizer.pad_token_id).all()
    assert batches[0][0].shape[1] == 12  # the long document was truncated to max_len
    with pytest.raises(DumeError, match="batch_size"):
        list(text_batches.document_batches(docs, tokenizer, 12, 0))


def test_hub_m2d2_from_the_hub_cache_without_network(tmp_path, hf_cache, monkeypatch):
    """No data dir: the archive comes from the Hugging Face hub cache (as after a pre-download)."""
    import huggingface_hub.constants

    _, lines = make_hub_mirror(tmp_path / "mirror")
    hub_cache = tmp_path / "hub_cache"
    repo = hub_cache / "datasets--machelreid--m2d2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / "data"
    snapshot.mkdir(parents=True)
    (tmp_path / "mirror" / "machelreid" / "m2d2" / "data" / "math_l1.tar.gz").rename(snapshot / "math_l1.tar.gz")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert data.load_documents("math", "validation", "hub") == lines["valid"]
    with pytest.raises(DumeError, match="Pre-download"):
        data.load_documents("physics", "train", "hub")


def test_heldout_source_keeps_its_domains_out_of_pretraining():
    """The routers study's second domain set: its five topics are pretraining text in the
    default source and held out of pretraining here; the default's expert topics swap in."""
    from dume.corpora import documents as data

    assert data.available_domains("offline_heldout") == offline.HELDOUT_DOMAINS
    pretrain = set(data.load_documents("pretrain", "train", "offline_heldout"))
    default_pretrain = set(data.load_documents("pretrain", "train", "offline"))
    for d in offline.HELDOUT_DOMAINS:
        docs = set(data.load_documents(d, "train", "offline_heldout"))
        assert docs and not docs & pretrain
        assert docs <= default_pretrain
    assert set(data.load_documents("math", "train", "offline")) <= pretrain
    assert data.corpus_stamp("pretrain", "offline") != data.corpus_stamp("pretrain", "offline_heldout")
    with pytest.raises(DumeError, match="unknown domain"):
        data.load_documents("code", "train", "offline_heldout")
