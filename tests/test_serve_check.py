"""bench/serve_check.py without engines (none is installed in CI): it says so for each, and still builds the small
MoE with `dume build` and runs the transformers side on it; its comparison catches a changed token or number. The
"transformers 4.x" engine is run with this python (transformers 5), so its subprocess path runs here for real."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys

import pytest

from bench import serve_check
from tests.fixtures import one_thread

_RUN: dict = {}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One serve_check run (Llama experts -> Mixtral) with no engine given, and its work folder."""
    if not _RUN:
        work = tmp_path_factory.mktemp("serve")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), one_thread():
            rc = serve_check.main(["--arch", "llama", "--work-dir", str(work), "--json", str(work / "rows.json"),
                                   "--vllm-python", sys.executable,  # a python without vllm
                                   "--transformers4-python", sys.executable])
        _RUN.update(rc=rc, work=work, rows=json.loads((work / "rows.json").read_text()), out=out.getvalue())
    return _RUN


def test_no_engine_is_not_checked_and_the_transformers_side_runs(run):
    assert run["rc"] == 0
    assert "vLLM: not checked, " in run["out"] and "llama.cpp: not checked, no --llama-cpp-python given" in run["out"]
    assert "transformers: MixtralForCausalLM" in run["out"] and "| vLLM | - | MixtralForCausalLM |" in run["out"]
    rows = {r["engine"]: r for r in run["rows"]}
    assert set(rows) == {"vLLM", "llama.cpp", "transformers 4.x"}
    assert all(r["status"] == "not checked" and r["moe"] == "MixtralForCausalLM"
               for e, r in rows.items() if e != "transformers 4.x")
    assert "cannot import vllm" in rows["vLLM"]["why"]
    assert rows["llama.cpp"]["why"] == "no --llama-cpp-python given"
    cfg = json.loads((run["work"] / "llama_moe" / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["head_dim"] >= 32  # vLLM CPU's minimum
    assert (run["work"] / "llama_moe" / "dume_router.json").is_file()  # a `dume build` output, routers solved


def test_another_transformers_runs_in_its_own_process_and_agrees(run):
    row = next(r for r in run["rows"] if r["engine"] == "transformers 4.x")
    assert row["status"] == "checked" and row["passed"], row
    assert row["version"].startswith("transformers 5.") and row["equal"] == row["text_equal"] == 5
    assert row["diff"] < 1e-5  # the same library: float noise of another thread count at most
    assert (run["work"] / "llama_moe" / "transformers_result.json").is_file()


def test_the_comparison_catches_a_changed_token_or_number(run):
    with one_thread():
        ref = serve_check.reference(run["work"] / "llama_moe")
    n = len(serve_check.PROMPTS)
    assert len(ref["tokens"]) == n and all(len(t) == serve_check.MAX_NEW_TOKENS for t in ref["tokens"])
    same = {"tokens": ref["tokens"], "logprobs": ref["logprobs"], "text_ids": ref["text_ids"]}
    assert serve_check.compare(ref, same) == {"equal": n, "diff": 0.0, "text_equal": n}
    other = copy.deepcopy(same)
    other["tokens"][2][5] += 1
    other["logprobs"][0][3] += 1e-3
    other["text_ids"][4] = other["text_ids"][4][:-1]
    got = serve_check.compare(ref, other)
    assert got["equal"] == n - 1 and got["diff"] == pytest.approx(1e-3, rel=1e-3) and got["text_equal"] == n - 1
    # llama.cpp's kind: every position's logits; a difference past the first changed token is not compared
    logits = {"tokens": other["tokens"], "text_ids": ref["text_ids"],
              "logits": [x.tolist() for x in ref["logits"]]}
    p2 = len(ref["prompts"][2])
    logits["logits"][2][p2 + 7][0] += 1.0  # after the changed token 5: another text from there, not compared
    logits["logits"][1][len(ref["prompts"][1]) // 2][3] -= 2e-4  # inside a prompt: compared
    got = serve_check.compare(ref, logits)
    assert got["equal"] == n - 1 and got["diff"] == pytest.approx(2e-4, rel=1e-2)
