"""Saving figures (edge): pyplot with the Agg backend (no display), loaded on first use, and an atomic PNG write
whose refusal by the file system (full, read-only, ...) is one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from align.common.files import is_write_problem, remove_quietly, write_error


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported here: matplotlib is heavy, and only figures need it)."""
    import matplotlib  # heavy: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: as above

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Save ``fig`` atomically (temporary file, then rename); a failed save removes its temporary file, and a
    refusal of the file system is ``write_error``'s one line naming ``path``."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(path)
    except BaseException as exc:
        remove_quietly(tmp)  # never a second error over the first (read-only: even this unlink is refused)
        if is_write_problem(exc):
            raise write_error(path, exc) from None
        raise
    return path
