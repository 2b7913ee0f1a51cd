"""Reading a user's documents: text, JSON Lines, JSON and Parquet files or folders, or a hub dataset."""

from __future__ import annotations

from pathlib import Path

from dume.errors import DumeError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def paragraphs(path: Path, strip: bool = True) -> list[str]:
    """A text file's documents: its blank-line-separated paragraphs (empty ones dropped)."""
    from dume.checkpoint.io import read_text

    return [t.strip() if strip else t for t in read_text(path).split("\n\n") if t.strip()]


def _file_texts(path: Path, fieldname: str) -> list[str]:
    from dume.checkpoint.io import read_records

    if path.suffix == ".txt":
        return paragraphs(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's ArrowInvalid and friends: the file is not Parquet
            raise DumeError(f"{path} is not a readable Parquet file ({type(e).__name__}: {str(e)[:160]}); "
                            "rewrite it or give a .jsonl / .txt file") from None
        if fieldname not in table.column_names:
            raise DumeError(f"{path} has no column {fieldname!r} (columns: {', '.join(table.column_names)})")
        return [str(v) for v in table.column(fieldname).to_pylist() if v]
    out = []
    for i, rec in enumerate(read_records(path)):
        if not isinstance(rec, dict) or fieldname not in rec:
            raise DumeError(f"{path} record {i + 1} has no field {fieldname!r}")
        if rec[fieldname]:
            out.append(str(rec[fieldname]))
    return out


def expert_texts(spec) -> tuple[list[str], str]:
    """The expert's documents and where they came from: a local file or folder, else a
    hub dataset (`datasets.load_dataset(data, split=split)[field]`)."""
    p = Path(spec.data)
    if p.is_file() or p.is_dir():
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files or any(f.suffix not in TEXT_SUFFIXES for f in files):
            raise DumeError(f"expert {spec.name}: no readable data in {p} (files ending in {', '.join(TEXT_SUFFIXES)})")
        texts: list[str] = []
        for f in files:
            texts += _file_texts(f, spec.field)
            if spec.max_docs is not None and len(texts) >= spec.max_docs:
                break
        source = f"local:{p}"
    else:
        if p.is_absolute() or spec.data.startswith(".") or spec.data.count("/") > 1:
            raise DumeError(f"expert {spec.name}: data {spec.data} does not exist (and is not a hub dataset id)")
        import datasets

        from dume.runtime.hub import offline, require_hub

        if not offline():  # offline, datasets reads its cache (or fails) at once
            require_hub(f"expert {spec.name}: hub dataset {spec.data}", "give a local file or folder instead")
        try:
            ds = datasets.load_dataset(spec.data, split=spec.split)
        except Exception as e:  # offline, missing, gated: one line
            raise DumeError(f"expert {spec.name}: cannot load hub dataset {spec.data} ({type(e).__name__}: "
                            f"{str(e)[:160]}); give a local file or folder instead") from None
        if spec.field not in ds.column_names:
            raise DumeError(f"expert {spec.name}: {spec.data} has no column {spec.field!r} "
                            f"(columns: {', '.join(ds.column_names)})")
        texts = [str(t) for t in ds[spec.field] if t]
        source = f"hub:{spec.data} ({spec.split})"
    if spec.max_docs is not None:
        texts = texts[: spec.max_docs]
    if not texts:
        raise DumeError(f"expert {spec.name}: no documents in {spec.data}")
    return texts, source
