"""The reasoning scripts' shared flags and their checks."""

from __future__ import annotations

from dume.errors import DumeError
from dume.reasoning.settings import PAPER
from dume.reasoning.tasks import DOMAINS


def check_router_settings(*, lam=None, k=None, temperature=None, num_dume_tokens=None, max_num_samples=None,
                          train_steps=None, train_lr=None, limit=None, router_prompts=None) -> None:
    """Every numeric flag of the reasoning scripts, checked before any hub or disk work (a bad flag must not
    hide behind a slow download or a hub error). None = not given."""
    if lam is not None and not lam > 0:
        raise DumeError(f"--lambda must be > 0, got {lam}")
    if temperature is not None and not temperature > 0:
        raise DumeError(f"--temp must be > 0, got {temperature}")
    if k is not None and not 1 <= k <= len(DOMAINS):
        raise DumeError(f"--k must be in 1..{len(DOMAINS)} (the number of experts), got {k}")
    for flag, value in (("--num-dume-tokens", num_dume_tokens), ("--max-num-samples", max_num_samples),
                        ("--train-steps", train_steps), ("--limit", limit), ("--router-prompts", router_prompts)):
        if value is not None and value < 1:
            raise DumeError(f"{flag} must be >= 1, got {value}")
    if train_lr is not None and not train_lr > 0:
        raise DumeError(f"--train-lr must be > 0, got {train_lr}")


def parse_cap(value: str) -> int | None:
    """--max-num-samples: a positive count, or `all`."""
    import argparse

    if value.lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 'all'), got {n}")
    return n


def add_statistics_flags(p) -> None:
    """The flags that choose DUME's statistics texts (both reasoning scripts)."""
    from dume.reasoning.tasks import STATISTICS_TEXTS

    p.add_argument("--max-num-samples", type=parse_cap, default=PAPER["max_num_samples"],
                   help="texts per domain for the statistics (default 2048, the original's; 'all' for no cap)")
    p.add_argument("--statistics-text", default="prompt", choices=STATISTICS_TEXTS,
                   help="prompt: the prompt side of each record only (the original's); full: prompt and answer")
    p.add_argument("--no-balance-languages", dest="balance_languages", action="store_false",
                   help="m_arc: take languages in order up to the cap instead of an even share each")
