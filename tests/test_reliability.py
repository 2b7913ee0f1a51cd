"""No silent wrong results: every cached artefact belongs to what it was computed from.

Each test reproduces a case where the scripts used to exit 0 with a stale or broken
result, on a copy of the tiny finished run:

- an MLP-only change of one expert -> DUME's statistics (and result) are recomputed,
  never reused (the shared-weight fingerprint alone does not see the change);
- a NaN in an expert -> exit 2 naming the tensor, nothing written;
- SIGKILL during `--redo` of BTX -> the previous model and results intact and
  consistent; a plain rerun finishes the job;
- a moved run directory still works (skips what is done, reuses caches, resolves the
  recipe's experts);
- results are strict JSON; content fingerprints see every tensor and are cached.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import clm_moerging_strategies_eval as strategies
import clm_weights_avg_eval
from dume.errors import DumeError
from dume.checkpoint.fingerprint import FINGERPRINT_FILE, content_fingerprint, fingerprint
from dume.checkpoint.io import atomic_write_json
from dume.stats.ridge import RidgeStats
from tests.helpers import one_error_line
from tests.fixtures import (  # noqa: F401  (pytest fixtures)
    base_args,
    copy_run,
    corpus_dir,
    datasets_cache,
    method_args,
    run_script,
    single_thread,
    snapshot,
    strategy_run,
    trained_run,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")
STATS_KEY = "tokens-all_steps-all"
DOWN = "model.layers.0.mlp.down_proj.weight"


def _edit_expert(expert_dir: Path, name: str, fn) -> None:
    """Rewrite one tensor of a saved expert in place (as a user's script would)."""
    path = expert_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name] = fn(tensors[name].clone())
    save_file(tensors, str(path), metadata={"format": "pt"})


def _result(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "results" / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------- fingerprints


def test_fingerprint_sees_an_mlp_only_change_and_is_cached(tmp_path, trained_run):
    from dume.checkpoint.experts import shared_weights_fingerprint

    expert = copy_run(trained_run / "experts" / "math", tmp_path / "math")
    before = content_fingerprint(expert)
    assert (expert / FINGERPRINT_FILE).is_file()  # stored beside the weights when saved
    shared_before = shared_weights_fingerprint(expert)
    _edit_expert(expert, DOWN, lambda t: t * 1.01)
    after = content_fingerprint(expert)
    assert after.digest != before.digest
    assert [n for n in after.tensors if after.tensors[n] != before.tensors[n]] == [DOWN]
    assert shared_weights_fingerprint(expert) == shared_before  # why the old cache key missed it
    # The stored record is reused while the files' stamps stay; a forged record with
    # stale stamps is not trusted.
    rec = json.loads((expert / FINGERPRINT_FILE).read_text())
    assert rec["digest"] == after.digest
    rec["stamps"]["model.safetensors"][1] -= 1
    rec["digest"] = "0" * 16
    (expert / FINGERPRINT_FILE).write_text(json.dumps(rec))
    import dume.checkpoint.fingerprint as fpmod

    fpmod._MEMO.clear()
    assert fingerprint(expert) == after.digest


def test_results_are_strict_json(tmp_path):
    with pytest.raises(DumeError, match=r"non-finite value at results\.math\.perplexity"):
        atomic_write_json(tmp_path / "r.json", {"results": {"math": {"perplexity": float("nan")}}})
    assert not (tmp_path / "r.json").exists()
    atomic_write_json(tmp_path / "r.json", {"x": 1.5})
    json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c))


# -------------------------------------------------------------------------------- stale caches


def test_mlp_only_change_recomputes_statistics_and_result(tmp_path, strategy_run, corpus_dir, capsys):
    run_dir = copy_run(strategy_run, tmp_path / "run")
    old_stats = RidgeStats.load(run_dir / "stats" / STATS_KEY)
    old_result = _result(run_dir, "DUME")
    _edit_expert(run_dir / "experts" / "math", DOWN, lambda t: t * 3.0)

    capsys.readouterr()
    assert run_script(strategies.main, method_args(run_dir, corpus_dir, "DUME")) == 0  # no --redo
    out = capsys.readouterr().out
    assert "it was computed from another math expert" in out and "recomputing" in out
    assert "differ in expert_fingerprints" in out and "using cached statistics" not in out
    new_stats = RidgeStats.load(run_dir / "stats" / STATS_KEY)
    assert new_stats.meta["expert_fingerprints"][1] == fingerprint(run_dir / "experts" / "math")
    assert new_stats.meta["expert_fingerprints"] != old_stats.meta["expert_fingerprints"]
    # Layer 1's inputs pass through the changed layer-0 MLP of math only: its sums changed.
    i = new_stats.domains.index("math")
    assert not torch.allclose(new_stats.s[1, :, i], old_stats.s[1, :, i])
    # The MoE base was rebuilt with the new MLP, so the DUME model holds it.
    from dume.moe.edit import expert_mlp_state_dict

    mlp = expert_mlp_state_dict(run_dir / "models" / "DUME", expert=1)
    assert torch.equal(mlp[DOWN], load_file(str(run_dir / "experts" / "math" / "model.safetensors"))[DOWN])
    new_result = _result(run_dir, "DUME")
    assert new_result["results"] != old_result["results"]
    assert new_result["fingerprints"]["models"]["model"] == fingerprint(run_dir / "models" / "DUME")
    # And now it is current: a plain rerun skips.
    capsys.readouterr()
    assert run_script(strategies.main, method_args(run_dir, corpus_dir, "DUME")) == 0
    assert "exists; skipping" in capsys.readouterr().out


def test_nan_expert_is_refused_naming_the_tensor(tmp_path, strategy_run, corpus_dir, capsys):
    run_dir = copy_run(strategy_run, tmp_path / "run")
    _edit_expert(run_dir / "experts" / "history", DOWN, lambda t: t.fill_(float("nan")))
    before = snapshot(run_dir)
    for main, argv in ((strategies.main, method_args(run_dir, corpus_dir, "DUME", "--redo")),
                       (strategies.main, method_args(run_dir, corpus_dir, "DUME", "--tag", "nan")),
                       (strategies.main, method_args(run_dir, corpus_dir, "oracle", "--redo")),
                       (clm_weights_avg_eval.main, base_args(run_dir, corpus_dir, "--redo"))):
        capsys.readouterr()
        one_error_line(capsys, run_script(main, argv), "expert 2", "history", DOWN, "non-finite")
        assert snapshot(run_dir) == before  # nothing written, not even a fingerprint record
    assert not (run_dir / "models" / "DUME_nan").exists()


def test_non_finite_perplexity_is_an_error_naming_the_domain(strategy_run, corpus_dir, monkeypatch):
    from tests.fixtures import make_run

    run = make_run(strategy_run, corpus_dir)

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            logits = torch.full((*input_ids.shape, 300), float("nan"))
            return type("Out", (), {"logits": logits})()

    with pytest.raises(DumeError, match="non-finite perplexity on domain math"):
        run.evaluate(Broken(), ["math"], label="broken")


# ------------------------------------------------------------------------ interrupted --redo


def test_sigkill_during_btx_redo_keeps_the_previous_model_then_a_plain_rerun_finishes(
        tmp_path, strategy_run, corpus_dir, datasets_cache):
    run_dir = copy_run(strategy_run, tmp_path / "run")
    model_dir = run_dir / "models" / "BTX"
    old_fp = fingerprint(model_dir)
    old_result = (run_dir / "results" / "BTX.json").read_bytes()
    assert _result(run_dir, "BTX")["fingerprints"]["models"]["model"] == old_fp

    argv = method_args(run_dir, corpus_dir, "BTX", "--redo")
    argv[argv.index("--num-steps") + 1] = "1000000"
    env = {**os.environ, "DUME_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(datasets_cache)}
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-u", "clm_moerging_strategies_eval.py", *argv], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        watchdog = threading.Timer(180, proc.kill)  # never hang the suite
        watchdog.start()
        try:
            # Training has begun once the staged model holds its untrained router.
            deadline = time.time() + 170
            while time.time() < deadline and proc.poll() is None:
                staged = [p for p in model_dir.parent.glob(".BTX.tmp-*") if (p / "config.json").is_file()]
                if staged and any(staged[0].glob("*.safetensors")):
                    break
                time.sleep(0.2)
            time.sleep(2.0)
            assert proc.poll() is None, (tmp_path / "out.txt").read_text()
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # The previous model and its results: untouched and still together.
    assert fingerprint(model_dir) == old_fp
    assert (run_dir / "results" / "BTX.json").read_bytes() == old_result
    assert (run_dir / "results" / ".BTX.pending").is_file()

    # A plain rerun (no --redo) sees the interrupted run and finishes it.
    out = subprocess.run([sys.executable, "clm_moerging_strategies_eval.py",
                          *method_args(run_dir, corpus_dir, "BTX")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "interrupted; finishing it" in out.stdout
    assert not list(model_dir.parent.glob(".BTX.tmp-*"))  # the killed run's staging is cleaned
    assert not (run_dir / "results" / ".BTX.pending").exists()
    new = _result(run_dir, "BTX")
    assert new["fingerprints"]["models"]["model"] == fingerprint(model_dir)
    assert (model_dir / "dume_router.json").is_file()


def test_result_whose_model_changed_is_recomputed(tmp_path, strategy_run, corpus_dir, capsys):
    """The window between promoting a model and writing its results (or any later edit of
    the model) is caught by the model fingerprint the results record."""
    from dume.moe.edit import read_gates, set_gates

    run_dir = copy_run(strategy_run, tmp_path / "run")
    model_dir = run_dir / "models" / "random_routing"
    set_gates(model_dir, [g * 2 for g in read_gates(model_dir)])
    capsys.readouterr()
    assert run_script(strategies.main, method_args(run_dir, corpus_dir, "random_routing")) == 0
    assert "it was computed from another model" in capsys.readouterr().out
    assert _result(run_dir, "random_routing")["fingerprints"]["models"]["model"] == fingerprint(model_dir)


# ------------------------------------------------------------------------------- relocation


def test_a_moved_run_directory_still_works(tmp_path, strategy_run, corpus_dir, capsys):
    from dume.upcycle.dynamic import read_recipe

    first = copy_run(strategy_run, tmp_path / "first")
    moved = tmp_path / "elsewhere" / "clm"
    moved.parent.mkdir()
    os.rename(first, moved)  # the old location is gone

    capsys.readouterr()
    assert run_script(strategies.main, method_args(moved, corpus_dir, "DUME")) == 0
    assert "exists; skipping" in capsys.readouterr().out
    recipe = read_recipe(moved / "models" / "DUME")
    assert [Path(e) for e in recipe["experts"]] == [(moved / "experts" / d) for d in ("code", "math", "history")]
    assert all(Path(e).is_dir() for e in recipe["experts"])
    # Caches are keyed by content, not by path: a new sweep point reuses the MoE base and
    # the statistics made before the move.
    base_weights = moved / "models" / "_moe_base" / "model.safetensors"
    stamp = base_weights.stat().st_mtime_ns
    capsys.readouterr()
    assert run_script(strategies.main, method_args(moved, corpus_dir, "DUME", "--tag", "moved",
                                                   "--lambda", "0.5")) == 0
    assert "using cached statistics" in capsys.readouterr().out
    assert base_weights.stat().st_mtime_ns == stamp
    assert math.isfinite(_result(moved, "DUME_moved")["results"]["math"]["perplexity"])


def test_dume_experts_reaverage_on_a_moved_run(tmp_path, strategy_run):
    """`dume_experts.py add --mode reaverage` needs the experts the recipe names: found
    relative to the moved model; a missing one is one clear line."""
    from dume.upcycle.dynamic import open_dume

    moved = copy_run(strategy_run, tmp_path / "moved")
    recipe_path = moved / "models" / "DUME" / "dume_router.json"
    recipe = json.loads(recipe_path.read_text())
    recipe["experts_absolute"] = [str(tmp_path / "gone" / d) for d in recipe["domains"]]  # the old place is gone
    recipe_path.write_text(json.dumps(recipe))
    dume = open_dume(moved / "models" / "DUME")
    assert dume.recipe["experts"] == [str(moved / "experts" / d) for d in recipe["domains"]]
    shutil.rmtree(moved / "experts" / "code")
    from dume.upcycle.dynamic import add_reaverage

    with pytest.raises(DumeError, match="names expert 0 .* which does not exist"):
        add_reaverage(open_dume(moved / "models" / "DUME"), moved / "experts" / "math", "extra",
                      tmp_path / "out", None)
