"""The README's paper-scale command lines, run as written on a local replica of the hub
layouts (OpenWebText parquet shards under DATA/vietgpt/openwebtext_en/, M2D2 configs
under DATA/machelreid/m2d2/), with only size flags, the data folder and the tokenizer
path overridden (argparse keeps the last value of a repeated flag, so the overrides are
appended to each command by a shell wrapper around `python`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.hub_replica import large_vocab_tokenizer, write_hub_replica

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "*": "--seq-len 32 --max-eval-blocks 4 --eval-batch-size 8",
    "clm_pretrain.py": "--preset test-micro --steps 4 --warmup 1 --batch-size 4 --grad-accum 2 --eval-every 2",
    "clm_train_experts.py": "--steps 2 --warmup 1 --batch-size 4 --grad-accum 2 --eval-every 1",
    "clm_moerging_strategies_eval.py": "--num-steps 2 --batch-size 4 --grad-accum 1 --stats-batch-size 8",
}


def readme_commands() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### The paper's setting"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


TWO_PROCESS_OVERRIDES = {  # per-device batches halved: the same effective batch on 2 processes
    **OVERRIDES,
    "clm_pretrain.py": OVERRIDES["clm_pretrain.py"].replace("--batch-size 4", "--batch-size 2"),
    "clm_train_experts.py": OVERRIDES["clm_train_experts.py"].replace("--batch-size 4", "--batch-size 2"),
    "clm_moerging_strategies_eval.py": OVERRIDES["clm_moerging_strategies_eval.py"].replace("--batch-size 4",
                                                                                         "--batch-size 2"),
}


def _run_readme_commands(root: Path, data: Path, tok: Path, overrides: dict, launch: str = "") -> Path:
    """The README's commands through a `python` shell function that appends the size flags
    (and, with `launch`, starts each script under `accelerate launch`)."""
    cases = "\n".join(f'    *{script}*) extra="{flags}";;' for script, flags in overrides.items() if script != "*")
    wrapper = f"""set -euo pipefail
python() {{
  local extra=""
  case "$1" in
{cases}
  esac
  {launch or '"' + sys.executable + '"'} "$@" --run-dir "{root / 'run'}" --data-dir "{data}" --tokenizer "{tok}" \\
      {overrides['*']} $extra
}}
"""
    script = root / "paper.sh"
    script.write_text(wrapper + readme_commands())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "DUME_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_DATASETS_CACHE": str(root / "hf_datasets"), "DUME_TOKEN_CACHE": str(root / "tokens")}
    p = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return root / "run"


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    data = root / "data" / "hub"
    # physics' training text is shorter than the experts' step budget: that run wraps its data
    texts = write_hub_replica(data, short_train=("physics_l1",))
    tok = large_vocab_tokenizer(root / "llama3_tok", texts)
    return root, data, tok


@pytest.fixture(scope="module")
def single_process_run(hub_layout, tmp_path_factory):
    _, data, tok = hub_layout
    return _run_readme_commands(tmp_path_factory.mktemp("one"), data, tok, OVERRIDES)


def test_readme_paper_commands_run_on_the_local_hub_layout(hub_layout, single_process_run):
    _, _, tok = hub_layout
    commands = readme_commands()
    assert "--tokenizer meta-llama/Meta-Llama-3-8B" in commands and "--source hub" in commands
    run = single_process_run
    results = {f.stem for f in (run / "results").glob("*.json")}
    assert {"pretrain", "experts_eval", "model_averaging", "oracle", "random_routing", "DUME", "BTX",
            "DUMEplus"} <= results
    pre = json.loads((run / "results" / "pretrain.json").read_text())
    assert pre["settings"]["recipe"] == "original"
    assert pre["history"]["config"]["param_dtype"] == "float32" and pre["history"]["config"]["betas"] == [0.9, 0.999]
    assert json.loads((run / "tokenizer" / "dume_tokenizer.json").read_text())["made_from"] == str(tok)
    dume = json.loads((run / "results" / "DUME.json").read_text())
    assert set(dume["results"]) == {"code", "math", "physics", "history", "philosophy"}
    assert all(r["tokens"] == 4 * 32 for r in dume["results"].values())  # 4 test windows, 32 predicted tokens each


def _perplexities(tree, path=()) -> dict:
    """{path: perplexity} of every perplexity anywhere in a result."""
    if isinstance(tree, dict):
        out = {path: tree["perplexity"]} if isinstance(tree.get("perplexity"), float) else {}
        for k, v in tree.items():
            out.update(_perplexities(v, (*path, k)))
        return out
    return {}


def test_readme_paper_commands_under_two_processes_equal_one(hub_layout, single_process_run, tmp_path):
    """Every README paper command under `accelerate launch --multi_gpu --num_processes 2`
    (gloo), per-device batches halved: it completes, writes one set of results, the LR of
    every step equals the single process's (the expert budget wraps its data) and every
    perplexity matches to 1e-4 relative."""
    _, data, tok = hub_layout
    port = 29500 + os.getpid() % 2000
    launch = (f'"{sys.executable}" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 '
              f'--mixed_precision no --dynamo_backend no --main_process_port {port}')
    two = _run_readme_commands(tmp_path, data, tok, TWO_PROCESS_OVERRIDES, launch)
    one = single_process_run
    names = sorted(f.name for f in (one / "results").glob("*.json"))
    assert sorted(f.name for f in (two / "results").glob("*.json")) == names
    assert not list((two / "results").glob("*.tmp*")) and not list((two / "models").glob(".*"))
    wrapped = json.loads((two / "results" / "expert_physics.json").read_text())
    h = wrapped["history"]
    assert wrapped["train_windows"] < h["steps_done"] * h["effective_batch"]  # the budget wraps the data
    compared = 0
    for name in names:
        a, b = (json.loads((r / "results" / name).read_text()) for r in (one, two))
        if "history" in a:
            # training scripts run data-parallel; a strategy's router training runs in the main process alone
            assert b["history"]["processes"] == (1 if name in ("BTX.json", "DUMEplus.json") else 2), name
            assert b["history"]["effective_batch"] == a["history"]["effective_batch"], name
            assert b["history"]["lr"] == a["history"]["lr"], name
        pa, pb = _perplexities(a), _perplexities(b)
        assert pa.keys() == pb.keys(), name
        for key in pa:
            assert pb[key] == pytest.approx(pa[key], rel=1e-4), (name, key)
        compared += len(pa)
    assert compared > 50
