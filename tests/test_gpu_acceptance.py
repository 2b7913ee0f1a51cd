"""`bench/gpu_acceptance.py`: without CUDA it refuses with one line (exit 2); `--cpu-smoke`
runs the whole sequence (train speed, pretraining on the hub replica, experts, DUME, BTX,
MoE speed, reasoning experts, DUME parameters, one paper-protocol cell) on tiny presets,
so the GPU run cannot rot between the times a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "DUME_THREADS": "1"}


def test_without_cuda_it_says_so_and_exits_2():
    p = subprocess.run([sys.executable, "bench/gpu_acceptance.py"], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "no CUDA GPU here" in p.stderr and "--cpu-smoke" in p.stderr


def test_cpu_smoke_runs_every_step(tmp_path):
    out = tmp_path / "acceptance.json"
    p = subprocess.run([sys.executable, "bench/gpu_acceptance.py", "--cpu-smoke", "--json", str(out)], cwd=REPO,
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    doc = json.loads(out.read_text())
    steps = [r["step"] for r in doc["rows"]]
    assert len(steps) == 9 and steps[0].startswith("train speed") and steps[-1].startswith("reasoning: DUME on gsm8k")
    assert all(r["seconds"] > 0 for r in doc["rows"])
    assert "ppl code=" in doc["rows"][3]["figures"] and "exact_match" in doc["rows"][-1]["figures"]
    assert doc["table"] in p.stdout
