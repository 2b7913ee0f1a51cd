"""Checks of users' numbers, shared by every front door (flags, YAML keys, library
arguments), so that one bad value reads the same wherever it was given."""

from __future__ import annotations

import math

from dume.errors import DumeError


def positive_int(name: str, value, allow_none: bool = False, minimum: int = 1):
    """`value` when it is an integer >= `minimum` (or None with `allow_none`); else one clear error naming it."""
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise DumeError(f"{name} must be {what}{' or null' if allow_none else ''}, got {value!r}")
    return value


def positive_number(name: str, value) -> float:
    """`value` as a float when it is a finite number > 0; else one clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DumeError(f"{name} must be a positive number, got {value!r}")
    return float(value)
