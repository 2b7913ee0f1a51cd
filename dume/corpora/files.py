"""Data files read through `datasets` (streamed, one file at a time): text, JSON Lines, JSON,
Parquet; files named by split. Shared by the local source and mirrored hub data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Sequence

from dume.errors import DumeError

HUB_TEXT_FIELD = "text"

#: File suffix -> (`datasets` builder, extra builder arguments).
LOCAL_FORMATS = {".txt": ("text", {"sample_by": "paragraph"}), ".jsonl": ("json", {}), ".json": ("json", {}),
                 ".parquet": ("parquet", {})}

#: File-name stems (before any "-"/"_"/"." shard suffix) naming a split.
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}

_SPLIT_STEM = re.compile(r"^(train|validation|valid|val|dev|test)(?:[-_.].*)?$", re.IGNORECASE)


def files_texts(files: Sequence[Path], txt_mode: str, where: str) -> Iterator[str]:
    """The documents of data files, streamed one file at a time through ``datasets.load_dataset``.

    ``.txt`` files give one document per paragraph (blank-line separated) or per line (`txt_mode`);
    ``.jsonl``/``.json``/``.parquet`` files one per row of their ``text`` column. Streaming (no Arrow conversion
    of the whole file first) keeps memory and time bounded by what the caller reads, not by the corpus's size.
    """
    import datasets

    for path in files:
        builder, kwargs = LOCAL_FORMATS[path.suffix.lower()]
        if builder == "text":
            kwargs = {**kwargs, "sample_by": txt_mode}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **kwargs)
            yield from iter_texts(ds, str(path))
        except DumeError:
            raise
        except Exception as e:  # datasets raises many types; the user needs the file and the cause
            raise DumeError(f"cannot read {path} ({where}): {type(e).__name__}: {e}") from e


def _split_name(path: Path) -> str | None:
    m = _SPLIT_STEM.match(path.name)
    return _SPLIT_ALIASES[m.group(1).lower()] if m else None


def data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.suffix.lower() in LOCAL_FORMATS
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def files_by_split(files: Sequence[Path], where: Path) -> dict[str, list[Path]] | None:
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


def iter_texts(ds, where: str) -> Iterator[str]:
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
