"""Saving a transformers model as a checkpoint atomically, with its content fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

from dume.checkpoint.io import atomic_dir


def save_pretrained_atomic(model, path: str | os.PathLike, tokenizer=None) -> Path:
    """`model.save_pretrained` (safetensors) into `path`, atomically; config and tokenizer written so 4.x reads them
    too."""
    from dume.checkpoint.config_files import make_config_portable
    from dume.checkpoint.fingerprint import content_fingerprint
    from dume.checkpoint.outputs import require_free_space
    from dume.checkpoint.tokenizer_files import make_portable

    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    require_free_space(Path(path).parent, size, f"the checkpoint {path}")
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        make_config_portable(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            make_portable(tmp)
        content_fingerprint(tmp)  # stored beside the weights now, while they are in the page cache
    return Path(path)
