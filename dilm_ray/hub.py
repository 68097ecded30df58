"""Reaching the Hugging Face hub: a quick probe, so that a machine without network fails in
seconds rather than after the libraries' retries (about 40 s per resource here).

When the hub cannot be reached, the process switches ``huggingface_hub``, ``transformers`` and
``datasets`` to offline mode: what is in the local cache still loads, anything else fails at
once with the caller's one-line error.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 3.0
_state: dict[str, tuple[bool, str]] = {}


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set, or a probe of this process found the hub unreachable."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def reachable(timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(True, "") if the hub's endpoint answers at all within ``timeout_s`` seconds (any HTTP
    status counts), else (False, reason). Probed once per process and endpoint."""
    url = endpoint()
    if url not in _state:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/models?limit=1", method="HEAD"), timeout=timeout_s).close()
            _state[url] = (True, "")
        except urllib.error.HTTPError:
            _state[url] = (True, "")  # it answered
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            _state[url] = (False, next(iter(str(reason).splitlines()), "")[:120] or type(exc).__name__)
    return _state[url]


def go_offline_if_unreachable() -> str | None:
    """Before a hub download: if the hub is unreachable, switch the libraries to offline mode
    (the local cache still works) and return why; None when it is reachable or already offline."""
    if offline():
        return None
    ok, reason = reachable()
    if ok:
        return None
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # Ray workers and subprocesses too
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return f"the hub at {endpoint()} cannot be reached: {reason}"
