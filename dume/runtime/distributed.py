"""Who this process is under `accelerate launch`, and waiting for the others."""

from __future__ import annotations

import contextlib
import os

import torch


def world_size() -> int:
    """Processes of this launch (1 without `accelerate launch`), known before any setup."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def partial_state():
    """accelerate's process state. On a machine without CUDA it must be asked for the CPU
    explicitly: otherwise `accelerate launch --multi_gpu` on CPUs leaves every process
    believing it is alone (DistributedType.NO), and each would write every file."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """Only the main process writes checkpoints and results under `accelerate launch`."""
    return world_size() <= 1 or partial_state().is_main_process


def wait_for_everyone() -> None:
    if world_size() > 1:
        partial_state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first():
    """The main process runs the body first (preparing files); the others follow and
    find them ready. A no-op without `accelerate launch`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from dume.runtime.distributed import partial_state

    with partial_state().main_process_first():
        yield
