"""LoRA experts in `dume build` (issue 23): `model: BASE` + `adapter: A`, merged with peft's own merge, one
expert at a time, into a cache keyed by content; refused in one line before any work when the adapter cannot
be merged into that base."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from helpers import one_error_line, tiny_llama, tiny_tokenizer

peft = pytest.importorskip("peft")  # the `test` extra installs it; without it only the refusal test is moot

NAMES = ("law", "med", "code")
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir, out_dir, seed: int):
    """A LoRA adapter on `base_dir` with non-zero B (init_lora_weights=False), so the merge changes the
    attention (shared) and MLP (expert) weights; saved as peft saves it (adapter_config names the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(init_lora_weights=False, target_modules=TARGETS, r=4))
    model.save_pretrained(str(out_dir))
    return out_dir


def merge_by_hand(base_dir, adapter_dir, out_dir, tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(str(out_dir))
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    tok = tiny_tokenizer()
    base = root / "base"
    tiny_llama(seed=0, max_position_embeddings=256).save_pretrained(base)
    tok.save_pretrained(base)
    for i, n in enumerate(NAMES):
        make_adapter(base, root / "adapters" / n, seed=10 + i)
        merge_by_hand(base, root / "adapters" / n, root / "merged" / n, tok)
    other = root / "other"  # same shapes, other weights: a plausible wrong base
    tiny_llama(seed=7, max_position_embeddings=256).save_pretrained(other)
    tok.save_pretrained(other)
    data = root / "data"
    data.mkdir()
    for n, words in zip(NAMES, ("court statute ruling", "patient dose aspirin", "def return import")):
        (data / f"{n}.txt").write_text("\n\n".join(f"The {words} case {i} of the {words.split()[i % 3]}."
                                                   for i in range(24)))
    return root, tok


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUME_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "merged_adapters"


def _config(root, out, experts):
    return {"experts": experts, "gate": "dume", "dtype": "float32", "out": str(out), "seq_len": 32,
            "batch_size": 4, "held_out": 0}


def _adapter_expert(root, n, **over):
    return {"name": n, "model": str(root / "base"), "adapter": str(root / "adapters" / n),
            "data": str(root / "data" / f"{n}.txt"), **over}


def _full_expert(root, n):
    return {"name": n, "model": str(root / "merged" / n), "data": str(root / "data" / f"{n}.txt")}


def _build(tmp_path, cfg, name="build.yaml"):
    import yaml

    from dume.cli import main

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return main(["build", str(path)])


def _logits(moe_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def watched_loads(monkeypatch):
    """Every base the merge loads, watched by a weak reference: at each load the earlier ones must be gone
    (never two models alive at once)."""
    from dume.checkpoint import adapters

    alive, real = [], adapters.load_base

    def load(path, dtype):
        gc.collect()
        assert all(r() is None for r in alive), "a model from an earlier merge is still alive"
        model = real(path, dtype)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(adapters, "load_base", load)
    return alive


def test_adapters_build_equals_the_build_from_checkpoints_merged_by_hand(setup, cache, tmp_path, watched_loads):
    """The issue's Must-show: base + three adapters gives the MoE of the three peft-merged checkpoints."""
    from dume.moe.edit import read_gates

    root, tok = setup
    assert _build(tmp_path, _config(root, tmp_path / "by_hand", [_full_expert(root, n) for n in NAMES]),
                  "by_hand.yaml") == 0
    assert _build(tmp_path, _config(root, tmp_path / "lora", [_adapter_expert(root, n) for n in NAMES])) == 0
    assert len(watched_loads) == 3 and all(r() is None for r in watched_loads)
    for got, want in zip(read_gates(tmp_path / "lora"), read_gates(tmp_path / "by_hand")):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-6)
    ids = tok("The patient case 3 of the court", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(_logits(tmp_path / "lora", ids), _logits(tmp_path / "by_hand", ids),
                               rtol=0, atol=1e-5)
    # the merge changed both shared and expert weights (else the test could pass on the base alone)
    from dume.checkpoint.reader import CheckpointReader

    with CheckpointReader(root / "base") as b, CheckpointReader(root / "merged" / "law") as m:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            assert not torch.equal(b.get(name), m.get(name))
    summary = json.loads((tmp_path / "lora" / "dume_build.json").read_text())
    for e in summary["experts"]:
        assert e["model"] == str(root / "base") and e["adapter"] == str(root / "adapters" / e["name"])
        assert json.loads((tmp_path / "lora" / "dume_build.json").read_text())
        assert (cache / e["merged"].rsplit("/", 1)[-1] / "dume_merged.json").is_file()
    card = (tmp_path / "lora" / "README.md").read_text()
    assert f"+ adapter `{root / 'adapters' / 'law'}`" in card


def test_a_wrong_base_is_refused_in_one_line_before_any_merge(setup, cache, tmp_path, capsys):
    root, _ = setup
    bad = tmp_path / "bad_adapter"
    import shutil

    shutil.copytree(root / "adapters" / "code", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(root / "other")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    experts = [_adapter_expert(root, "law"), _adapter_expert(root, "med"),
               _adapter_expert(root, "code", adapter=str(bad))]
    rc = _build(tmp_path, _config(root, tmp_path / "moe", experts))
    one_error_line(capsys, rc, str(bad), "was made on", str(root / "other"), "model:")
    assert not (tmp_path / "moe").exists()
    assert not cache.exists() or not any(cache.iterdir())  # law and med were not merged either


@pytest.mark.parametrize("breakage,needle", [
    ("missing", "no such adapter folder"),
    ("no_weights", "has no adapter weights"),
    ("corrupt_weights", "is corrupt"),
    ("corrupt_config", "corrupted JSON"),
    ("prompt_tuning", "is a PROMPT_TUNING adapter"),
])
def test_broken_or_unmergeable_adapters_are_one_line(setup, cache, tmp_path, capsys, breakage, needle):
    import shutil

    root, _ = setup
    bad = tmp_path / "bad_adapter"
    if breakage != "missing":
        shutil.copytree(root / "adapters" / "code", bad)
    if breakage == "no_weights":
        (bad / "adapter_model.safetensors").unlink()
    elif breakage == "corrupt_weights":
        raw = (bad / "adapter_model.safetensors").read_bytes()
        (bad / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 3])
    elif breakage == "corrupt_config":
        (bad / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    elif breakage == "prompt_tuning":
        (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    experts = [_adapter_expert(root, "law"), _adapter_expert(root, "code", adapter=str(bad))]
    rc = _build(tmp_path, _config(root, tmp_path / "moe", experts))
    one_error_line(capsys, rc, needle)
    assert not (tmp_path / "moe").exists() and (not cache.exists() or not any(cache.iterdir()))


def test_without_peft_an_adapter_is_one_line_naming_the_extra(setup, cache, tmp_path, capsys, monkeypatch):
    import sys

    root, _ = setup
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    rc = _build(tmp_path, _config(root, tmp_path / "moe", [_adapter_expert(root, n) for n in NAMES[:2]]))
    one_error_line(capsys, rc, "pip install 'dume[lora]'")
    assert not (tmp_path / "moe").exists()


def test_the_merged_cache_is_reused_and_a_changed_adapter_is_merged_again(setup, cache, tmp_path, watched_loads):
    import shutil

    root, _ = setup
    ad = tmp_path / "ad_law"
    shutil.copytree(root / "adapters" / "law", ad)
    experts = [_adapter_expert(root, "law", adapter=str(ad)), _adapter_expert(root, "med")]
    assert _build(tmp_path, _config(root, tmp_path / "a", experts)) == 0
    assert len(watched_loads) == 2 and len(list(cache.iterdir())) == 2
    assert _build(tmp_path, _config(root, tmp_path / "b", experts)) == 0
    assert len(watched_loads) == 2  # no second merge
    make_adapter(root / "base", ad, seed=99)  # retrained in place: same path, other weights
    assert _build(tmp_path, _config(root, tmp_path / "c", experts)) == 0
    assert len(watched_loads) == 3  # law merged again, med reused
    merged = {e["name"]: e["merged"] for e in json.loads((tmp_path / "c" / "dume_build.json").read_text())["experts"]}
    first = {e["name"]: e["merged"] for e in json.loads((tmp_path / "a" / "dume_build.json").read_text())["experts"]}
    assert merged["med"] == first["med"] and merged["law"] != first["law"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_full_expert_and_two_adapters_mix(setup, cache, tmp_path):
    from dume.moe.edit import read_gates

    root, tok = setup
    mixed = [_full_expert(root, "law"), _adapter_expert(root, "med"), _adapter_expert(root, "code")]
    assert _build(tmp_path, _config(root, tmp_path / "mixed", mixed), "mixed.yaml") == 0
    assert _build(tmp_path, _config(root, tmp_path / "by_hand", [_full_expert(root, n) for n in NAMES]),
                  "by_hand.yaml") == 0
    for got, want in zip(read_gates(tmp_path / "mixed"), read_gates(tmp_path / "by_hand")):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-6)
    experts = json.loads((tmp_path / "mixed" / "dume_build.json").read_text())["experts"]
    assert "adapter" not in experts[0] and experts[1]["adapter"] == str(root / "adapters" / "med")
