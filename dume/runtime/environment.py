"""What a result was computed on (versions, machine): one record with every result, report and benchmark."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "datasets", "safetensors", "numpy", "matplotlib",
            "dume")


def versions(packages=PACKAGES) -> dict:
    """{"python": ..., package: installed version} for the installed ones of `packages`."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in packages:
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """The machine: architecture, CPU, system, cores, torch's threads, the GPU if any."""
    import torch

    return {"machine": platform.machine(), "processor": cpu_name(), "system": f"{platform.system()} {platform.release()}",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def environment() -> dict:
    """The record kept with every result: the core libraries' versions and the machine
    (under `accelerate launch`, also the processes and the collectives' timeout)."""
    from dume.runtime.distributed import process_group_timeout, world_size

    launch = ({"processes": world_size(), "process_group_timeout_s": process_group_timeout().total_seconds()}
              if world_size() > 1 else {})
    return {**versions(("torch", "transformers", "accelerate")), **hardware(), **launch}
