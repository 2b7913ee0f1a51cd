"""Which device a heavy step runs on: `auto` is this process's CUDA GPU when there is one
(under `accelerate launch`, the one of its local rank), else the CPU. A device the machine
lacks is refused when the flags are read, not after minutes of hashing and reading."""

from __future__ import annotations

import os

from dume.errors import DumeError

DEVICE_HELP = "auto (this process's CUDA GPU when present, else cpu), cpu, cuda, cuda:N or mps"


def check_device(device) -> str:
    """`device` if this machine has it (`auto` always), else one clear error."""
    import torch

    if not isinstance(device, str) or not device.strip():
        raise DumeError(f"device must be a string ({DEVICE_HELP}), got {device!r}")
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DumeError(f"device {device!r} is not a device name ({DEVICE_HELP})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DumeError(f"device {device!r} but this machine has no usable CUDA GPU; use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DumeError(f"device {device!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DumeError(f"device {device!r} but MPS is not available here; use auto or cpu")
    elif dev.type != "cpu":
        raise DumeError(f"device {device!r} is not supported ({DEVICE_HELP})")
    return device


def resolve_device(device: str) -> str:
    """The concrete device of a checked name: `auto` -> cuda:LOCAL_RANK or cpu."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"
