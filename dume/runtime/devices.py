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


def _cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo: x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def computes_bf16(device: str) -> bool:
    """Whether `device` has bfloat16 arithmetic: a CUDA GPU that supports it, or a CPU with AVX-512 BF16, AMX or
    Arm's BF16 extension, where oneDNN's bf16 matmuls beat float32 by far (a Qwen3-0.6B forward on this project's
    2-core AVX-512 BF16 machine: 362 tokens/s in bf16, 133 in float32, issue 23). Without those units torch
    emulates bf16, slower than float32."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def compute_dtype(requested: str, device: str, stored):
    """The dtype forward passes run in. `float32` / `bfloat16` as asked; `auto`: the experts' stored dtype where
    the device computes it natively (bf16 experts on a GPU or a CPU with bf16 units), else float32 -- so float32
    experts are never rounded, and bf16 experts on an old CPU are not emulated. Whatever runs the forward, the
    statistics' products are summed in float32 and their totals in float64 (`dume.stats.ridge`)."""
    import torch

    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested]
    return torch.bfloat16 if stored == torch.bfloat16 and computes_bf16(device) else torch.float32
