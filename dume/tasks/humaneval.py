"""lm-eval hook for the `dume_humaneval` task: score each generation with `dume.sandbox`.

lm-eval calls `process_results(doc, results)` once per problem with the model's
generation(s); the program prompt + completion + tests + check(entry_point) runs in a
separate limited process (see `dume.sandbox`), so a completion that loops, forks, fills
the disk or allocates without end costs one time-out and the evaluation goes on.
Limits can be tuned with DUME_SANDBOX_TIMEOUT (seconds, default 10) and
DUME_SANDBOX_MEMORY_MB (default 1024).
"""

from __future__ import annotations

import os

from ..sandbox import Limits, check_completion


def _limits() -> Limits:
    timeout = float(os.environ.get("DUME_SANDBOX_TIMEOUT", "10"))
    mem = int(os.environ.get("DUME_SANDBOX_MEMORY_MB", "1024"))
    return Limits(timeout_s=timeout, cpu_s=max(1, int(timeout)), memory_bytes=mem << 20)


def process_results(doc: dict, results: list[str]) -> dict:
    completions = results if isinstance(results, (list, tuple)) else [results]
    limits = _limits()
    passed = [check_completion(doc, c, limits).passed for c in completions]
    return {"pass@1": sum(passed) / max(1, len(passed))}
