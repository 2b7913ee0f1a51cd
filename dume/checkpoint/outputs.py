"""Where a run may write, and who may write there. Three rules protect a user's files (issue 20's hostile-user
pass found each broken):

- **An output never overlaps an input.** An `out` that is, contains or lies inside an expert checkpoint, a data
  folder or a run directory it reads would replace (or later be replaced by) what it reads:
  `check_output_path` refuses it before any work.
- **One writer per output.** `output_lock(path)` holds an exclusive `fcntl.flock` on `.NAME.lock` beside `path`
  (holding the writer's pid and command) from the start of the work to the final rename; a second run refuses
  with "another run (pid N) is writing X", or waits, for short writes. Re-entrant within a process, so a script
  may take it before its heavy work and the atomic write inside takes it again. A shared input (the strategies'
  zero-gate base MoE) is checked or rebuilt under the exclusive lock, then read under a shared one
  (`share_lock`, `reading_lock`): readers run side by side, a rebuild waits.
- **Enough disk before a large write** (`require_free_space`): found before minutes of work, with how much is
  needed and where.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from dume.errors import DumeError

_held: dict[str, list] = {}  # resolved path -> [fd, depth]; this process's locks
_held_guard = threading.Lock()


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _key(path: Path) -> str:
    return str(path.parent.resolve() / path.name)


def _holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "unknown pid"
    pid, _, cmd = text.partition(" ")
    return f"pid {pid}{': ' + cmd[:120] if cmd else ''}" if pid else "unknown pid"


def _acquire(lock_file: Path, path: Path, wait: bool, poll_s: float, shared: bool = False) -> int:
    """An fd holding the lock on `lock_file` -- exclusive (a writer, who records itself in the file), or
    `shared` with other readers. A lock on a file its holder unlinked meanwhile is retried on the new one, so
    two holders never coexist."""
    told = False
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DumeError(f"cannot create the lock file {lock_file} for {path} ({e.strerror}): "
                            "choose an output in a writable folder") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(lock_file)
            os.close(fd)
            if not wait:
                raise DumeError(f"another run ({who}) is writing {path}; wait for it to finish or choose "
                                "another output") from None
            if not told:
                print(f"waiting: another run ({who}) is writing {path}", file=sys.stderr)
                told = True
            time.sleep(poll_s)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed it between our open and our lock
            os.close(fd)
            continue
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {' '.join(sys.argv)[:500]}\n".encode("utf-8", "replace"))
        return fd


@contextlib.contextmanager
def _held_lock(path: Path, wait: bool, poll_s: float, shared: bool) -> Iterator[Path]:
    """This process's lock of `path` for the block: re-entrant (an inner lock of a path already held is that
    lock), released -- its file removed by the last holder -- when the outermost block ends. Non-main ranks of a
    launch hold nothing (rank 0 locks for the run)."""
    if _launched_non_main():
        yield path
        return
    key = _key(path)
    with _held_guard:
        reentered = key in _held
        if reentered:
            _held[key][1] += 1
    if not reentered:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock_path(path), path, wait, poll_s, shared)
        with _held_guard:
            _held[key] = [fd, 1]
    try:
        yield path
    finally:
        with _held_guard:
            _held[key][1] -= 1
            last = _held[key][1] == 0
            entry = _held.pop(key) if last else None
        if entry is not None:
            _release(entry[0], lock_path(path))


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, *, wait: bool = False, poll_s: float = 0.2) -> Iterator[Path]:
    """Hold the one-writer lock of `path` (a file or directory to be written) for the block. `wait=False`
    refuses when another process holds it; `wait=True` waits (for writes of moments, like a result file)."""
    with _held_lock(Path(path), wait, poll_s, shared=False) as held:
        yield held


@contextlib.contextmanager
def reading_lock(path: str | os.PathLike, *, poll_s: float = 0.2) -> Iterator[Path]:
    """Hold `path` for reading: with other readers, never while a writer (`output_lock`) holds it. Re-entrant,
    and inside this process's own `output_lock` of `path` it is that lock."""
    with _held_lock(Path(path), True, poll_s, shared=True) as held:
        yield held


def _release(fd: int, lock_file: Path) -> None:
    """Remove the lock file if no other process shares the lock (readers), while still holding it, so a waiter
    retries on a fresh file; then unlock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # other readers hold it: the last one removes the file
    else:
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
                lock_file.unlink()
    os.close(fd)


def share_lock(path: str | os.PathLike) -> None:
    """Turn this process's exclusive lock of `path` into a shared one, for an input checked or rebuilt under the
    exclusive lock and then only read: other readers may hold it too, a writer waits for all of them."""
    if _launched_non_main():
        return
    with _held_guard:
        entry = _held.get(_key(Path(path)))
    if entry is None:
        raise RuntimeError(f"share_lock: this process does not hold the lock of {path}")
    fcntl.flock(entry[0], fcntl.LOCK_SH)


def _launched_non_main() -> bool:
    """A process other than rank 0 of an `accelerate launch` / torchrun: the lock guards one *run* against
    another, and a launch's N processes are one run (its writes are rank 0's), so rank 0 holds it for all."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "output") -> Path:
    """Refuse an `out` that is, contains or lies inside any input (checkpoint, data file or folder, run
    directory); one line naming both. Returns `out` as given."""
    r = _resolved(out)
    for p in inputs:
        if p is None:
            continue
        q = _resolved(p)
        if r == q:
            raise DumeError(f"{what} {out} is the input {q}: writing it would destroy what is read; choose a new folder")
        if q in r.parents:
            raise DumeError(f"{what} {out} lies inside the input {q}: a later rewrite of that input would delete it; "
                            "choose a folder outside it")
        if r in q.parents:
            raise DumeError(f"{what} {out} contains the input {q}: replacing it would delete that input; "
                            "choose a new folder")
    return Path(out)


def check_writable_location(out: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work, an `out` that cannot be created: under a file, on a pseudo or read-only
    filesystem, or in a folder this user cannot write."""
    out = Path(out).expanduser()
    r = out.resolve()
    if r.parts[:2] in (("/", "proc"), ("/", "sys"), ("/", "dev")):
        raise DumeError(f"{what} {out} is on a kernel pseudo-filesystem ({'/'.join(r.parts[:2])[1:]}); "
                        "choose a folder on a disk")
    if r.exists() and not r.is_dir():
        raise DumeError(f"{what} {out} is a file, not a folder; choose a folder path")
    parent = r.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DumeError(f"{what} {out} lies under the file {parent}; choose a folder path")
    try:
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise DumeError(f"{what} {out}: {parent} is on a read-only filesystem; choose another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DumeError(f"{what} {out}: {parent} is not writable by this user; choose another folder")
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def require_free_space(where: str | os.PathLike, needed: int, what: str, margin: float = 1.05) -> None:
    """Refuse a write of about `needed` bytes into `where` when its filesystem has less free (with a 5 %
    margin): one line with both figures, before the work."""
    where = Path(where)
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * margin > free:
        raise DumeError(f"not enough disk for {what}: about {format_bytes(needed)} needed, {format_bytes(free)} free "
                        f"at {probe}; free some space or choose another output")


def os_error_line(e: BaseException) -> str | None:
    """One line for an OS or safetensors I/O error that reached a script's top: the file, the cause and the
    fix. None when `e` is not one."""
    name = getattr(e, "filename", None)
    where = f" ({name})" if name else ""
    code = getattr(e, "errno", None)
    text = str(e)
    if type(e).__name__ == "SafetensorError":
        if "os error 28" in text:
            code = errno.ENOSPC
        elif "os error" in text:
            return f"cannot write or read a safetensors file: {text}; check the folder's space and permissions"
        else:
            return f"a safetensors file is corrupted or not safetensors ({text}); rewrite it or redo the step that made it"
    elif not isinstance(e, OSError):
        return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full{where}: the write stopped for lack of space ({text}); nothing was replaced -- free "
                "space or choose another output, then rerun")
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: {text}; choose a folder this user can write"
    if code == errno.EROFS:
        return f"read-only filesystem{where}: {text}; choose another output folder"
    if code == errno.ENOENT:
        return f"no such file or folder{where}: {text}"
    return f"operating-system error{where}: {text}"
