"""LoRA experts in `dume build` (issue 23): `model: BASE` + `adapter: A`, merged with peft's own merge, one
expert at a time, into a cache keyed by content; refused in one line before any work when the adapter cannot
be merged into that base."""

from __future__ import annotations

import gc
import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch

from helpers import launch_cmd, one_error_line, tiny_llama, tiny_tokenizer

# The `test` extra installs peft; without it only the refusal that names the extra can run.
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")

REPO = Path(__file__).resolve().parents[1]
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
                                                   for i in range(12)))
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


@pytest.fixture(scope="module")
def by_hand(setup, tmp_path_factory):
    """The MoE built from the three checkpoints merged by hand: what the adapters' builds must equal."""
    root, _ = setup
    where = tmp_path_factory.mktemp("by_hand")
    assert _build(where, _config(root, where / "moe", [_full_expert(root, n) for n in NAMES])) == 0
    return where / "moe"


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


@needs_peft
def test_adapters_build_equals_the_build_from_checkpoints_merged_by_hand(setup, by_hand, cache, tmp_path,
                                                                          watched_loads):
    """The issue's Must-show: base + three adapters gives the MoE of the three peft-merged checkpoints."""
    from dume.moe.edit import read_gates

    root, tok = setup
    assert _build(tmp_path, _config(root, tmp_path / "lora", [_adapter_expert(root, n) for n in NAMES])) == 0
    assert len(watched_loads) == 3 and all(r() is None for r in watched_loads)
    for got, want in zip(read_gates(tmp_path / "lora"), read_gates(by_hand)):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-6)
    ids = tok("The patient case 3 of the court", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(_logits(tmp_path / "lora", ids), _logits(by_hand, ids),
                               rtol=0, atol=1e-5)
    # the merge changed both shared and expert weights (else the test could pass on the base alone)
    from dume.checkpoint.reader import CheckpointReader

    with CheckpointReader(root / "base") as b, CheckpointReader(root / "merged" / "law") as m:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            assert not torch.equal(b.get(name), m.get(name))
    summary = json.loads((tmp_path / "lora" / "dume_build.json").read_text())
    for e in summary["experts"]:
        assert e["model"] == str(root / "base") and e["adapter"] == str(root / "adapters" / e["name"])
        assert (cache / e["merged"].rsplit("/", 1)[-1] / "dume_merged.json").is_file()
    card = (tmp_path / "lora" / "README.md").read_text()
    assert f"+ adapter `{root / 'adapters' / 'law'}`" in card


@needs_peft
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


@needs_peft
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


def test_without_peft_an_adapter_is_one_line_naming_the_extra(cache, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, installed or not
    tiny_llama(max_position_embeddings=256).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "law.txt").write_text("The court ruled.\n\nThe statute applies.")
    experts = [{"name": n, "model": str(tmp_path / "base"), "adapter": str(tmp_path / "ad"),
                "data": str(tmp_path / "law.txt")} for n in ("a", "b")]
    rc = _build(tmp_path, _config(tmp_path, tmp_path / "moe", experts))
    one_error_line(capsys, rc, "pip install 'dume[lora]'")
    assert not (tmp_path / "moe").exists()


@needs_peft
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


@needs_peft
def test_a_full_expert_and_two_adapters_mix(setup, by_hand, cache, tmp_path):
    from dume.moe.edit import read_gates

    root, _ = setup
    mixed = [_full_expert(root, "law"), _adapter_expert(root, "med"), _adapter_expert(root, "code")]
    assert _build(tmp_path, _config(root, tmp_path / "mixed", mixed), "mixed.yaml") == 0
    for got, want in zip(read_gates(tmp_path / "mixed"), read_gates(by_hand)):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-6)
    experts = json.loads((tmp_path / "mixed" / "dume_build.json").read_text())["experts"]
    assert "adapter" not in experts[0] and experts[1]["adapter"] == str(root / "adapters" / "med")


def _hub_repo(hub_cache, repo_id: str, src):
    """`src` laid out as a cached hub snapshot of `repo_id` (refs/main -> snapshots/<commit>)."""
    import shutil

    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


@needs_peft
def test_hub_ids_resolve_from_the_cache_and_a_recorded_hub_base_matches(setup, cache, tmp_path, monkeypatch,
                                                                        capsys):
    """`model:` and `adapter:` as hub ids, offline, from the hub cache; the adapter's recorded base is the hub
    id (case aside) or nothing (a printed note). The merged experts are the checkpoints merged by hand."""
    import huggingface_hub.constants

    from dume.checkpoint.reader import CheckpointReader

    root, _ = setup
    hub = tmp_path / "hub"
    _hub_repo(hub, "tiny/base", root / "base")
    for n, recorded in (("law", "Tiny/Base"), ("med", None)):
        snap = _hub_repo(hub, f"tiny/{n}-lora", root / "adapters" / n)
        cfg = json.loads((snap / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = recorded
        (snap / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    experts = [_adapter_expert(root, n, model="tiny/base", adapter=f"tiny/{n}-lora") for n in ("law", "med")]
    assert _build(tmp_path, _config(root, tmp_path / "moe", experts)) == 0
    out = capsys.readouterr().out
    assert "note: med: adapter tiny/med-lora records no base model" in out
    assert "note: law" not in out
    for e in json.loads((tmp_path / "moe" / "dume_build.json").read_text())["experts"]:
        assert e["model"] == "tiny/base" and e["adapter"] == f"tiny/{e['name']}-lora"
        with CheckpointReader(e["merged"]) as got, CheckpointReader(root / "merged" / e["name"]) as want:
            assert sorted(got.keys()) == sorted(want.keys())
            for name in want.keys():  # noqa: SIM118 (a reader, not a dict)
                torch.testing.assert_close(got.get(name), want.get(name), rtol=0, atol=0)


@needs_peft
def test_the_recorded_base_is_compared_sensibly(setup, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    from dume.checkpoint.adapters import base_mismatch
    from dume.errors import DumeError

    root, _ = setup
    base = root / "base"
    copy = tmp_path / "copy_of_base"
    shutil.copytree(base, copy)
    (copy / "dume_fingerprint.json").unlink(missing_ok=True)
    hub = tmp_path / "hub"
    snap = _hub_repo(hub, "tiny/base", base)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    same = [(str(base), str(base), base), (str(base) + "/", str(base), base),  # the same string
            (str(copy), str(base), base),                  # another folder with the same tensors
            ("TINY/base", "tiny/base", snap),              # the same hub id
            ("tiny/base", str(snap), snap),                # model: the cached snapshot of that id
            ("tiny/base", str(copy), copy)]                # the id is cached: its tensors are the copy's
    for recorded, given, path in same:
        assert base_mismatch("a", recorded, given, path) is None, (recorded, given)
    for recorded, given, path in ((str(root / "other"), str(base), base), ("tiny/base", str(root / "other"),
                                                                           root / "other"),
                                  ("someone/else", "tiny/base", snap)):
        with pytest.raises(DumeError, match="was made on"):
            base_mismatch("a", recorded, given, path)
    # not here to compare: accepted with a note
    assert "not here to compare" in base_mismatch("a", "someone/uncached", str(base), base)
    assert "not here to compare" in base_mismatch("a", "/gone/llama", str(base), base)
    assert "records no base" in base_mismatch("a", None, str(base), base)


class Interrupted(Exception):
    pass


@needs_peft
def test_an_interrupted_merge_leaves_nothing_and_the_rerun_merges(setup, cache, tmp_path, monkeypatch,
                                                                   watched_loads):
    from dume.checkpoint import adapters

    root, _ = setup
    real = adapters.merge_into

    def dies_after_saving(adapter, stage, dtype):
        real(adapter, stage, dtype)  # the weights are written, the record is not
        raise Interrupted

    monkeypatch.setattr(adapters, "merge_into", dies_after_saving)
    experts = [_adapter_expert(root, n) for n in ("law", "med")]
    with pytest.raises(Interrupted):
        _build(tmp_path, _config(root, tmp_path / "moe", experts))
    assert not (tmp_path / "moe").exists()
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.endswith(".lock")]
    monkeypatch.setattr(adapters, "merge_into", real)
    assert _build(tmp_path, _config(root, tmp_path / "moe", experts)) == 0
    assert len(watched_loads) == 3  # the interrupted one, then both merged for real


@needs_peft
def test_a_bf16_base_is_merged_in_bf16_rounding_once(setup, cache, tmp_path):
    """The merge runs in the base's stored dtype: for a bf16 base, peft adds the float32 low-rank product in
    place, so the bf16 merge is the float32 merge rounded to bf16, element for element. The merged folder holds
    the base's tokenizer files and generation config as they are."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    from dume.checkpoint.adapters import check_adapter, merged_expert
    from dume.checkpoint.reader import CheckpointReader

    root, tok = setup
    base = tmp_path / "bf16_base"
    tiny_llama(seed=3, max_position_embeddings=256).to(torch.bfloat16).save_pretrained(base)
    tok.save_pretrained(base)
    GenerationConfig(max_new_tokens=7, do_sample=False).save_pretrained(base)
    ad = make_adapter(base, tmp_path / "bf16_adapter", seed=5)
    merged = merged_expert(check_adapter(str(ad), ad, str(base), base), log=lambda *_: None)
    f32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                    str(ad)).merge_and_unload().state_dict()
    with CheckpointReader(merged) as rd, CheckpointReader(base) as b:
        changed = 0
        for name in rd.keys():  # noqa: SIM118 (a reader, not a dict)
            t = rd.get(name)
            assert t.dtype == torch.bfloat16, name
            assert torch.equal(t, f32[name].to(torch.bfloat16)), name
            changed += not torch.equal(t, b.get(name))
        assert changed == 2 * 5  # two layers, five target modules each
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (merged / name).read_bytes() == (base / name).read_bytes(), name
    # the base's generation config is part of what the merge is keyed by: changed, it is merged (copied) again
    GenerationConfig(max_new_tokens=9, do_sample=False).save_pretrained(base)
    again = merged_expert(check_adapter(str(ad), ad, str(base), base), log=lambda *_: None)
    assert again != merged and (again / "generation_config.json").read_bytes() == (
        base / "generation_config.json").read_bytes()


@needs_peft
def test_a_merge_that_cannot_fit_on_disk_is_one_line_and_writes_nothing(setup, cache, monkeypatch):
    import collections

    from dume.checkpoint import outputs
    from dume.checkpoint.adapters import check_adapter, merged_expert
    from dume.errors import DumeError

    root, _ = setup
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    ad = root / "adapters" / "law"
    with pytest.raises(DumeError, match="not enough disk for the merge of adapter"):
        merged_expert(check_adapter(str(ad), ad, str(root / "base"), root / "base"), log=lambda *_: None)
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def _two_experts_and_code_data(root, tmp_path) -> Path:
    """A MoE of the law and med experts (merged by hand) in tmp_path/two, and the code documents as a local
    data dir: what adding or collecting the code adapter needs."""
    experts = [_full_expert(root, "law"), _full_expert(root, "med")]
    assert _build(tmp_path, _config(root, tmp_path / "two", experts)) == 0
    (tmp_path / "data" / "code").mkdir(parents=True)
    docs = (root / "data" / "code.txt").read_text().split("\n\n")
    (tmp_path / "data" / "code" / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return tmp_path / "two"


def test_dume_experts_add_takes_an_adapter_as_its_merged_checkpoint(setup, cache, tmp_path, capsys):
    """`dume_experts.py add --expert BASE --adapter A` gives the MoE `add --expert MERGED` gives, and an output
    inside the adapter's folder is refused before any merge."""
    import dume_experts
    from dume.moe.edit import read_gates
    from tests.fixtures import run_script

    root, _ = setup
    add = ["add", "--moe", str(_two_experts_and_code_data(root, tmp_path)), "--domain", "code", "--mode",
           "keep-shared", "--source", "local", "--data-dir", str(tmp_path / "data")]
    inside = root / "adapters" / "code" / "out"
    assert run_script(dume_experts.main, [*add, "--expert", str(root / "base"), "--adapter",
                                          str(root / "adapters" / "code"), "--out", str(inside)]) == 2
    assert "lies inside" in capsys.readouterr().err and not inside.exists() and not cache.exists()
    assert run_script(dume_experts.main, [*add, "--expert", str(root / "merged" / "code"),
                                          "--out", str(tmp_path / "by_hand")]) == 0
    assert run_script(dume_experts.main, [*add, "--expert", str(root / "base"), "--adapter",
                                          str(root / "adapters" / "code"), "--out", str(tmp_path / "adapter")]) == 0
    assert "merging it into" in capsys.readouterr().out
    for got, want in zip(read_gates(tmp_path / "adapter"), read_gates(tmp_path / "by_hand")):
        assert got.shape[0] == 3
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-6)
    ids = torch.arange(30).view(1, -1) % 200
    torch.testing.assert_close(_logits(tmp_path / "adapter", ids), _logits(tmp_path / "by_hand", ids),
                               rtol=0, atol=1e-5)


def test_collect_of_an_adapter_under_two_processes_merges_once_and_equals_one_process(setup, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 dume_experts.py collect --adapter` (gloo on the CPU): rank 0
    merges while the other waits and reuses the merge (a launch's other ranks skip the cache's lock: without the
    wait both merged into the same folder and rank 1 failed), and the statistics equal one process's."""
    import os
    import subprocess
    import sys

    from dume.stats.ridge import RidgeStats

    root, _ = setup
    argv = ["dume_experts.py", "collect", "--moe", str(_two_experts_and_code_data(root, tmp_path)), "--domain",
            "code", "--expert", str(root / "base"), "--adapter", str(root / "adapters" / "code"), "--source",
            "local", "--data-dir", str(tmp_path / "data")]
    stats, logs = {}, {}
    for n, cmd in ((1, [sys.executable, *argv]), (2, launch_cmd(*argv))):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DUME_THREADS": "1", "DUME_CACHE": str(tmp_path / f"c{n}"),
               "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
        p = subprocess.run([*cmd, "--out", str(tmp_path / f"stats{n}")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        logs[n], stats[n] = p.stdout, RidgeStats.load(tmp_path / f"stats{n}")
        merges = [d for d in (tmp_path / f"c{n}" / "merged_adapters").iterdir() if not d.name.endswith(".lock")]
        assert len(merges) == 1
    assert logs[2].count("merging it into") == 1 and logs[2].count("reusing its merge") == 1
    one, two = stats[1], stats[2]
    assert two.meta["per_domain"]["code"]["processes"] == 2 and torch.equal(one.n, two.n)
    torch.testing.assert_close(two.A, one.A, rtol=1e-5, atol=1e-6 * float(one.A.abs().max()))
    torch.testing.assert_close(two.s, one.s, rtol=1e-5, atol=1e-6 * float(one.s.abs().max()))
