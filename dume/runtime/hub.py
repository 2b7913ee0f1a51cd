"""Reaching the Hugging Face hub: fail in seconds, with one line, when it cannot be reached.

With no network and no offline flags, `huggingface_hub` retries for half a minute and prints a dozen lines before
its error; a user who gave a hub id by mistake, or forgot `HF_HUB_OFFLINE=1`, deserves the answer at once.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import urlparse

from dume.errors import DumeError

PROBE_TIMEOUT_S = 3.0


def endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's endpoint answers one HTTP request within `timeout_s` (any HTTP status counts: it
    answered). A bare TCP connect is not enough -- sandboxes and proxies accept connections they never answer.
    Run in a thread so a hanging DNS lookup is bounded too."""
    import urllib.error
    import urllib.request

    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/models?limit=1"
    ok = []

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
                ok.append(True)
        except urllib.error.HTTPError:
            ok.append(True)
        except (OSError, ValueError):
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    return bool(ok)


def require_hub(what: str, instead: str) -> None:
    """Refuse, within a few seconds, a download of `what` that cannot happen: offline flags
    set, or the endpoint unreachable. `instead` says what the user can give."""
    host, port = endpoint()
    if offline():
        raise DumeError(f"{what} is not in the local cache and the hub is switched off (HF_HUB_OFFLINE / "
                        f"HF_DATASETS_OFFLINE); {instead}")
    if not reachable():
        raise DumeError(f"{what}: the hub ({host}:{port}) cannot be reached from here within "
                        f"{PROBE_TIMEOUT_S:.0f} s and it is not cached; {instead}, or set HF_HUB_OFFLINE=1 "
                        "to use only the cache")
