"""Where align keeps its files by default: one data root, ``$ALIGN_HOME`` if set, else ``./data``."""
from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """``$ALIGN_HOME`` or ``./data``: every default folder (cache, runs, studies, toy) lives under it."""
    return Path(os.environ.get("ALIGN_HOME") or "data")


def cache_root() -> Path:
    return data_root() / "cache"


def runs_root() -> Path:
    return data_root() / "runs"


def studies_root() -> Path:
    return data_root() / "studies"


def toy_root() -> Path:
    return data_root() / "toy"
