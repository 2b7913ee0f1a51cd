"""config.json files that transformers 4.x reads as transformers 5 does.

transformers 5 saves the rotary settings as one `rope_parameters` dict and Qwen3-MoE's expert count as
`num_local_experts`. A 4.x reader (an lm-eval or vLLM install pinned below 5, the environment of llama.cpp's
converter) knows neither key and falls back to its class defaults *without a word*: a Mixtral gets rope_theta 1e6
instead of the experts' 10 000 (or 500 000 with llama3 scaling) -- measured on our MoEs with transformers 4.57:
the same token ids, logits off by 2.5 to 4.0 -- and a Qwen3-MoE gets 128 experts (a load error). Writing the 4.x
names beside the 5.x ones mends both: 4.57 then computes transformers 5's logits to 2e-6 (float32 noise), and 5.x
reads the augmented file to the same config (`tests/test_config_files.py`). Existing 4.x keys are left as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from dume.checkpoint.io import atomic_write_json

CONFIG = "config.json"
# model_type -> {4.x key: the 5.x key holding its value}
RENAMED_KEYS = {"qwen3_moe": {"num_experts": "num_local_experts"}}
# keys of a 5.x rope_parameters dict that 4.x keeps at the top level rather than in rope_scaling
TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def with_v4_keys(raw: dict) -> dict:
    """`raw` (a config.json's dict) plus the keys a transformers 4.x reader looks for; nothing is overwritten."""
    out = dict(raw)
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # one dict for every layer (per-layer-type dicts: left alone)
        for key in TOP_LEVEL_ROPE_KEYS:
            if key in rope:
                out.setdefault(key, rope[key])
        scaling = {k: v for k, v in rope.items() if k not in TOP_LEVEL_ROPE_KEYS}
        out.setdefault("rope_scaling", None if scaling.get("rope_type", "default") == "default" else scaling)
    for v4, v5 in RENAMED_KEYS.get(raw.get("model_type"), {}).items():
        if v5 in raw:
            out.setdefault(v4, raw[v5])
    return out


def make_config_portable(path: str | Path) -> bool:
    """Add the 4.x keys to `path`/config.json (atomically); True if it changed. A missing or unreadable file is
    left alone: the loaders report it better than we could here."""
    cfg_path = Path(path) / CONFIG
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(raw, dict) or (new := with_v4_keys(raw)) == raw:
        return False
    atomic_write_json(cfg_path, new)
    return True
