"""Your own text (`local`): DIR/<domain>/{train,validation,test}.* or one DIR/<domain> file or
folder, split here by hash."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from dume.corpora.files import LOCAL_FORMATS, data_files, files_by_split, files_texts
from dume.corpora.source import EXPERT_DOMAINS, PRETRAIN, Source, file_stamps, split_by_hash
from dume.errors import DumeError


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
        elif entry.is_dir() and data_files(entry):
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
    files = [entry] if entry.is_file() else data_files(entry)
    by_split = files_by_split(files, entry) if entry.is_dir() else None
    if by_split is None:
        docs = split_by_hash(files_texts(files, "paragraph", str(entry)), split)
    else:
        docs = files_texts(by_split.get(split, []), "paragraph", str(entry))
    return docs, str(entry)


class LocalSource(Source):
    name = "local"
    help = "your files under --data-dir"

    def domains(self, data_dir) -> tuple[str, ...]:
        """The domains found in `data_dir`: the known ones in EXPERT_DOMAINS order first,
        then any others alphabetically."""
        names = [d for d in _local_layout(_local_root(data_dir)) if d != PRETRAIN]
        known = [d for d in EXPERT_DOMAINS if d in names]
        return tuple(known + sorted(d for d in names if d not in known))

    def documents(self, domain, split, data_dir):
        return _local_documents(domain, split, data_dir)

    def stamp(self, domain, data_dir) -> dict:
        entry = _local_layout(_local_root(data_dir)).get(domain)
        files = [] if entry is None else ([entry] if entry.is_file() else data_files(entry))
        return file_stamps(files, Path(data_dir).resolve())

    def has_pretrain(self, data_dir) -> bool:
        return PRETRAIN in _local_layout(_local_root(data_dir))


LOCAL = LocalSource()
