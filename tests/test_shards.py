"""The streamed safetensors writer equals safetensors' own `save_file`, byte for byte."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dume.errors import DumeError
from dume.checkpoint.shards import OutTensor, const, parse_size, write_safetensors


def _plan(tensors):
    return [OutTensor(n, tuple(t.shape), t.dtype, const(t)) for n, t in tensors.items()]


def test_streamed_file_equals_save_file_byte_for_byte(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.1.mlp.down_proj.weight": torch.randn(5, 7, generator=g),
        "model.embed_tokens.weight": torch.randn(11, 3, generator=g).to(torch.bfloat16),
        "model.layers.0.block_sparse_moe.gate.weight": torch.randn(3, 4, generator=g),
        "counts": torch.arange(5, dtype=torch.int64),
        "model.norm.weight": torch.randn(3, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ours").mkdir()
    names = write_safetensors(_plan(tensors), tmp_path / "ours")
    assert names == ["model.safetensors"]
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_shards_split_by_size_with_transformers_index(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    names = write_safetensors(_plan(tensors), tmp_path, max_shard_size=2048)
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    loaded = {}
    for n in names:
        loaded.update(load_file(str(tmp_path / n)))
    assert set(index["weight_map"]) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(loaded[n], t)
        assert n in load_file(str(tmp_path / index["weight_map"][n]))


def test_a_tensor_that_differs_from_its_plan_is_refused(tmp_path):
    bad = [OutTensor("x", (2, 2), torch.float32, lambda: torch.zeros(3))]
    with pytest.raises(DumeError, match="planned"):
        write_safetensors(bad, tmp_path)


@pytest.mark.parametrize("value,expected", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), (1000, 1000)])
def test_shard_sizes_parse_like_transformers(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["big", 0, -3, True, "0MB"])
def test_bad_shard_sizes_are_one_clear_error(value):
    with pytest.raises(DumeError, match="max_shard_size"):
        parse_size(value)
