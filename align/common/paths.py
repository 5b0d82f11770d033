"""Where align keeps its files unless told otherwise: one data root ($ALIGN_HOME, else ./data) and its folders.

Read at call time, so setting ALIGN_HOME moves every default; explicit options (--root, --cache-root, --out, a
config's cache_root or out_dir) still win. No heavy imports: the CLI reads these to build its defaults.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "ALIGN_HOME"


def data_root() -> Path:
    """``$ALIGN_HOME`` when set and not empty, else ``data`` relative to the working directory."""
    home = os.environ.get(ENV, "").strip()
    return Path(home).expanduser() if home else Path("data")


def cache_dir() -> Path:
    """Default cache root of ``align embed``: <data root>/cache."""
    return data_root() / "cache"


def runs_dir() -> Path:
    """Default parent of training run directories: <data root>/runs."""
    return data_root() / "runs"


def studies_dir() -> Path:
    """Default parent of ``align compare`` study folders: <data root>/studies."""
    return data_root() / "studies"


def toy_dir() -> Path:
    """Default output folder of ``align toy``: <data root>/toy."""
    return data_root() / "toy"
