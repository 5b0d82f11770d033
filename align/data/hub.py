"""When to leave the Hugging Face Hub alone: one offline rule for encoders and datasets (edge layer).

Offline mode is on when any of ``OFFLINE_VARS`` is 1/true/yes/on, or when huggingface_hub or datasets, already
imported, froze it on at import. Otherwise the hub is used only if its host accepts a TCP connection (a miss
costs seconds, not the libraries' minutes of retries); behind a proxy (``PROXY_VARS``) a direct connection says
nothing, so there the library is left to try. Nothing heavy is imported at module level.
"""
from __future__ import annotations

import functools
import importlib
import os
import socket
import sys
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_LIBRARY_FLAGS = ("huggingface_hub.constants", "datasets.config")  # modules holding HF_HUB_OFFLINE read at import
_TRUE = {"1", "true", "yes", "on"}


def _offline_var() -> str | None:
    return next((v for v in OFFLINE_VARS if (os.environ.get(v) or "").strip().lower() in _TRUE), None)


def offline_mode() -> bool:
    """True when an ``OFFLINE_VARS`` variable is set, or a loaded hub library already runs offline."""
    if _offline_var() is not None:
        return True
    return any(bool(getattr(sys.modules.get(name), "HF_HUB_OFFLINE", False)) for name in _LIBRARY_FLAGS)


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether to try the hub at ``endpoint``: yes behind a proxy, else whether one TCP connection succeeds."""
    if any(os.environ.get(v) for v in PROXY_VARS):
        return True
    parsed = urlparse(endpoint)
    return _connects(parsed.hostname or "", parsed.port or 443, timeout)


@functools.lru_cache(maxsize=4)
def _connects(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_only(endpoint: str | None = None) -> bool:
    """True when only locally cached hub files may be used: offline mode, or the hub out of reach.

    ``endpoint`` defaults to huggingface_hub's, read at call time so a changed endpoint is honoured.
    """
    if offline_mode():
        return True
    if endpoint is None:
        endpoint = importlib.import_module("huggingface_hub.constants").ENDPOINT
    return not hub_reachable(endpoint)


def offline_reason() -> str:
    """Why ``local_only()`` holds, for error messages: the variable that is set, or the unreachable hub."""
    var = _offline_var()
    if var is not None:
        return f"{var} is set"
    return "offline mode is on (HF_HUB_OFFLINE)" if offline_mode() else "the Hugging Face Hub cannot be reached"
