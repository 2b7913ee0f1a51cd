"""Giving freed memory back to the operating system between the phases of a build.

glibc keeps large freed blocks in its heap once its mmap threshold has grown (it grows after the first large
free), so a process that builds and drops a dense oracle per domain, then writes a MoE, holds the high-water mark
of every phase at once. `malloc_trim(0)` returns the free heap pages; measured with `bench/build_memory.py` (see
the README's "Your own experts"). A no-op where the C library has no `malloc_trim` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (looked up once: find_library may run ldconfig)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Collect Python garbage, then hand the C heap's free pages back (glibc only)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
