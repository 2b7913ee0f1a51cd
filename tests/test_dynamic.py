"""Dynamic experts (`dume_experts.py`, `dume/upcycle/dynamic.py`) on the tiny trained run.

The claims of docs/design.md §5, each checked against an independent construction:
keep-shared "add" = DUME collected from scratch through the same shared weights;
"reaverage" = the strategies script building DUME from all experts at once; "remove" =
solving the other domains' statistics; statistics from separate processes (and from an
`accelerate launch` of two) sum to the single-process ones. Bad input exits with status 2
and leaves every existing file as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clm_moerging_strategies_eval as strategies
import dume_experts
from dume.text.batches import document_batches
from dume.arch.table import is_routed
from dume.checkpoint.reader import CheckpointReader
from dume.moe.edit import read_gates
from dume.stats.ridge import RidgeStats
from tests.helpers import launch_cmd, one_error_line
from tests.fixtures import (  # noqa: F401  (pytest fixtures)
    DOMAINS,
    SEQ_LEN,
    copy_run,
    corpus_dir,
    datasets_cache,
    make_run,
    method_args,
    one_thread,
    run_script,
    single_thread,
    snapshot,
    trained_run,
)

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]
STATS_BATCH = 32  # the strategies script's --stats-batch-size default, which the stored statistics record


@pytest.fixture(scope="module")
def dyn(tmp_path_factory, trained_run, corpus_dir, datasets_cache) -> Path:
    """A private copy of the trained run with DUME built by the strategies script from
    code+math ("two") and from all three experts ("three")."""
    run_dir = copy_run(trained_run, tmp_path_factory.mktemp("dyn") / "run")
    with one_thread(datasets_cache):
        strategies.main(method_args(run_dir, corpus_dir, "DUME", "--domains", "code,math", "--tag", "two"))
        strategies.main(method_args(run_dir, corpus_dir, "DUME", "--tag", "three"))
    return run_dir


def _moe(run_dir: Path, name: str) -> Path:
    return run_dir / "models" / name


def _cli(*argv) -> int:
    return run_script(dume_experts.main, [str(a) for a in argv])


def _close(a, b, atol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as rd:
        return dict(rd.items())


def _expert(t: dict, layer: int, e: int, w: str) -> torch.Tensor:
    return t[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]


def _collect_reference(run_dir: Path, corpus: Path, experts: list[Path], domains: list[str],
                       shared_from: list[Path]) -> RidgeStats:
    """DUME's statistics from scratch, by the strategies script's own building blocks:
    domain i through "average of `shared_from`'s shared weights + expert i's MLPs"."""
    from dume.corpora import documents as data
    from dume.stats.oracle import collect_domain
    from dume.moe.merge import build_oracle_model, shared_state_dict

    run = make_run(run_dir, corpus)
    shared = shared_state_dict(shared_from)
    cfg = build_oracle_model(experts, 0, shared=shared).config
    stats = RidgeStats(cfg.num_hidden_layers, cfg.hidden_size, domains)
    for i, d in enumerate(domains):
        docs = data.load_documents(d, "train", "local", data_dir=corpus)
        batches = document_batches(docs, run.tokenizer, SEQ_LEN, STATS_BATCH)
        collect_domain(build_oracle_model(experts, i, shared=shared), stats, d, batches)
    return stats


# =============================================================================================
# add / remove / reweight are exact
# =============================================================================================


@pytest.fixture(scope="module")
def keep_shared(dyn, datasets_cache):
    out = _moe(dyn, "two_plus_history_keep")
    with one_thread(datasets_cache):
        assert _cli("add", "--moe", _moe(dyn, "DUME_two"), "--expert", dyn / "experts" / "history",
                    "--domain", "history", "--mode", "keep-shared", "--out", out) == 0
    return out


def test_keep_shared_add_equals_scratch_with_the_same_shared_weights(dyn, corpus_dir, keep_shared):
    from dume.routers.closed_form import dume_gates

    experts = [dyn / "experts" / d for d in DOMAINS]
    ref = _collect_reference(dyn, corpus_dir, experts, list(DOMAINS), shared_from=experts[:2])
    got = RidgeStats.load(keep_shared / "dume_stats")
    assert got.domains == list(DOMAINS)
    torch.testing.assert_close(got.A, ref.A, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.s, ref.s, rtol=1e-9, atol=1e-9)
    assert torch.equal(got.n, ref.n)
    _close(read_gates(keep_shared), dume_gates(ref, 0.01, 1.0))

    old, new = _tensors(_moe(dyn, "DUME_two")), _tensors(keep_shared)
    hist = _tensors(dyn / "experts" / "history")
    for n, t in old.items():  # shared tensors and the old experts: bit for bit
        if not n.endswith("gate.weight"):
            assert torch.equal(new[n], t), n
    for layer in range(2):
        for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            assert torch.equal(_expert(new, layer, 2, w), hist[f"model.layers.{layer}.mlp.{proj}.weight"])


def test_keep_shared_model_and_recipe(dyn, keep_shared, capsys):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    from dume.checkpoint.experts import shared_weights_fingerprint
    from dume.checkpoint.io import read_json

    model = AutoModelForCausalLM.from_pretrained(keep_shared)
    assert type(model) is MixtralForCausalLM and model.config.num_local_experts == 3
    from dume.moe.recipe import resolve_recipe_paths

    recipe = resolve_recipe_paths(read_json(keep_shared / "dume_router.json"), keep_shared)
    assert recipe["mode"] == "keep-shared" and recipe["domains"] == list(DOMAINS)
    assert recipe["experts"][-1] == str((dyn / "experts" / "history").resolve())
    assert recipe["shared_average_of"] == recipe["experts"][:2]
    assert RidgeStats.load(keep_shared / "dume_stats").model_fingerprint == shared_weights_fingerprint(keep_shared)
    assert shared_weights_fingerprint(keep_shared) == shared_weights_fingerprint(_moe(dyn, "DUME_two"))


def test_add_says_which_mode_ran(dyn, tmp_path, capsys):
    capsys.readouterr()
    assert _cli("add", "--moe", _moe(dyn, "DUME_two"), "--expert", dyn / "experts" / "history", "--domain",
                "history", "--mode", "keep-shared", "--out", tmp_path / "m") == 0
    out = capsys.readouterr().out
    assert "mode: keep-shared" in out and "OLD average" in out and "not averaged in" in out


def test_reaverage_add_equals_building_all_at_once(dyn, tmp_path, capsys):
    out = tmp_path / "reavg"
    capsys.readouterr()
    assert _cli("add", "--moe", _moe(dyn, "DUME_two"), "--expert", dyn / "experts" / "history",
                "--domain", "history", "--mode", "reaverage", "--out", out) == 0
    assert "mode: reaverage" in capsys.readouterr().out
    scratch = _moe(dyn, "DUME_three")  # the strategies script, all three experts at once
    a, b = _tensors(out), _tensors(scratch)
    assert set(a) == set(b)
    for n in a:
        if not n.endswith("gate.weight"):
            assert torch.equal(a[n], b[n]), n
    _close(read_gates(out), read_gates(scratch))
    got, ref = RidgeStats.load(out / "dume_stats"), RidgeStats.load(scratch / "dume_stats")
    assert got.model_fingerprint == ref.model_fingerprint
    torch.testing.assert_close(got.A, ref.A, rtol=1e-9, atol=1e-9)


def test_remove_equals_building_without_that_expert(dyn, tmp_path):
    from dume.routers.closed_form import dume_gates

    src, out = _moe(dyn, "DUME_three"), tmp_path / "no_math"
    assert _cli("remove", "--moe", src, "--domain", "math", "--out", out) == 0
    stats = RidgeStats.load(src / "dume_stats")
    expected = stats.select(["code", "history"])
    assert torch.equal(torch.stack(read_gates(out)), torch.stack(dume_gates(expected, 0.01, 1.0)))
    kept = RidgeStats.load(out / "dume_stats")
    assert kept.domains == ["code", "history"] and torch.equal(kept.A, expected.A) and torch.equal(kept.s, expected.s)
    old, new = _tensors(src), _tensors(out)
    for n, t in old.items():
        if not is_routed(n):
            assert torch.equal(new[n], t), n
    for layer in range(2):
        for w in ("w1", "w2", "w3"):
            assert torch.equal(_expert(new, layer, 0, w), _expert(old, layer, 0, w))
            assert torch.equal(_expert(new, layer, 1, w), _expert(old, layer, 2, w))
    assert not any(".experts.2." in n for n in new)


def test_reweight_scales_statistics(dyn, tmp_path):
    from dume.checkpoint.io import read_json
    from dume.routers.closed_form import dume_gates

    src, out = _moe(dyn, "DUME_three"), tmp_path / "rw"
    assert _cli("reweight", "--moe", src, "--weights", "code=2,math=0.5", "--out", out) == 0
    stats = RidgeStats.load(src / "dume_stats").scale_domain("code", 2).scale_domain("math", 0.5)
    assert torch.equal(torch.stack(read_gates(out)), torch.stack(dume_gates(stats, 0.01, 1.0)))
    assert not torch.allclose(torch.stack(read_gates(out)), torch.stack(read_gates(src)))
    old, new = _tensors(src), _tensors(out)
    assert all(torch.equal(new[n], t) for n, t in old.items() if not n.endswith("gate.weight"))
    assert read_json(out / "dume_router.json")["domain_weights"] == {"code": 2.0, "math": 0.5}


def test_remove_down_to_one_expert_then_the_last_is_refused(dyn, tmp_path, capsys):
    one = tmp_path / "one"
    assert _cli("remove", "--moe", _moe(dyn, "DUME_two"), "--domain", "code", "--out", one) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(one).config.num_local_experts == 1
    before = snapshot(tmp_path)
    _expect_error(capsys, ["remove", "--moe", one, "--domain", "math", "--out", tmp_path / "none"], "last expert")
    assert snapshot(tmp_path) == before


# =============================================================================================
# statistics collected apart
# =============================================================================================


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
    return {**os.environ, "DUME_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def apart(dyn, tmp_path_factory) -> Path:
    """Three separate processes at once: code and history of DUME_three through their own
    experts, and history as a *new* expert of DUME_two (a domain owner's view)."""
    out = tmp_path_factory.mktemp("apart")
    jobs = {
        "code": ["--moe", _moe(dyn, "DUME_three"), "--domain", "code"],
        "history": ["--moe", _moe(dyn, "DUME_three"), "--domain", "history"],
        "new_history": ["--moe", _moe(dyn, "DUME_two"), "--domain", "history", "--expert", dyn / "experts" / "history"],
    }
    procs = {k: subprocess.Popen([sys.executable, "dume_experts.py", "collect", *map(str, v), "--out", str(out / k)],
                                 cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, v in jobs.items()}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, (k, stderr[-2000:])
    return out


def test_separate_processes_combined_equal_one_process(dyn, apart, tmp_path):
    assert _cli("combine", apart / "code", apart / "history", "--out", tmp_path / "sum") == 0
    got = RidgeStats.load(tmp_path / "sum")
    one = RidgeStats.load(_moe(dyn, "DUME_three") / "dume_stats").select(["code", "history"])
    assert got.domains == one.domains and got.model_fingerprint == one.model_fingerprint
    torch.testing.assert_close(got.A, one.A, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.s, one.s, rtol=1e-9, atol=1e-9)
    assert torch.equal(got.n, one.n)


def test_new_expert_collected_apart_then_added(dyn, apart, keep_shared, tmp_path):
    out = tmp_path / "m"
    assert _cli("add", "--moe", _moe(dyn, "DUME_two"), "--expert", dyn / "experts" / "history", "--domain",
                "history", "--mode", "keep-shared", "--stats", apart / "new_history", "--out", out) == 0
    _close(read_gates(out), read_gates(keep_shared), atol=1e-7)


def test_accelerate_launch_two_processes_equals_one(dyn, apart, tmp_path):
    """No config file: torchrun's launcher (`--multi_gpu`) starts two CPU processes, gloo joins them."""
    out = tmp_path / "acc"
    cmd = launch_cmd("dume_experts.py", "collect", "--moe", str(_moe(dyn, "DUME_three")), "--domain", "code",
                     "--out", str(out))
    env = {**_env(), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    got, one = RidgeStats.load(out), RidgeStats.load(apart / "code")
    assert got.meta["per_domain"]["code"]["processes"] == 2
    assert torch.equal(got.n, one.n)  # every document counted exactly once
    # Each process sums other batches' float32 XᵀX into the float64 totals: equal to ~1e-6 relative.
    torch.testing.assert_close(got.A, one.A, rtol=1e-5, atol=1e-6 * float(one.A.abs().max()))
    torch.testing.assert_close(got.s, one.s, rtol=1e-5, atol=1e-6 * float(one.s.abs().max()))


# =============================================================================================
# bad input: one clear error, exit 2, nothing changed
# =============================================================================================


def _expect_error(capsys, argv, *needles) -> str:
    capsys.readouterr()
    return one_error_line(capsys, _cli(*argv), *needles)


def _llama_like(dst: Path, run_dir: Path, **config) -> Path:
    """A random Llama shaped like the run's experts except for `config`, with their tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaConfig.from_pretrained(run_dir / "experts" / "history")
    fields = {k: v for k, v in base.to_dict().items() if k != "head_dim"}
    LlamaForCausalLM(LlamaConfig(**{**fields, **config})).save_pretrained(dst)
    for f in (run_dir / "tokenizer").iterdir():
        shutil.copy2(f, dst / f.name)
    return dst


def _other_tokenizer(dst: Path, run_dir: Path) -> Path:
    """The history expert with another BPE (same vocabulary size) saved beside it."""
    from tests.helpers import tiny_tokenizer

    shutil.copytree(run_dir / "experts" / "history", dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).unlink(missing_ok=True)
    tiny_tokenizer(vocab_size=250).save_pretrained(dst)
    return dst


def _tampered(dst: Path, run_dir: Path) -> Path:
    """DUME_two whose stored statistics claim another model."""
    shutil.copytree(_moe(run_dir, "DUME_two"), dst)
    stats = RidgeStats.load(dst / "dume_stats")
    stats.model_fingerprint = "0123456789abcdef"
    stats.save(dst / "dume_stats")
    return dst


def test_bad_architecture_is_refused(dyn, tmp_path, capsys):
    expert = _llama_like(tmp_path / "wide", dyn, hidden_size=64, intermediate_size=128)
    before = snapshot(dyn)
    for mode in ("keep-shared", "reaverage"):
        _expect_error(capsys, ["add", "--moe", _moe(dyn, "DUME_two"), "--expert", expert, "--domain", "history",
                               "--mode", mode, "--out", tmp_path / "out"], "hidden_size", str(expert))
    _expect_error(capsys, ["collect", "--moe", _moe(dyn, "DUME_two"), "--expert", expert, "--domain", "history",
                           "--out", tmp_path / "s"], "hidden_size")
    assert snapshot(dyn) == before and not (tmp_path / "out").exists() and not (tmp_path / "s").exists()


def test_other_tokenizer_is_refused(dyn, tmp_path, capsys):
    expert = _other_tokenizer(tmp_path / "tok", dyn)
    before = snapshot(dyn)
    _expect_error(capsys, ["add", "--moe", _moe(dyn, "DUME_two"), "--expert", expert, "--domain", "history",
                           "--mode", "keep-shared", "--out", tmp_path / "out"], "different tokenizer")
    assert snapshot(dyn) == before and not (tmp_path / "out").exists()


def test_statistics_of_another_model_are_refused(dyn, apart, tmp_path, capsys):
    before = snapshot(dyn)
    # history collected through DUME_three's shared weights, offered to DUME_two
    _expect_error(capsys, ["add", "--moe", _moe(dyn, "DUME_two"), "--expert", dyn / "experts" / "history",
                           "--domain", "history", "--mode", "keep-shared", "--stats", apart / "history",
                           "--out", tmp_path / "out"], "another model")
    _expect_error(capsys, ["combine", apart / "code", apart / "new_history", "--out", tmp_path / "sum"],
                  "different models")
    bad = _tampered(tmp_path / "tampered", dyn)
    bad_before = snapshot(bad)
    for argv in (["remove", "--moe", bad, "--domain", "code"], ["reweight", "--moe", bad, "--weights", "code=2"],
                 ["add", "--moe", bad, "--expert", dyn / "experts" / "history", "--domain", "history",
                  "--mode", "keep-shared"]):
        _expect_error(capsys, [*argv, "--out", tmp_path / "out"], "another model")
    assert snapshot(dyn) == before and snapshot(bad) == bad_before
    assert not (tmp_path / "out").exists() and not (tmp_path / "sum").exists()


@pytest.mark.parametrize("argv, needle", [
    (["remove", "--moe", "{two}", "--domain", "physics", "--out", "{tmp}/o"], "no expert for domain 'physics'"),
    (["add", "--moe", "{two}", "--expert", "{run}/experts/math", "--domain", "math", "--mode", "keep-shared",
      "--out", "{tmp}/o"], "already has an expert"),
    (["remove", "--moe", "{two}", "--domain", "code", "--out", "{two}"], "is the input"),
    (["reweight", "--moe", "{two}", "--weights", "code=0", "--out", "{tmp}/o"], "use remove"),
    (["reweight", "--moe", "{two}", "--weights", "physics=2", "--out", "{tmp}/o"], "'physics'"),
    (["collect", "--moe", "{two}", "--domain", "history", "--out", "{tmp}/o"], "--expert"),
    (["collect", "--moe", "{two}", "--domain", "code", "--num-dume-tokens", "4", "--out", "{tmp}/o"],
     "would not combine"),
])
def test_bad_requests_are_refused(dyn, tmp_path, capsys, argv, needle):
    argv = [a.format(two=_moe(dyn, "DUME_two"), run=dyn, tmp=tmp_path) for a in argv]
    before = snapshot(dyn)
    _expect_error(capsys, argv, needle)
    assert snapshot(dyn) == before and not (tmp_path / "o").exists()


def test_model_without_a_recipe_is_refused(dyn, tmp_path, capsys):
    """A MoE whose router cannot be re-solved (no recipe, e.g. built before recipes existed)."""
    moe = tmp_path / "no_recipe"
    shutil.copytree(_moe(dyn, "DUME_two"), moe)
    (moe / "dume_router.json").unlink()
    before = snapshot(tmp_path)
    _expect_error(capsys, ["remove", "--moe", moe, "--domain", "code", "--out", tmp_path / "o"], "dume_router.json")
    assert snapshot(tmp_path) == before


# =============================================================================================
# the experiment recipe
# =============================================================================================


def test_experiment_recipe_end_to_end(dyn, corpus_dir, capsys):
    """clm_dynamic_experts.py on the tiny run: every row, reaverage = all at once, and
    Table 2 (results/*.json) gains no row from it."""
    import json

    import clm_dynamic_experts
    import clm_experts_eval
    from dume.report.clm_table import gather_clm_methods
    from tests.fixtures import base_args

    clm_experts_eval.main(base_args(dyn, corpus_dir))
    table_before = gather_clm_methods(dyn / "results")[1].keys()
    results_before = sorted(p.name for p in (dyn / "results").glob("*.json"))
    assert run_script(clm_dynamic_experts.main, base_args(dyn, corpus_dir)) == 0
    doc = json.loads((dyn / "results" / "dynamic" / "dynamic_experts.json").read_text())
    assert doc["table"] == "dynamic" and doc["new_domain"] == doc["removed_domain"] == "history"
    rows = doc["rows"]
    assert list(rows) == ["base", "add_keep_shared", "add_reaverage", "all_at_once", "remove"]
    assert rows["base"]["experts"] == rows["remove"]["experts"] == ["code", "math"]
    for row in rows.values():
        assert set(row["perplexity"]) == set(DOMAINS) and row["average_own_domains"] > 0
    assert doc["checks"]["reaverage_vs_all_at_once"]["non_router_tensors_identical"]
    assert doc["checks"]["reaverage_vs_all_at_once"]["router_max_abs_diff"] < 1e-6
    for d in DOMAINS:  # the same model, so the same perplexity
        assert rows["add_reaverage"]["perplexity"][d] == pytest.approx(rows["all_at_once"]["perplexity"][d], rel=1e-5)
    md = (dyn / "dynamic_table.md").read_text()
    assert "add, keep-shared" in md and "add, reaverage" in md and "†" in md
    assert gather_clm_methods(dyn / "results")[1].keys() == table_before
    assert sorted(p.name for p in (dyn / "results").glob("*.json")) == results_before
