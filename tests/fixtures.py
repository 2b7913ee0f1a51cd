"""Shared fixtures for the script-level tests (test_scripts, test_strategies, test_collect).

A tiny ``--source local`` corpus (``pretrain`` plus three expert domains with disjoint
vocabularies) and one tiny trained run (seed + three experts, ``test-micro`` preset,
32-token sequences, a 300-token BPE) that every test shares. Test modules import the
fixtures they use::

    from tests.fixtures import corpus_dir, trained_run  # noqa: F401  (pytest fixtures)

Importing a fixture into several modules makes pytest register it once per module, so a
"session" fixture could run once per module; the expensive builders are therefore
memoised here at module level and every module gets the same directories.

Everything runs with one torch thread: on this 2-core machine, shared with other
processes, two threads make the micro model's matmuls ~100x slower (thread hand-off
dominates work of a few microseconds). ``one_thread`` sets it and restores it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

# ---- the corpus ------------------------------------------------------------------------------

DOMAIN_WORDS = {
    "code": ("def return import class self lambda yield print range len dict list tuple None True "
             "False while for if else elif try except").split(),
    "math": ("theorem lemma proof integral derivative matrix vector prime number group ring field "
             "equation limit sum product algebra topology").split(),
    "history": ("king queen empire war battle treaty century dynasty revolution army kingdom castle "
                "emperor siege colony republic parliament").split(),
}
DOMAINS = tuple(DOMAIN_WORDS)  # code, math, history: EXPERT_DOMAINS order, as available_domains gives
COMMON_WORDS = "the a of to in is and with as on at by".split()
PARAGRAPHS_PER_FILE = 240

# ---- the run's settings ----------------------------------------------------------------------

SEQ_LEN = 32
VOCAB_SIZE = 300
MAX_EVAL_BLOCKS = 6
PRETRAIN_FLAGS = ["--preset", "test-micro", "--steps", "20", "--warmup", "2", "--eval-every", "10"]
EXPERT_FLAGS = ["--steps", "4", "--warmup", "1", "--eval-every", "2"]
ROUTER_STEPS = 3  # BTX / DUME+ router-training steps


def paragraph(rng: random.Random, words, i: int) -> str:
    """A short paragraph, 70 % from `words`, the rest common words; `i` makes it unique."""
    n = rng.randint(8, 18)
    body = " ".join(rng.choice(words if rng.random() < 0.7 else COMMON_WORDS) for _ in range(n))
    return f"{body}. {i}"


def write_corpus(root: Path, n: int = PARAGRAPHS_PER_FILE) -> Path:
    """``root/{pretrain,code,math,history}.txt``: blank-line-separated paragraphs."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for domain, words in DOMAIN_WORDS.items():
        (root / f"{domain}.txt").write_text("\n\n".join(paragraph(rng, words, i) for i in range(n)) + "\n")
    every = [w for ws in DOMAIN_WORDS.values() for w in ws]
    (root / "pretrain.txt").write_text("\n\n".join(paragraph(rng, every, i) for i in range(n)) + "\n")
    return root


def non_train_paragraphs(count: int, words=("zebra", "yak", "quokka", "ibis", "okapi")) -> list[str]:
    """Paragraphs that the hash split sends to validation or test only (a domain with no
    training text)."""
    from dume.corpora.source import hash_split

    rng = random.Random(1)
    out, i = [], 0
    while len(out) < count:
        p = paragraph(rng, list(words), i)
        i += 1
        if hash_split(p) != "train":
            out.append(p)
    return out


# ---- running the scripts -----------------------------------------------------------------------

@contextlib.contextmanager
def one_thread(datasets_cache: Path | None = None):
    """One torch thread (and, given a directory, a private `datasets` cache) for a while."""
    import datasets

    old_threads, old_env = torch.get_num_threads(), os.environ.get("DUME_THREADS")
    old_cache = datasets.config.HF_DATASETS_CACHE
    os.environ["DUME_THREADS"] = "1"  # dume.cli.run_main -> setup_threads reads it
    torch.set_num_threads(1)
    if datasets_cache is not None:  # read by every load_dataset call: keeps ~/.cache clean
        datasets.config.HF_DATASETS_CACHE = Path(datasets_cache)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        datasets.config.HF_DATASETS_CACHE = old_cache
        if old_env is None:
            os.environ.pop("DUME_THREADS", None)
        else:
            os.environ["DUME_THREADS"] = old_env


def base_args(run_dir, data_dir, *extra) -> list[str]:
    return ["--run-dir", str(run_dir), "--source", "local", "--data-dir", str(data_dir),
            "--seq-len", str(SEQ_LEN), "--vocab-size", str(VOCAB_SIZE), "--batch-size", "8",
            "--eval-batch-size", "32", "--max-eval-blocks", str(MAX_EVAL_BLOCKS), *map(str, extra)]


def make_run(run_dir, data_dir):
    """A `dume.clm.run.Run` with the same settings as `base_args` (for evaluating by hand)."""
    from dume.clm.run import Run

    return Run(Path(run_dir), "local", str(data_dir), SEQ_LEN, None, VOCAB_SIZE, MAX_EVAL_BLOCKS)


def run_script(main, argv) -> int:
    """`dume.cli.run_main(main, argv)`: the exit status, DumeError printed on stderr."""
    from dume.cli import run_main

    return run_main(main, list(map(str, argv)))


def snapshot(root) -> dict:
    """{relative path: (size, mtime_ns)} of every file under `root`, and every directory."""
    root = Path(root)
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = ("dir", 0) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


# ---- memoised builders, and the fixtures ---------------------------------------------------------

_BUILT: dict[str, object] = {}


def _once(key: str, build):
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def _train_run(run_dir: Path, data_dir: Path, cache: Path) -> Path:
    import clm_pretrain
    import clm_train_experts

    with one_thread(cache):
        clm_pretrain.main(base_args(run_dir, data_dir, *PRETRAIN_FLAGS))
        clm_train_experts.main(base_args(run_dir, data_dir, *EXPERT_FLAGS))
    return run_dir


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory) -> Path:
    """A private `datasets` cache for the corpus files (they live in tmp dirs anyway)."""
    return _once("datasets_cache", lambda: tmp_path_factory.mktemp("datasets_cache"))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return _once("corpus", lambda: write_corpus(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_dir, datasets_cache) -> Path:
    """RUN_DIR with tokenizer/, seed/, experts/{code,math,history}/ and their results."""
    return _once("trained_run", lambda: _train_run(tmp_path_factory.mktemp("run") / "clm", corpus_dir,
                                                   datasets_cache))


def method_args(run_dir, data_dir, method: str, *extra) -> list[str]:
    steps = ["--num-steps", str(ROUTER_STEPS)] if method in ("BTX", "DUMEplus") else []
    return base_args(run_dir, data_dir, "--method", method, *steps, *extra)


def _run_strategies(run_dir: Path, data_dir: Path, cache: Path) -> Path:
    import clm_moerging_strategies_eval as strategies

    with one_thread(cache):
        for method in strategies.METHODS:
            strategies.main(method_args(run_dir, data_dir, method))
    return run_dir


@pytest.fixture(scope="session")
def strategy_run(trained_run, corpus_dir, datasets_cache) -> Path:
    """The trained run after `clm_moerging_strategies_eval.py --method M` for every method."""
    return _once("strategy_run", lambda: _run_strategies(trained_run, corpus_dir, datasets_cache))


@pytest.fixture
def single_thread(datasets_cache):
    """Every test of these modules: one torch thread and the private `datasets` cache."""
    with one_thread(datasets_cache):
        yield
