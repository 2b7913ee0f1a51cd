"""Tokenizer files that readers on transformers 4.x and 5.x both load.

transformers 5 saves a tokenizer built on a `tokenizers` object with `"tokenizer_class": "TokenizersBackend"`, a
name transformers 4.x does not know, so a 4.x reader (llama.cpp's GGUF converter, older vLLM and lm-eval installs)
fails on the checkpoints we write. In 5.x `PreTrainedTokenizerFast` *is* `TokenizersBackend` (the same class under
its 4.x name), and in 4.x it is the class that loads a bare `tokenizer.json`; so naming it changes which class either
reader builds, never the tokens: both tokenise with the one `tokenizer.json`, which is left byte for byte as it was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from dume.checkpoint.io import atomic_write_json
from dume.checkpoint.reader import TOKENIZER_FILES

TOKENIZER_CONFIG = "tokenizer_config.json"
# 5.x-only class name -> the name both 4.x and 5.x resolve to the same tokenizer
PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_portable(path: str | Path) -> bool:
    """Rename a 5.x-only `tokenizer_class` in `path`/tokenizer_config.json (atomically); True if it changed. A
    missing or unreadable file is left alone: the loaders report it better than we could here."""
    cfg_path = Path(path) / TOKENIZER_CONFIG
    if not cfg_path.is_file():
        return False
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    new = PORTABLE_CLASSES.get(cfg.get("tokenizer_class")) if isinstance(cfg, dict) else None
    if new is None:
        return False
    cfg["tokenizer_class"] = new
    atomic_write_json(cfg_path, cfg)
    return True


def copy_tokenizer_files(src: str | Path, dst: str | Path, extra: Iterable[str] = ()) -> None:
    """Copy every tokenizer file (and the `extra` names) that `src` has into `dst`, then make them portable."""
    src, dst = Path(src), Path(dst)
    for name in (*TOKENIZER_FILES, *extra):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    make_portable(dst)
