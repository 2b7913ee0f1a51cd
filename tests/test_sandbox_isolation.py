"""What generated code can still reach on the host: SysV IPC, the host's writable
directories, its UNIX sockets, the harness's process and files; and the refusal to run
unisolated as the caller's own user.

Each test runs one or two short programs; whatever a broken sandbox lets through is
cleaned up by the test itself.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from dume.errors import DumeError
from dume.reasoning.sandbox import Limits, interpreter_for, run_python

if os.geteuid() == 0 and interpreter_for(True) is None:
    pytest.skip("running as root, the sandbox needs a Python every user can execute (a system python3); "
                "none here", allow_module_level=True)

FAST = Limits(timeout_s=5.0, cpu_s=5, memory_bytes=512 << 20, file_size_bytes=1 << 20, max_processes=8)
MODES = pytest.mark.parametrize("isolate_user", [True, False], ids=["fresh-uid", "same-uid"])


def _mode(isolate_user: bool) -> None:
    if isolate_user and os.geteuid() != 0:
        pytest.skip("a fresh uid needs root")


def _marker() -> str:
    return f"dume-test-{os.getpid()}-{time.monotonic_ns() % 10**9}"


# ------------------------------------------------------------------ SysV shared memory

def _host_shm_keys() -> set[int]:
    with open("/proc/sysvipc/shm", encoding="ascii") as f:
        return {int(line.split()[0]) for line in f.readlines()[1:] if line.strip()}


def _remove_host_shm(key: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(key, 0, 0)
    if shmid >= 0:
        libc.shmctl(shmid, 0, None)  # IPC_RMID


SHM_PROBE = """import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)
small = libc.shmget({key}, 1 << 20, 0o1000 | 0o600)       # IPC_CREAT
big = libc.shmget({key} + 1, 1 << 30, 0o1000 | 0o600)     # twice the memory limit
print(small, big)
"""


@MODES
def test_shared_memory_segments_do_not_outlive_the_call(isolate_user):
    _mode(isolate_user)
    key = 0x44550000 + os.getpid() % 0xFFFF * 2
    assert not {key, key + 1} & _host_shm_keys()
    try:
        r = run_python(SHM_PROBE.format(key=key), FAST, isolate_user=isolate_user)
        left = {key, key + 1} & _host_shm_keys()
    finally:
        _remove_host_shm(key)
        _remove_host_shm(key + 1)
    assert r.passed, r.stderr
    small, big = map(int, r.stdout.split())
    assert small >= 0, "the program could not create a segment at all"
    assert left == set(), "a SysV segment created by the program survived the call"
    if r.isolation["ipc_limited"]:  # as root: shared memory is capped at the memory limit
        assert big == -1


# ------------------------------------------------------ writable directories of the host

FILES_PROBE = """import os
print(sorted(os.listdir("/tmp")), sorted(os.listdir("/run/lock")), os.path.exists({visible!r}))
for d in ({deep!r}, "/tmp/{m}/a/b/c"):
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "x"), "w").write("left behind")
open("/run/lock/{m}", "w").write("left behind")
open("/var/tmp/{m}", "w").write("left behind")
print("wrote")
"""


@MODES
def test_files_written_anywhere_do_not_outlive_the_call(isolate_user):
    """Deep in a world-writable host folder, under /run/lock, in /var/tmp: all private.
    And the program starts with an empty /tmp (the host's file is not there)."""
    _mode(isolate_user)
    m = _marker()
    shared = Path("/tmp") / f"{m}-ww"       # world-writable folders two levels deep
    deep = shared / "d1" / "d2"
    deep.mkdir(parents=True)
    for p in (shared, shared / "d1", deep):
        p.chmod(0o1777)
    visible = Path("/tmp") / f"{m}-visible"
    visible.write_text("the host's")
    leftovers = [deep / "x", Path("/tmp") / m, Path("/run/lock") / m, Path("/var/tmp") / m]
    try:
        r = run_python(FILES_PROBE.format(visible=str(visible), deep=str(deep), m=m), FAST,
                       isolate_user=isolate_user)
        survived = [str(p) for p in leftovers if os.path.lexists(p)]
    finally:
        for p in leftovers[1:]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                p.unlink()
        shutil.rmtree(shared, ignore_errors=True)
        visible.unlink()
    assert survived == []
    assert r.passed, r.stderr
    # /tmp starts empty but for the mount points of the interpreter's own read-only
    # directories when they live there (a venv under /tmp, as in a CI clone)
    # (which interpreter runs depends on the mode: a fresh uid may need a system python3)
    listing, wrote = r.stdout.splitlines()
    assert wrote == "wrote" and listing.endswith("] [] False"), r.stdout
    import ast

    seen_tmp = ast.literal_eval(listing[: listing.index("]") + 1])
    assert set(seen_tmp) <= set(_interpreter_entries("/tmp")), (seen_tmp, r.stdout)
    assert m not in listing


def _interpreter_entries(top: str) -> list[str]:
    """The names directly under `top` that the sandbox's binds of the interpreter's
    directories (prefixes, a venv's folder) create in its private root."""
    import sys

    exe = sys.executable
    dirs = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(exe)),
            os.path.dirname(os.path.dirname(os.path.realpath(exe)))]
    names = set()
    for d in dirs:
        for q in (os.path.abspath(d), os.path.realpath(d)):
            if q.startswith(top.rstrip("/") + "/"):
                names.add(q[len(top.rstrip("/")) + 1:].split("/")[0])
    return sorted(names)


# ------------------------------------------------------------------- host UNIX sockets

def _unix_listener(path: str):
    """A UNIX socket server that everyone may connect to; counts what it accepts."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o777)
    srv.listen(4)
    srv.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return accepted, lambda: (stop.set(), t.join(), srv.close())


SOCKET_PROBE = """import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect({path!r})
    print("connected")
except OSError as e:
    print("refused", type(e).__name__)
    sys.exit(7)
"""


@MODES
def test_host_unix_sockets_are_unreachable(isolate_user):
    _mode(isolate_user)
    d = Path("/tmp") / _marker()
    d.mkdir()
    d.chmod(0o755)
    path = str(d / "s")
    accepted, close = _unix_listener(path)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(path)  # the listener is real and reachable from here
        probe.close()
        time.sleep(0.3)
        assert len(accepted) == 1
        r = run_python(SOCKET_PROBE.format(path=path), FAST, isolate_user=isolate_user)
        time.sleep(0.3)
    finally:
        close()
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == 7 and r.stdout.startswith("refused"), (r.stdout, r.stderr)
    assert len(accepted) == 1


def test_a_socket_inside_a_read_only_bind_is_masked():
    """The interpreter's own directories are bound read-only, which connect() ignores: a
    socket the host has there when the run starts is covered (here: in sys.prefix, which
    the caller's-uid mode binds)."""
    import sys

    if not os.access(sys.prefix, os.W_OK):
        pytest.skip(f"cannot create a socket in {sys.prefix}")
    path = os.path.join(sys.prefix, _marker() + ".sock")
    if len(path) >= 100:
        pytest.skip("sys.prefix is too long for a UNIX socket path")
    accepted, close = _unix_listener(path)
    try:
        r = run_python(SOCKET_PROBE.format(path=path), FAST, isolate_user=False)
        time.sleep(0.3)
    finally:
        close()
        os.unlink(path)
    assert r.isolation["filesystem"].startswith("private root"), r.isolation
    assert r.returncode == 7 and r.stdout.startswith("refused"), (r.stdout, r.stderr)
    assert accepted == []


# ---------------------------------------------------- the harness's process and files

HARNESS_PROBE = """import os, signal
out = []
try:
    out.append("environ:" + str(len(open("/proc/{pid}/environ", "rb").read())))
except OSError as e:
    out.append("environ:" + type(e).__name__)
try:
    os.kill({pid}, 0)
    out.append("signal:sent")
except OSError as e:
    out.append("signal:" + type(e).__name__)
try:
    open({results!r}, "w").write("rewritten")
    out.append("results:rewritten")
except OSError as e:
    out.append("results:" + type(e).__name__)
print(" ".join(out))
"""


@MODES
def test_the_harness_is_out_of_reach(isolate_user, tmp_path):
    """Neither the caller's /proc/<pid>/environ, nor a signal to it, nor its results file."""
    _mode(isolate_user)
    results = tmp_path / "results.json"
    results.write_text("{}")
    r = run_python(HARNESS_PROBE.format(pid=os.getpid(), results=str(results)), FAST, isolate_user=isolate_user)
    assert r.passed, r.stderr
    got = dict(item.split(":") for item in r.stdout.split())
    assert got["environ"] in ("FileNotFoundError", "PermissionError"), r.stdout
    assert got["signal"] in ("ProcessLookupError", "PermissionError"), r.stdout
    assert got["results"] != "rewritten" and results.read_text() == "{}"


# ------------------------------------------------------- no isolation: refuse or opt in

def _without(monkeypatch, what: str, replacement: str) -> None:
    """Simulate a kernel that denies `what` (a piece of the launcher)."""
    import dume.reasoning.sandbox as sb

    broken = sb._LAUNCHER.replace(what, replacement)
    assert broken != sb._LAUNCHER
    monkeypatch.setattr(sb, "_LAUNCHER", broken)
    monkeypatch.setattr(sb, "_warned", set())
    monkeypatch.delenv("DUME_SANDBOX_ALLOW_UNISOLATED", raising=False)
    monkeypatch.delenv("DUME_SANDBOX_REQUIRE_ISOLATION", raising=False)


def test_own_uid_without_namespaces_is_refused_unless_opted_in(monkeypatch, capsys, tmp_path):
    """As the caller's own uid (what an ordinary user gets; as root, isolate_user=False),
    with unshare denied: refused by default, before the program runs, with one line;
    DUME_SANDBOX_ALLOW_UNISOLATED=1 runs it and the warning names what is exposed."""
    _without(monkeypatch, "libc.unshare(flags) == 0", "False")
    ran = tmp_path / "ran"
    src = f"open({str(ran)!r}, 'w').write('x')\nprint('ran')\n"
    with pytest.raises(DumeError) as e:
        run_python(src, FAST, isolate_user=False)
    assert "\n" not in str(e.value) and "DUME_SANDBOX_ALLOW_UNISOLATED=1" in str(e.value)
    assert not ran.exists(), "the program ran although the sandbox refused"
    monkeypatch.setenv("DUME_SANDBOX_ALLOW_UNISOLATED", "1")
    r = run_python(src, FAST, isolate_user=False)
    assert r.passed and r.stdout == "ran\n" and ran.exists()
    assert r.isolation["network"].startswith("shared with the host")
    warning = capsys.readouterr().err
    for exposed in ("environment", "/proc/<pid>/environ", "files", "signals", "network"):
        assert exposed in warning, warning
    monkeypatch.setenv("DUME_SANDBOX_REQUIRE_ISOLATION", "1")  # still wins over the opt-in
    with pytest.raises(DumeError, match="DUME_SANDBOX_REQUIRE_ISOLATION"):
        run_python(src, FAST, isolate_user=False)


def test_without_a_private_root_a_fresh_uid_warns_and_its_own_uid_is_refused(monkeypatch, capsys):
    if os.geteuid() != 0:
        pytest.skip("a fresh uid needs root")
    _without(monkeypatch, 'build_root(cfg["root"], cfg["tmp_bytes"], src)',
             'raise OSError(1, "simulated: no mounts")')
    r = run_python("import os\nprint(os.path.isdir('/sandbox'))", FAST)
    assert r.passed and r.stdout == "False\n", (r.stdout, r.stderr)
    assert r.isolation["filesystem"].startswith("the host's") and r.isolation["network"] == "none (own namespace)"
    assert "could not give generated code a private root" in capsys.readouterr().err
    with pytest.raises(DumeError, match="private root"):
        run_python("print('ran')", FAST, isolate_user=False)
