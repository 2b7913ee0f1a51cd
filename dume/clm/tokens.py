"""Token files: a corpus split tokenized once into a memory-mapped file, read only as far as a step budget needs.

Pretraining the paper's seed reads 20 000 steps × 64 sequences × 1024 tokens ≈ 1.3 B tokens; OpenWebText holds
~8 B. So a split is tokenized lazily, document by document in the corpus's order, until the tokens the caller
asked for are there (or the corpus ends), and written to ``tokens.bin`` (uint16 when the vocabulary fits, else
int32, as nanoGPT's `prepare.py` does) with a ``meta.json`` beside it. Peak memory is one batch of documents,
whatever the corpus size; training then reads windows straight from the memory map.

A token file is keyed by everything its tokens depend on (the corpus and split, the tokenizer's vocabulary
fingerprint, the window recipe) and cached under ``$DUME_TOKEN_CACHE`` (default: the `datasets` cache,
``dume_tokens/``), so every later script and process reuses it; under `accelerate launch` only the main process
prepares it, the others wait. A request for more tokens than a stored, unfinished file holds tokenizes again from
the start (the first tokens are the same), so the file is always one prefix of the split's token stream.

Two window recipes (`RECIPES`):
``original``  the original DUME/HDEE code's (`pretokenize_data.py`): each document is ``[BOS] + tokens`` (what a
              Llama-3 tokenizer's ``encode`` gives: BOS, no EOS), concatenated; window i holds stream tokens
              ``[i·L, i·L + L]`` (L + 1 tokens), so all L positions of a window are predicted (labels run one
              past the window) and the next window starts at the last token of this one.
``eos``       the embedded default's: ``[BOS] doc [EOS] [BOS] doc [EOS] …`` cut into disjoint blocks of L tokens
              (L − 1 predicted per block); a stream shorter than one block is one right-padded block.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from dume.errors import DumeError
from dume.runtime.distributed import main_process_first
from dume.text.batches import right_pad
from dume.text.tokenizer import vocab_fingerprint

FORMAT_VERSION = 1
TOKENIZE_BATCH = 1000  # documents per tokenizer call (a fast tokenizer encodes a batch on all cores)


@dataclass(frozen=True)
class WindowRecipe:
    """How documents become training windows of `seq_len` predicted positions."""

    name: str
    eos: bool        # end every document with EOS
    overlap: int     # extra tokens per window past seq_len (1: labels run one past it)
    description: str

    def window(self, seq_len: int) -> int:
        return seq_len + self.overlap


RECIPES = {
    "original": WindowRecipe("original", eos=False, overlap=1,
                             description="[BOS] doc, no EOS; L+1-token windows, stride L (L predicted)"),
    "eos": WindowRecipe("eos", eos=True, overlap=0,
                        description="[BOS] doc [EOS]; disjoint L-token blocks (L-1 predicted)"),
}


def get_recipe(name: str) -> WindowRecipe:
    if name not in RECIPES:
        raise DumeError(f"unknown window recipe {name!r}: choose from {sorted(RECIPES)}")
    return RECIPES[name]


def cache_root() -> Path:
    env = os.environ.get("DUME_TOKEN_CACHE")
    if env:
        return Path(env)
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "dume_tokens"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


@dataclass
class TokenFile:
    directory: Path
    meta: dict

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def complete(self) -> bool:
        """True when the whole split was tokenized (the corpus ended before any budget)."""
        return bool(self.meta["complete"])

    def tokens(self) -> np.ndarray:
        if self.n_tokens == 0:
            return np.zeros(0, dtype=np.dtype(self.meta["dtype"]))
        return np.memmap(self.directory / "tokens.bin", dtype=np.dtype(self.meta["dtype"]), mode="r",
                         shape=(self.n_tokens,))


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _token_pieces(docs: Iterable[str], tokenizer, recipe: WindowRecipe) -> Iterator[list[int]]:
    """Each non-empty document's ids with the recipe's BOS/EOS, in order."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if recipe.eos and eos is None:
        raise DumeError("the tokenizer has no eos token: documents need a separator")
    head = [bos] if bos is not None else []
    tail = [eos] if recipe.eos else []
    batch: list[str] = []

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if ids:
                yield head + ids + tail

    for doc in docs:
        batch.append(doc)
        if len(batch) >= TOKENIZE_BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def prepare_tokens(docs_fn, tokenizer, recipe: WindowRecipe, corpus: dict, min_tokens: int | None = None,
                   desc: str = "tokenize") -> TokenFile:
    """The token file of one corpus split (`docs_fn()` -> iterator of its documents), holding at least `min_tokens`
    tokens (None: the whole split). `corpus` names the split for the cache key (source, domain, split, ...)."""
    parts = {"corpus": corpus, "tokenizer": vocab_fingerprint(tokenizer), "recipe": recipe.name,
             "version": FORMAT_VERSION}
    directory = cache_root() / _key(parts)
    with main_process_first():
        found = _load(directory, parts)
        if found is not None and (found.complete or (min_tokens is not None and found.n_tokens >= min_tokens)):
            return found
        return _write(directory, parts, docs_fn(), tokenizer, recipe, min_tokens, desc)


def _load(directory: Path, parts: dict) -> TokenFile | None:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged record is rebuilt, never trusted
    if meta.get("key") != parts:
        return None
    size = (directory / "tokens.bin").stat().st_size if (directory / "tokens.bin").is_file() else -1
    if size != meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    return TokenFile(directory, meta)


def _write(directory: Path, parts: dict, docs: Iterator[str], tokenizer, recipe: WindowRecipe,
           min_tokens: int | None, desc: str) -> TokenFile:
    from tqdm.auto import tqdm

    from dume.checkpoint.io import atomic_write_json

    directory.mkdir(parents=True, exist_ok=True)
    # The scripts turn the Rust tokenizer's threads off (they fight torch's on small machines); preparing a token
    # file is the one place where they should all work.
    parallel = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    dtype = token_dtype(len(tokenizer))
    tmp = directory / f".tokens.bin.tmp-{os.getpid()}"
    n_tokens = n_docs = 0
    complete = True
    bar = tqdm(total=min_tokens, desc=desc, unit="tok", unit_scale=True, leave=False)
    try:
        with open(tmp, "wb") as f:
            for piece in _token_pieces(docs, tokenizer, recipe):
                np.asarray(piece, dtype=dtype).tofile(f)
                n_tokens += len(piece)
                n_docs += 1
                bar.update(len(piece))
                if min_tokens is not None and n_tokens >= min_tokens:
                    complete = False  # stopped on the budget (the corpus may hold more)
                    break
            f.flush()
            os.fsync(f.fileno())
        (directory / "meta.json").unlink(missing_ok=True)  # the old record goes before its data changes
        os.replace(tmp, directory / "tokens.bin")
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
        if parallel is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallel
    meta = {"key": parts, "dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "n_docs": n_docs,
            "complete": complete, "min_tokens": min_tokens}
    atomic_write_json(directory / "meta.json", meta)
    return TokenFile(directory, meta)


class TokenWindows(Dataset):
    """Windows of a token stream as (input_ids, attention_mask) int64 pairs, read lazily.

    Window i is stream[i·L : i·L + W] (W = L + recipe.overlap); a stream shorter than one window is one
    right-padded window (mask 0 on the padding)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, recipe: WindowRecipe, max_windows: int | None = None,
                 pad_id: int = 0):
        if seq_len < 2:
            raise DumeError("the sequence length must be at least 2")
        self.tokens, self.seq_len, self.recipe, self.pad_id = tokens, seq_len, recipe, pad_id
        self.width = recipe.window(seq_len)
        n = len(tokens)
        full = (n - recipe.overlap) // seq_len if n >= self.width else 0
        self.padded = full == 0 and n > 0
        count = full if full else (1 if n > 0 else 0)
        self.count = count if max_windows is None else min(count, max_windows)
        if self.count == 0:
            raise DumeError("no tokens to make windows of: the documents are empty")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self.padded:
            ids, mask = right_pad([np.asarray(self.tokens[: self.width], dtype=np.int64)], self.width, self.pad_id)
            return ids[0], mask[0]
        start = i * self.seq_len
        ids = torch.from_numpy(np.asarray(self.tokens[start:start + self.width], dtype=np.int64))
        return ids, torch.ones(self.width, dtype=torch.long)

    def tensors(self, index: Iterable[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows `index` (default: all) as two [n, W] int64 tensors, in memory."""
        index = range(self.count) if index is None else list(index)
        pairs = [self[i] for i in index]
        if not pairs:
            return torch.zeros((0, self.width), dtype=torch.long), torch.zeros((0, self.width), dtype=torch.long)
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def tokens_needed(windows: int, seq_len: int, recipe: WindowRecipe) -> int:
    """Stream tokens that hold `windows` full windows."""
    return windows * seq_len + recipe.overlap
