"""The CLM corpora's entry points: for a domain and a split, the documents, as plain strings.

The pseudo-domain ``"pretrain"`` is the seed model's corpus; the expert domains are what the experts are
fine-tuned on and what DUME's routers are fitted to. The sources, by `--source` name (`SOURCES`): ``offline``
(the embedded default: Wikipedia summaries and stdlib code, `dume.corpora.offline`), ``hub`` (the paper's
OpenWebText + M2D2, `dume.corpora.hub`), ``local`` (your files, `dume.corpora.local`); datasets_setup.md
describes each, with licences and sizes.

Splits are ``train`` / ``validation`` / ``test``. Where a corpus has none of its own, a document goes to a split
by the SHA-256 of a stable key (an article's title, a stdlib file's path relative to the stdlib root, a local
document's text): 80 / 10 / 10, disjoint, the same on every run and machine (Python's ``hash()`` is salted per
process, so never used). All chunks of one source file share the file's key, so no file spans two splits.

Tokenization (`dume.text.batches`): `pack_documents` (training, perplexity) and `document_batches` (DUME's
statistics) both start every document with the tokenizer's BOS, when it has one (the Llama convention: a model
sees the same context at a document start in training, in evaluation and in its statistics).
"""

from __future__ import annotations

import os
from typing import Iterator

from dume.checks import positive_int
from dume.corpora.hub import HUB
from dume.corpora.local import LOCAL
from dume.corpora.offline import OFFLINE, OFFLINE_HELDOUT
from dume.corpora.source import PRETRAIN, SPLITS, Source, check_split
from dume.errors import DumeError

# Every corpus source, by its `--source` name: a new source is one module with a
# `dume.corpora.source.Source` subclass and one entry here.
SOURCES: dict[str, Source] = {s.name: s for s in (OFFLINE, OFFLINE_HELDOUT, HUB, LOCAL)}
SOURCE_HELP = {name: s.help for name, s in SOURCES.items()}  # the CLIs' --source choices and help


def source_of(source: str) -> Source:
    if source not in SOURCES:
        raise DumeError(f"unknown data source {source!r}: choose from {list(SOURCES)}")
    return SOURCES[source]


def available_domains(source: str = "offline", data_dir: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The expert domains a source offers (``"pretrain"`` is always accepted besides them)."""
    return source_of(source).domains(data_dir)


def iter_documents(domain: str, split: str, source: str = "offline", *,
                   data_dir: str | os.PathLike | None = None) -> tuple[Iterator[str], str]:
    """(the documents of one domain and split, read lazily in the corpus's order; where they come from).
    Nothing is read before the iterator is advanced, and reading stops where the caller stops: a step budget
    over OpenWebText reads only what it needs. The order and content equal `load_documents`'s."""
    src = source_of(source)
    check_split(split)
    return src.documents(domain, split, data_dir)


def corpus_stamp(domain: str, source: str = "offline", data_dir=None) -> dict:
    """What the documents of `domain` depend on, for cache keys: the data files' names, sizes and mtimes (local
    and mirrored hub data), the wiki package's file and the Python version (offline), or the hub repo."""
    return source_of(source).stamp(domain, data_dir)


def has_documents(domain: str, split: str, source: str = "offline", *, data_dir=None) -> None:
    """Refuse a domain/split with no documents, reading at most one."""
    docs, where = iter_documents(domain, split, source, data_dir=data_dir)
    if next(docs, None) is None:
        raise DumeError(f"domain {domain!r} split {split!r} has no documents in {where}")


def load_documents(domain: str, split: str, source: str = "offline", *,
                   data_dir: str | os.PathLike | None = None, max_docs: int | None = None) -> list[str]:
    """The documents of one domain and split, as plain strings.

    `max_docs` keeps the first `max_docs` (offline: in a fixed pseudo-random order, a spread sample; hub and
    local: in the corpus's order, read no further, which is what makes OpenWebText usable here). Raises
    :class:`DumeError` for an unknown source, split or domain, and when the result would be empty.
    """
    docs, where = _documents(domain, split, source, data_dir, max_docs)
    if not docs:
        raise DumeError(f"domain {domain!r} split {split!r} has no documents in {where}")
    return docs


def _documents(domain: str, split: str, source: str, data_dir, max_docs: int | None) -> tuple[list[str], str]:
    """(documents, where they came from), possibly empty: `load_documents` without the emptiness check."""
    src = source_of(source)
    check_split(split)
    positive_int("max_docs", max_docs, allow_none=True)
    return src.load(domain, split, data_dir, max_docs)


def corpus_summary(source: str = "offline", data_dir: str | os.PathLike | None = None) -> dict:
    """``{domain: {split: {"docs": n, "chars": c}}}`` for ``pretrain`` and every expert domain, for the log and
    the README. It reads every corpus in full (on the hub, all of OpenWebText): for the offline and local sources.
    """
    src = source_of(source)
    domains = [PRETRAIN, *src.domains(data_dir)] if src.has_pretrain(data_dir) else list(src.domains(data_dir))
    out: dict = {}
    for domain in domains:
        out[domain] = {}
        for split in SPLITS:
            docs, _ = _documents(domain, split, source, data_dir, None)
            out[domain][split] = {"docs": len(docs), "chars": sum(len(d) for d in docs)}
    return out


def format_summary(summary: dict) -> str:
    """A Markdown table of :func:`corpus_summary`'s result."""
    lines = ["| domain | " + " | ".join(f"{s} docs | {s} chars" for s in SPLITS) + " |",
             "|---" * (1 + 2 * len(SPLITS)) + "|"]
    for domain, splits in summary.items():
        cells = [f"{splits[s]['docs']} | {splits[s]['chars']}" for s in SPLITS]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
