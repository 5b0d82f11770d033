"""Saving figures (edge): pyplot with the Agg backend (no display), loaded on first use, and an atomic PNG write
whose full-disk failure is one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from align.common.files import disk_full_error, is_disk_full


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported here: matplotlib is heavy, and only figures need it)."""
    import matplotlib  # heavy: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: as above

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Save ``fig`` atomically (temporary file, then rename); a failed save removes its temporary file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        raise
    return path
