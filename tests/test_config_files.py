"""config.json files a transformers 4.x reader reads as 5.x does (dume.checkpoint.config_files).

No 4.x is installed here (bench/serve_check.py --transformers4-python runs a real one), so the tests check what a
4.x reader reads -- `rope_theta`, `rope_scaling`, Qwen3-MoE's `num_experts` -- against the config transformers 5
loads from the same file, and that the added keys change nothing for 5.x."""

from __future__ import annotations

import json

import pytest
import torch

from dume.checkpoint.config_files import make_config_portable, with_v4_keys
from tests.test_architectures import BUILDERS, _experts, _gates

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
V4_KEYS = ("rope_theta", "rope_scaling", "num_experts", "partial_rotary_factor")


def test_rope_parameters_are_also_written_under_the_4x_names():
    raw = with_v4_keys({"model_type": "mixtral", "rope_parameters": LLAMA3})
    assert raw["rope_theta"] == 500000.0
    assert raw["rope_scaling"] == {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    assert raw["rope_parameters"] == LLAMA3  # the 5.x key stays
    default = with_v4_keys({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 0.5}})
    assert default["rope_theta"] == 1e4 and default["rope_scaling"] is None and default["partial_rotary_factor"] == 0.5


def test_qwen3_moe_expert_count_and_what_is_left_alone():
    assert with_v4_keys({"model_type": "qwen3_moe", "num_local_experts": 5})["num_experts"] == 5
    assert "num_experts" not in with_v4_keys({"model_type": "mixtral", "num_local_experts": 5})
    per_layer_type = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    assert with_v4_keys(per_layer_type) == per_layer_type
    kept = {"rope_parameters": LLAMA3, "rope_theta": 1.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    assert with_v4_keys(kept) == kept  # a key already there wins


def test_make_config_portable_reports_a_change_once_and_leaves_bad_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_local_experts": 2}))
    assert make_config_portable(tmp_path) and not make_config_portable(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not make_config_portable(tmp_path) and (tmp_path / "config.json").read_text() == "{not json"
    assert not make_config_portable(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral"])
def test_a_written_moe_says_the_same_to_4x_and_5x_readers(kind, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dume.moe.edit import set_gates
    from dume.moe.merge import moerge_experts

    dirs = _experts(kind, tmp_path)
    moe = moerge_experts(dirs, tmp_path / "moe", gates=_gates(2, 3, 32))
    raw = json.loads((moe / "config.json").read_text())
    cfg = AutoConfig.from_pretrained(moe)
    rope = cfg.rope_parameters
    assert raw["rope_theta"] == rope["rope_theta"] == {"llama": 500000.0}.get(kind, 1e6)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert raw["rope_scaling"] == (None if rope["rope_type"] == "default" else scaling)
    if kind == "qwen3":
        assert raw["num_experts"] == raw["num_local_experts"] == 3
    # 5.x: the file without the 4.x keys loads to the same config and the same logits
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in moe.iterdir():
        (bare / f.name).symlink_to(f)
    (bare / "config.json").unlink()
    (bare / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k not in V4_KEYS}))
    def settings(c):
        return {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}

    assert settings(AutoConfig.from_pretrained(bare)) == settings(cfg)
    ids = torch.arange(40).view(1, -1) % 97
    logits = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(ids).logits for d in (moe, bare)]
    assert torch.equal(*logits)
    # an edit of a MoE written before the 4.x keys adds them
    edited = set_gates(bare, _gates(2, 3, 32), out_dir=tmp_path / "edited")
    assert {k: v for k, v in json.loads((edited / "config.json").read_text()).items() if k in V4_KEYS} == \
           {k: v for k, v in raw.items() if k in V4_KEYS}
    assert BUILDERS[kind][1] in raw["architectures"]
