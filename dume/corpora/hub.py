"""The paper's corpora (`hub`): OpenWebText for pretraining and the M2D2 domains the original
code trained its experts on, from the hub, its cache, or a local mirror."""

from __future__ import annotations

import functools
import hashlib
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from dume.corpora.files import data_files, files_by_split, files_texts, iter_texts
from dume.corpora.source import PRETRAIN, Source, file_stamps, select_split
from dume.errors import DumeError

#: The copy of OpenWebText the original code pre-tokenized (parquet, one `train` split,
#: field `text`); its split is by document index (see `_split_by_index`).
HUB_PRETRAIN_REPO = "vietgpt/openwebtext_en"

HUB_M2D2_REPO = "machelreid/m2d2"

#: The M2D2 configs the original DUME/HDEE code trained its five experts on.
HUB_M2D2_CONFIGS = {"code": "cs_l1", "math": "math_l1", "physics": "physics_l1", "history": "History_and_events",
                    "philosophy": "Philosophy_and_thinking"}

#: OpenWebText's split in the original code: its pre-tokenizer dealt document i to worker
#: i % 32, and the workers' files 0-20 became train, 21-24 validation, 25-31 test.
OPENWEBTEXT_WORKERS = 32
OPENWEBTEXT_SPLIT_WORKERS = {"train": range(0, 21), "validation": range(21, 25), "test": range(25, 32)}


def _split_by_index(docs: Iterable[str], split: str) -> Iterator[str]:
    """The original code's OpenWebText split (document index mod 32: 21 / 4 / 7 of 32)."""
    keep = OPENWEBTEXT_SPLIT_WORKERS[split]
    return (doc for i, doc in enumerate(docs) if i % OPENWEBTEXT_WORKERS in keep)


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
        return _split_by_index(iter_texts(dsets["train"], f"{where} [train]"), split), where
    config = HUB_M2D2_CONFIGS[domain]
    directory = _m2d2_directory(config, data_dir)
    where = f"M2D2 {config} ({directory})"
    files = data_files(directory)
    by_split = files_by_split(files, directory) if files else None
    if not by_split:
        raise DumeError(f"{where} holds no train/valid/test files")
    # M2D2's text files hold one document per line (its loading script read them that way).
    splits = {s: functools.partial(files_texts, fs, "line", where) for s, fs in by_split.items()}
    return select_split(splits, split), where


def _hub_mirror(data_dir, repo: str) -> Path:
    """``DATA_DIR/<owner>/<name>``: where ``hf download --local-dir`` (``huggingface-cli download`` in
    huggingface_hub before 1.0) puts a copy of a hub repo."""
    root = Path(data_dir)
    mirror = root / repo
    if not mirror.is_dir():
        raise DumeError(f"{mirror} not found: with --source hub and --data-dir, put a copy of the hub repo there, "
                        f"e.g. hf download {repo} --repo-type dataset --local-dir {mirror}")
    return mirror


def _m2d2_directory(config: str, data_dir) -> Path:
    """The directory of one M2D2 config's text files (extracting its archive if needed).

    M2D2 is published as one ``data/<config>.tar.gz`` per domain plus a loading script, which ``datasets`` >= 4
    no longer runs; so the archive is fetched (or found in a local mirror) and read directly:
    ``<config>/{train,valid,test}.txt``."""
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


class HubSource(Source):
    name = "hub"
    help = "OpenWebText + M2D2 (the paper's)"
    paper_defaults = True

    def documents(self, domain, split, data_dir):
        self.check_domain(domain, data_dir)
        return _hub_documents(domain, split, data_dir)

    def stamp(self, domain, data_dir) -> dict:
        if data_dir is None:
            return {"repo": HUB_PRETRAIN_REPO if domain == PRETRAIN else f"{HUB_M2D2_REPO}/{HUB_M2D2_CONFIGS[domain]}"}
        repo = HUB_PRETRAIN_REPO if domain == PRETRAIN else HUB_M2D2_REPO
        root = (Path(data_dir) / repo).resolve()
        files = [f for f in sorted(root.rglob("*")) if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(root).parts)]
        if domain != PRETRAIN:
            config = HUB_M2D2_CONFIGS[domain]
            files = [f for f in files if config in f.relative_to(root).parts[:2] or f.name.startswith(config)]
        return file_stamps(files, root)


HUB = HubSource()
