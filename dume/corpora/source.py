"""What every corpus source is: its splits and the stable hashing that makes them, and the
`Source` interface the entry points of `dume.corpora.documents` call."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Callable, Iterable, Iterator

from dume.errors import DumeError

SPLITS = ("train", "validation", "test")

EXPERT_DOMAINS = ("code", "math", "physics", "history", "philosophy")

PRETRAIN = "pretrain"

#: (train, validation) upper bounds of the split hash; the rest is test: 80 / 10 / 10.
_SPLIT_EDGES = (0.8, 0.9)


def unit_hash(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by `key` alone: the same on every run, process and machine."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(key: str) -> str:
    """The split (80 / 10 / 10) a document or file with this stable key belongs to."""
    u = unit_hash(key, "split")
    if u < _SPLIT_EDGES[0]:
        return "train"
    return "validation" if u < _SPLIT_EDGES[1] else "test"


def order_key(key: str) -> float:
    """A deterministic shuffle key, so `max_docs` takes a spread sample, not the 'A' titles."""
    return unit_hash(key, "order")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DumeError(f"unknown split {split!r}: choose from {list(SPLITS)}")


def split_by_hash(docs: Iterable[str], split: str) -> Iterator[str]:
    """The documents of `split` when a corpus has no split of its own (key: the text)."""
    return (doc for doc in docs if hash_split(doc) == split)


def take(texts: Iterable[str], max_docs: int | None) -> list[str]:
    """The first `max_docs` texts (all with None), reading no further."""
    return list(itertools.islice(texts, max_docs))


def select_split(splits: dict[str, Callable[[], Iterator[str]]], split: str) -> Iterator[str]:
    """Use the corpus's own train/validation/test when it has all three; else split by hash.

    `splits` maps each split the corpus has to a function giving its texts (read lazily). A corpus missing any
    of the three has all its splits pooled and re-split by the hash of each text, so the three stay disjoint."""
    if all(s in splits for s in SPLITS):
        return splits[split]()
    pooled = (t for name in sorted(splits) for t in splits[name]())
    return split_by_hash(pooled, split)


class Source:
    """One corpus source. A new source is a subclass in its own module, registered in
    `dume.corpora.documents.SOURCES` (docs/design.md §8 says what reads it there)."""

    name: str = ""
    help: str = ""  # one line for `--source` help
    paper_defaults: bool = False  # the paper's setting: original recipe, Llama-3 tokenizer, 64 000 test windows

    def domains(self, data_dir) -> tuple[str, ...]:
        """The expert domains it offers (PRETRAIN is accepted besides them)."""
        return EXPERT_DOMAINS

    def check_domain(self, domain: str, data_dir) -> None:
        valid = [*self.domains(data_dir), PRETRAIN]
        if domain not in valid:
            raise DumeError(f"unknown domain {domain!r} for source {self.name!r}: choose from {valid}")

    def documents(self, domain: str, split: str, data_dir) -> tuple[Iterator[str], str]:
        """(the documents, read lazily in the corpus's order; where they come from)."""
        raise NotImplementedError

    def load(self, domain: str, split: str, data_dir, max_docs: int | None) -> tuple[list[str], str]:
        """The first `max_docs` documents (all with None), possibly none."""
        docs, where = self.documents(domain, split, data_dir)
        return take(docs, max_docs), where

    def stamp(self, domain: str, data_dir) -> dict:
        """What the documents of `domain` depend on, for cache keys."""
        raise NotImplementedError

    def has_pretrain(self, data_dir) -> bool:
        return True


def file_stamps(files, root: Path) -> dict:
    """Names (relative to `root`), sizes and modification times of data files."""
    return {"root": str(root), "files": [[str(f.resolve().relative_to(root)) if f.resolve().is_relative_to(root)
                                          else str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
