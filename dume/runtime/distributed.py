"""Who this process is under `accelerate launch`, waiting for the others, and sharing work.

Two kinds of waiting, on purpose. Collectives inside a step (DDP's gradient all-reduce, summing statistics) take
the process group's timeout (`process_group_timeout`, recorded with results): a rank that died is noticed in
minutes. Waiting for one process to prepare something (rank 0 tokenising the pretraining budget, downloading
experts, building a model) can take hours, so `wait_for_everyone` / `main_process_first` never block in a
collective: each process counts itself in a key of the process group's store and polls it, so no timeout applies.
If a process dies while the others wait, the launcher (torchrun, `accelerate launch`) stops them all.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch

from dume.errors import DumeError

TIMEOUT_ENV = "DUME_PROCESS_GROUP_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800  # torch's NCCL default is 600 s; a long eval batch on one rank stays within this
_POLL_S = 0.2
_waits = itertools.count()  # every process waits the same number of times, in the same order


def world_size() -> int:
    """Processes of this launch (1 without `accelerate launch`), known before any setup."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_group_timeout() -> timedelta:
    """The collectives' timeout: $DUME_PROCESS_GROUP_TIMEOUT seconds, else 30 minutes."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise DumeError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def partial_state():
    """accelerate's process state, created with `process_group_timeout()` (the first call creates the process
    group; later `Accelerator`s share it). Without CUDA it must be asked for the CPU explicitly, or `accelerate
    launch --multi_gpu` on CPUs leaves every process believing it is alone, each writing every file."""
    from accelerate import PartialState

    if world_size() <= 1:
        return PartialState(cpu=not torch.cuda.is_available())
    return PartialState(cpu=not torch.cuda.is_available(), timeout=process_group_timeout())


def is_main_process() -> bool:
    """Only the main process writes checkpoints and results under `accelerate launch`."""
    return world_size() <= 1 or partial_state().is_main_process


def _store_barrier() -> None:
    """Every process arrives, with no timeout: counted in the store and polled (why: the module docstring)."""
    state = partial_state()
    import torch.distributed as dist

    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get_store is None:  # a torch without it: a plain barrier (the group's timeout applies)
        state.wait_for_everyone()
        return
    store, key = get_store(), f"dume/wait/{next(_waits)}"
    store.add(key, 1)
    while store.add(key, 0) < state.num_processes:
        time.sleep(_POLL_S)


def wait_for_everyone() -> None:
    if world_size() > 1:
        _store_barrier()


@contextlib.contextmanager
def main_process_first():
    """The main process runs the body first (preparing files, however long it takes); the
    others wait without a timeout, then run it and find them ready. A no-op alone."""
    if world_size() <= 1:
        yield
        return
    if partial_state().is_main_process:
        yield
        _store_barrier()
    else:
        _store_barrier()
        yield


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: rank `rank` of `world` processes."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_shard() -> Shard:
    """A single process, or one of `accelerate launch`'s (gloo on CPU, NCCL on GPU). Accelerate's state is only
    touched when launched, so a later `Accelerator` in the same process stays free to choose its own settings."""
    if world_size() <= 1:
        return Shard(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    state = partial_state()
    return Shard(state.process_index, state.num_processes, state.device)


def my_share(items: Sequence, shard: Shard) -> list:
    """This process's contiguous share (accelerate's `split_between_processes`; every item once over all)."""
    if shard.world <= 1:
        return list(items)
    with partial_state().split_between_processes(list(items)) as mine:
        return list(mine)


def all_reduce_sum(tensors: Sequence[torch.Tensor], shard: Shard) -> None:
    """Sum each tensor over the processes in place, one layer at a time: accelerate's `reduce` returns a summed
    copy, so the transient copy is one [H, H] block, not the whole [L, H, H] (2 GB in float64 for a 3B model)."""
    if shard.world <= 1:
        return
    from accelerate.utils import reduce

    for t in tensors:
        for part in (t if t.dim() >= 2 else [t]):
            part.copy_(reduce(part, reduction="sum"))


def single_process_env() -> dict[str, str]:
    """This environment without the launcher's variables: a child started with it is a
    plain single process (its `Accelerator` sees no peers), on this rank's device."""
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC_")}
    local = os.environ.get("LOCAL_RANK")
    if local is not None and torch.cuda.is_available() and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = local
    return env


def run_on_main_only(script: str, argv: Sequence[str], extra_argv: Sequence[str] = ()) -> bool:
    """Under `accelerate launch`, run `script argv extra_argv` once, in a single-process child of the main process,
    while the others wait (no timeout), and return True: the caller stops. Alone, False: the caller does the work.

    For the scripts whose work is one build and its evaluation (the CLM evaluation and strategies scripts): one
    process builds and writes, so nothing is built, written or collected N times, and router training is a plain
    single-process run (BTX's DDP collectives need every rank inside the build)."""
    import subprocess
    import sys

    if world_size() <= 1:
        return False
    failed = None
    if partial_state().is_main_process:
        print(f"{os.path.basename(script)}: {world_size()} processes; the main process runs it alone "
              "(the others wait)", flush=True)
        code = subprocess.run([sys.executable, script, *argv, *extra_argv], env=single_process_env()).returncode
        failed = code or None
    _store_barrier()
    if failed:
        raise DumeError(f"{os.path.basename(script)} failed in the main process (exit {failed}; its message is above)")
    return True
