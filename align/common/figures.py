"""Saving figures (edge): matplotlib with the Agg backend, loaded on first use, and an atomic PNG write
whose full-disk failure is one line.
"""
from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Save ``fig`` atomically (temporary file, then rename); a failed save removes its temporary file."""
    from align.common.files import disk_full_error, is_disk_full

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
