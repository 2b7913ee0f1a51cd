"""Multi-process training and the run's tokenizer.

- `accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo): the LR at every
  optimizer step equals the single-process run's (the scheduler is not advanced once per
  process), the effective batch is recorded, one checkpoint is written and it loads.
- A `--tokenizer` whose vocabulary differs from the run's (the one the seed was made
  with) exits 2 with one line before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import clm_train_experts
from dume.checkpoint.io import is_complete_checkpoint
from tests.helpers import launch_cmd, one_error_line
from tests.fixtures import (  # noqa: F401  (pytest fixtures)
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
FLAGS = ["--preset", "test-micro", "--steps", "6", "--warmup", "2", "--grad-accum", "2", "--eval-every", "3",
         "--batch-size", "4", "--lr", "1e-3"]


def _env(datasets_cache, token_cache):
    return {**os.environ, "DUME_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
            "HF_DATASETS_CACHE": str(datasets_cache), "DUME_TOKEN_CACHE": str(token_cache)}


def _fresh(tmp_path, trained_run, name) -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    shutil.copytree(trained_run / "tokenizer", run_dir / "tokenizer")
    return run_dir


def test_two_processes_use_the_single_process_lr_and_write_one_checkpoint(tmp_path, trained_run, corpus_dir,
                                                                          datasets_cache):
    env = _env(datasets_cache, tmp_path / "tokens")
    one, two = _fresh(tmp_path, trained_run, "one"), _fresh(tmp_path, trained_run, "two")
    p = subprocess.run([sys.executable, "clm_pretrain.py", *base_args(one, corpus_dir, *FLAGS)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cmd = launch_cmd("clm_pretrain.py", *base_args(two, corpus_dir, *FLAGS))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "effective batch 16 sequences = 4 per device x 2 accumulation x 2 processes" in p.stdout

    h1 = json.loads((one / "results" / "pretrain.json").read_text())["history"]
    h2 = json.loads((two / "results" / "pretrain.json").read_text())["history"]
    assert h1["processes"] == 1 and h2["processes"] == 2
    assert h1["effective_batch"] == 8 and h2["effective_batch"] == 16
    assert len(h1["lr"]) == len(h2["lr"]) == 6
    assert h2["lr"] == h1["lr"]  # warmup from 0.1x, then cosine: step for step
    assert h1["lr"][0] == pytest.approx(1e-4) and h1["lr"][2] == pytest.approx(1e-3)
    # One checkpoint, written once, that loads; no leftovers of a second writer.
    assert is_complete_checkpoint(two / "seed")
    assert not [p for p in two.rglob(".*tmp-*")]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two / "seed")


@pytest.mark.usefixtures("single_thread")
def test_tokenizer_differing_from_the_runs_exits_2_before_any_work(tmp_path, trained_run, corpus_dir, capsys,
                                                                    monkeypatch):
    import dume.train.loop
    from dume.text.tokenizer import load_tokenizer, train_bpe_tokenizer
    from tests.helpers import tiny_texts

    other = train_bpe_tokenizer(tiny_texts(300, seed=5), vocab_size=300)  # same size, another vocabulary
    other.save_pretrained(tmp_path / "other_tok")
    assert len(other) == len(load_tokenizer(trained_run / "tokenizer"))
    run_dir = copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(run_dir / "experts" / "math")
    monkeypatch.setattr(dume.train.loop, "train", lambda *a, **k: pytest.fail("trained with another tokenizer"))
    before = snapshot(run_dir)
    capsys.readouterr()
    rc = run_script(clm_train_experts.main, base_args(run_dir, corpus_dir, "--domain", "math",
                                                      "--tokenizer", tmp_path / "other_tok"))
    one_error_line(capsys, rc, "different vocabulary than this run's tokenizer", "other_tok")
    assert snapshot(run_dir) == before


WAIT_SCRIPT = '''
import sys, time, torch, torch.distributed as dist
from dume.runtime.distributed import all_reduce_sum, current_shard, main_process_first, wait_for_everyone
shard = current_shard()
log = open(f"{sys.argv[1]}/rank{shard.rank}.txt", "w", buffering=1)  # one file per rank: no interleaving
start = time.time()
with main_process_first():
    if shard.is_main:
        time.sleep(10)  # rank 0 prepares for twice the collectives' timeout
waited = time.time() - start
t = torch.tensor([float(shard.rank + 1)])
all_reduce_sum([t], shard)  # the group still works after the long wait
wait_for_everyone()
log.write(f"waited {waited:.1f} sum {t.item():.0f}\\n")
# control: a plain collective barrier against a busy rank 0 does time out
if shard.is_main:
    time.sleep(12)
else:
    t0 = time.time()
    try:
        dist.barrier()
        log.write("control: barrier returned\\n")
    except Exception:
        log.write(f"control: barrier timed out after {time.time() - t0:.0f}s\\n")
'''


def test_rank0_preparation_longer_than_the_process_group_timeout_completes(tmp_path):
    """Waiting for rank 0 polls the store (no timeout), while collectives keep the short
    timeout set by DUME_PROCESS_GROUP_TIMEOUT (the control barrier times out)."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT_SCRIPT)
    env = {**os.environ, "DUME_PROCESS_GROUP_TIMEOUT": "5", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = launch_cmd(str(script), str(tmp_path))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().split("\n") for r in (0, 1))
    for lines in (rank0, rank1):
        waited, total = float(lines[0].split()[1]), lines[0].split()[3]
        assert waited >= 9.5 and total == "3", lines
    assert rank1[1].startswith("control: barrier timed out after"), rank1


def test_processes_on_one_machine_share_its_cores(monkeypatch):
    """Under `accelerate launch` every process took all cores (issue 22, item 11): N processes, N x the CPU."""
    import os

    import torch

    from dume.cli import setup_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("DUME_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(os.cpu_count() or 1))
        setup_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        setup_threads()
        assert torch.get_num_threads() == (os.cpu_count() or 1)
        monkeypatch.setenv("DUME_THREADS", "1")
        setup_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
