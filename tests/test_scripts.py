"""The CLM recipe scripts end to end on a tiny local corpus: results, the table, resuming,
interruption safety, and clear errors on bad input before any heavy work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import clm_experts_eval
import clm_pretrain
import clm_train_experts
import clm_weights_avg_eval
from dume.checkpoint.io import is_complete_checkpoint
from tests.helpers import one_error_line
from tests.fixtures import (  # noqa: F401  (pytest fixtures)
    DOMAINS,
    PRETRAIN_FLAGS,
    base_args,
    copy_run,
    corpus_dir,
    datasets_cache,
    run_script,
    single_thread,
    snapshot,
    trained_run,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def _fresh_run_with_tokenizer(tmp_path: Path, trained_run: Path) -> Path:
    """An empty run dir that already has the shared run's tokenizer (saves training it)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(trained_run / "tokenizer", run_dir / "tokenizer")
    return run_dir


def _checkpoints_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_dir() and is_complete_checkpoint(p)]


# =============================================================================================
# End to end
# =============================================================================================


def test_pipeline_writes_results_and_table(trained_run, corpus_dir):
    from dume.report.clm_table import write_clm_table

    args = base_args(trained_run, corpus_dir)
    clm_experts_eval.main(args)
    clm_weights_avg_eval.main(args)

    results = trained_run / "results"
    for name in ["pretrain", *(f"expert_{d}" for d in DOMAINS), "experts_eval", "model_averaging"]:
        assert (results / f"{name}.json").is_file(), name
    assert is_complete_checkpoint(trained_run / "seed")
    for d in DOMAINS:
        assert is_complete_checkpoint(trained_run / "experts" / d)
    assert isinstance(AutoModelForCausalLM.from_pretrained(trained_run / "models" / "model_averaging"),
                      LlamaForCausalLM)

    experts_eval = json.loads((results / "experts_eval.json").read_text())
    assert experts_eval["domains"] == list(DOMAINS)
    assert set(experts_eval["results"]) == {"seed", *(f"{d}_expert" for d in DOMAINS)}
    for row in experts_eval["results"].values():
        assert set(row) == set(DOMAINS)
        assert all(r["perplexity"] > 1 and r["tokens"] > 0 for r in row.values())
    averaging = json.loads((results / "model_averaging.json").read_text())
    assert set(averaging["results"]) == set(DOMAINS)

    md = write_clm_table(trained_run)
    table = json.loads((trained_run / "clm_results.json").read_text())
    assert (trained_run / "table.md").read_text() == md
    expected_rows = {"seed", "model_averaging", *(f"{d}_expert" for d in DOMAINS)}
    for path in results.glob("*.json"):  # every result file with a full row is a row
        content = json.loads(path.read_text())
        if path.name != "experts_eval.json" and set(content.get("results", {})) >= set(DOMAINS) \
                and not (content.get("settings") or {}).get("tag"):
            expected_rows.add(content.get("name", path.stem))
    assert set(table["methods"]) == expected_rows
    table_rows = {line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")} - {"method"}
    assert table_rows == expected_rows
    # The domain's own expert is the reference: its normalised score is exactly 100.
    for d in DOMAINS:
        assert table["methods"][f"{d}_expert"]["normalised"][d] == pytest.approx(100.0)
        assert table["reference_perplexity"][d] == experts_eval["results"][f"{d}_expert"][d]["perplexity"]


def test_rerun_skips_and_redo_recomputes(trained_run, corpus_dir, capsys):
    args = base_args(trained_run, corpus_dir)
    clm_experts_eval.main(args)  # make sure both outputs exist (whatever ran before)
    clm_weights_avg_eval.main(args)
    capsys.readouterr()
    before = snapshot(trained_run)

    clm_pretrain.main(base_args(trained_run, corpus_dir, *PRETRAIN_FLAGS))
    clm_train_experts.main(args)
    clm_experts_eval.main(args)
    clm_weights_avg_eval.main(args)
    out = capsys.readouterr().out
    assert "seed model exists" in out and "skipping" in out
    assert all(f"expert {d} exists" in out for d in DOMAINS)
    assert out.count("exists; skipping") >= 2
    assert snapshot(trained_run) == before, "a rerun must not rewrite finished outputs"

    eval_json = trained_run / "results" / "experts_eval.json"
    avg_json = trained_run / "results" / "model_averaging.json"
    avg_weights = trained_run / "models" / "model_averaging" / "model.safetensors"
    old = {p: p.stat().st_mtime_ns for p in (eval_json, avg_json, avg_weights)}
    old_results = json.loads(eval_json.read_text())["results"]
    time.sleep(0.01)
    clm_experts_eval.main(args + ["--redo"])
    clm_weights_avg_eval.main(args + ["--redo"])
    for p, mtime in old.items():
        assert p.stat().st_mtime_ns > mtime, f"--redo did not recompute {p}"
    new_results = json.loads(eval_json.read_text())["results"]
    for name, row in old_results.items():  # recomputed, and deterministic
        for d, r in row.items():
            assert new_results[name][d]["perplexity"] == pytest.approx(r["perplexity"], rel=1e-6)


# =============================================================================================
# Interruption
# =============================================================================================


def test_failed_save_leaves_no_checkpoint_and_rerun_completes(tmp_path, trained_run, corpus_dir, monkeypatch):
    from transformers import PreTrainedModel

    run_dir = _fresh_run_with_tokenizer(tmp_path, trained_run)
    args = base_args(run_dir, corpus_dir, *PRETRAIN_FLAGS)
    real_save = PreTrainedModel.save_pretrained

    def half_save(self, save_directory, *a, **k):
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(save_directory)
        (save_directory / "model.safetensors").write_bytes(b"\x00" * 100)  # a partial weights file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_save)
    with pytest.raises(OSError, match="No space left"):
        clm_pretrain.main(args)
    assert not (run_dir / "seed").exists()
    assert not list(run_dir.glob(".seed.tmp-*")), "the temporary directory must be removed"
    assert _checkpoints_under(run_dir) == []
    assert not (run_dir / "results" / "pretrain.json").exists()

    # A kill in the middle of a save leaves a hidden temporary behind: never a checkpoint,
    # and cleaned up by the next save.
    stale = run_dir / ".seed.tmp-99999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (stale / "model.safetensors").write_bytes(b"\x00" * 100)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    clm_pretrain.main(args)
    assert is_complete_checkpoint(run_dir / "seed")
    assert not stale.exists()
    assert isinstance(AutoModelForCausalLM.from_pretrained(run_dir / "seed"), LlamaForCausalLM)
    assert (run_dir / "results" / "pretrain.json").is_file()

    # ... and a completed seed is now skipped, while --redo retrains it.
    mtime = (run_dir / "seed" / "model.safetensors").stat().st_mtime_ns
    clm_pretrain.main(args)
    assert (run_dir / "seed" / "model.safetensors").stat().st_mtime_ns == mtime
    clm_pretrain.main(args + ["--redo"])
    assert (run_dir / "seed" / "model.safetensors").stat().st_mtime_ns > mtime
    assert is_complete_checkpoint(run_dir / "seed")
    assert not list(run_dir.glob(".seed.tmp-*"))


def test_keyboard_interrupt_in_training_leaves_nothing(tmp_path, trained_run, corpus_dir, monkeypatch, capsys):
    import dume.train.loop

    run_dir = _fresh_run_with_tokenizer(tmp_path, trained_run)
    args = base_args(run_dir, corpus_dir, *PRETRAIN_FLAGS)
    steps_done = []

    class InterruptedBar:
        """tqdm stand-in: two training steps, then Ctrl-C."""

        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            for i, step in enumerate(self.iterable):
                if i == 2:
                    raise KeyboardInterrupt
                steps_done.append(step)
                yield step

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(dume.train.loop, "tqdm", InterruptedBar)
    assert run_script(clm_pretrain.main, args) == 130
    assert steps_done == [0, 1]
    assert "interrupted" in capsys.readouterr().err
    assert not (run_dir / "seed").exists()
    assert not list(run_dir.glob(".seed.tmp-*"))
    assert not (run_dir / "results" / "pretrain.json").exists()

    monkeypatch.undo()
    assert run_script(clm_pretrain.main, args) == 0
    assert is_complete_checkpoint(run_dir / "seed")
    assert (run_dir / "results" / "pretrain.json").is_file()


def test_sigkill_during_training_then_rerun(tmp_path, trained_run, corpus_dir, datasets_cache):
    run_dir = _fresh_run_with_tokenizer(tmp_path, trained_run)
    argv = base_args(run_dir, corpus_dir, "--preset", "test-micro", "--steps", "1000000", "--warmup", "1",
                     "--eval-every", "0")
    env = {**os.environ, "DUME_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(datasets_cache)}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-u", "clm_pretrain.py", *argv], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(120, proc.kill)  # never hang the suite
        watchdog.start()
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("seed model:"):  # printed just before training starts
                    break
            assert lines and lines[-1].startswith("seed model:"), (lines, (tmp_path / "stderr.txt").read_text())
            time.sleep(1.0)
            assert proc.poll() is None, "the script ended before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    assert "pretrain:" in (tmp_path / "stderr.txt").read_text(), "training had not started"
    assert not (run_dir / "seed").exists()
    assert _checkpoints_under(run_dir) == []
    assert not (run_dir / "results" / "pretrain.json").exists()

    assert run_script(clm_pretrain.main, base_args(run_dir, corpus_dir, *PRETRAIN_FLAGS)) == 0
    assert is_complete_checkpoint(run_dir / "seed")
    assert isinstance(AutoModelForCausalLM.from_pretrained(run_dir / "seed"), LlamaForCausalLM)


# =============================================================================================
# Bad input: exit status 2, a message naming the problem, nothing written
# =============================================================================================


def _expect_error(capsys, main, argv, *needles) -> str:
    capsys.readouterr()
    return one_error_line(capsys, run_script(main, argv), *needles)


@pytest.mark.parametrize("script, flag", [(clm_train_experts, "--domain"), (clm_experts_eval, "--domains"),
                                          (clm_weights_avg_eval, "--domains")])
def test_unknown_domain(trained_run, corpus_dir, capsys, script, flag):
    before = snapshot(trained_run)
    err = _expect_error(capsys, script.main, base_args(trained_run, corpus_dir, flag, "nosuch"), "'nosuch'")
    for d in DOMAINS:
        assert d in err  # the message lists the valid choices
    assert snapshot(trained_run) == before


@pytest.mark.parametrize("script", [clm_train_experts, clm_experts_eval])
def test_missing_seed_checkpoint(tmp_path, corpus_dir, capsys, script):
    run_dir = tmp_path / "empty_run"
    _expect_error(capsys, script.main, base_args(run_dir, corpus_dir), "missing checkpoint", "seed",
                  "clm_pretrain.py")
    assert snapshot(run_dir) == {}, "nothing may be written (not even the tokenizer)"


def test_corrupted_seed_checkpoint(tmp_path, trained_run, corpus_dir, capsys, monkeypatch):
    import dume.train.loop

    run_dir = copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(run_dir / "experts")
    weights = run_dir / "seed" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    monkeypatch.setattr(dume.train.loop, "train", lambda *a, **k: pytest.fail("trained despite a corrupted seed"))
    before = snapshot(run_dir)
    _expect_error(capsys, clm_train_experts.main, base_args(run_dir, corpus_dir), str(run_dir / "seed"))
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("script", [
    clm_experts_eval,
    clm_weights_avg_eval,
])
def test_corrupted_expert_is_refused_before_any_evaluation(tmp_path, trained_run, corpus_dir, capsys,
                                                           monkeypatch, script):
    import dume.train.perplexity

    run_dir = copy_run(trained_run, tmp_path / "run")
    for name in ("experts_eval", "model_averaging"):
        (run_dir / "results" / f"{name}.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "models", ignore_errors=True)
    weights = run_dir / "experts" / DOMAINS[-1] / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    evaluated = []
    real = dume.train.perplexity.perplexity
    monkeypatch.setattr(dume.train.perplexity, "perplexity", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    before = snapshot(run_dir)
    _expect_error(capsys, script.main, base_args(run_dir, corpus_dir), str(run_dir / "experts" / DOMAINS[-1]))
    assert snapshot(run_dir) == before
    assert evaluated == [], "evaluated models before finding the corrupted checkpoint"


@pytest.mark.parametrize("script", [
    clm_train_experts,
    clm_experts_eval,
    clm_weights_avg_eval,
])
def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, trained_run, corpus_dir, capsys, monkeypatch,
                                                    script):
    import dume.train.perplexity
    import dume.train.loop
    from dume.text.tokenizer import load_tokenizer

    tok = load_tokenizer(trained_run / "tokenizer")
    tok.add_tokens([f"<extra_{i}>" for i in range(40)])
    tok_dir = tmp_path / "big_tokenizer"
    tok.save_pretrained(tok_dir)
    model_vocab = json.loads((trained_run / "seed" / "config.json").read_text())["vocab_size"]
    assert len(tok) > model_vocab

    run_dir = copy_run(trained_run, tmp_path / "run")
    for name in ("experts_eval", "model_averaging"):
        (run_dir / "results" / f"{name}.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "models", ignore_errors=True)
    if script is clm_train_experts:
        shutil.rmtree(run_dir / "experts" / "math")
    monkeypatch.setattr(dume.train.loop, "train", lambda *a, **k: pytest.fail("trained with a mismatched tokenizer"))
    monkeypatch.setattr(dume.train.perplexity, "perplexity", lambda *a, **k: pytest.fail("evaluated with it"))
    before = snapshot(run_dir)
    # Refused as soon as the run is opened: its vocabulary differs from the run's tokenizer
    # (the one the seed was made with), which is also the model's.
    _expect_error(capsys, script.main, base_args(run_dir, corpus_dir, "--tokenizer", tok_dir),
                  "different vocabulary than this run's tokenizer", f"{len(tok)} vs {model_vocab} tokens")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("script", [clm_pretrain, clm_train_experts])
def test_empty_local_data_dir(tmp_path, capsys, script):
    data_dir = tmp_path / "empty_data"
    data_dir.mkdir()
    run_dir = tmp_path / "run"
    _expect_error(capsys, script.main, base_args(run_dir, data_dir, *(PRETRAIN_FLAGS if script is clm_pretrain
                                                                      else [])),
                  str(data_dir), "holds no domain")
    assert snapshot(run_dir) == {}
