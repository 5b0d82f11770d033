"""The study a report ranks beside this one (edge layer): its folder and its ``summary.csv``, read and checked.

``align compare`` reads it before any work (``--dry-run`` included), so that a file it cannot use is one line then,
not a crash in the report after every cell has trained; the report reads it again when it is written.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from align.common.errors import AlignError, shorten
from align.common.paths import studies_dir
from align.study.stats import SCORE, SCORES

SUMMARY = "summary.csv"
# The columns the side-by-side section shows besides the optimizer and its headline mean; a summary.csv written
# before one of them existed reads as blank there ("—").
COMPARISON = ("pairs", "diff_vs_ref", "diff_ci_low", "diff_ci_high", "seeds", "diverged_seeds")


def beside_folder(beside: str) -> Path:
    """The folder ``beside`` names: a study's name under the studies folder, or a folder given as a path (with a /)."""
    return Path(beside) if "/" in beside else studies_dir() / beside


def read_beside(beside: str) -> list[dict[str, Any]] | None:
    """The other study's summary entries (numbers parsed; a file written before studies had a ``score`` column
    ranks on mean R@1), or None when its summary.csv does not exist yet; an AlignError naming the file and what to
    do when it cannot be read, lacks a column the ranking needs, or holds a value that is not a number."""
    path = beside_folder(beside) / SUMMARY
    if not path.is_file():
        return None
    hint = "run that study again (align compare) to rewrite it, or set beside: to another study"
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header, raw = reader.fieldnames or [], list(reader)
    except UnicodeDecodeError:
        raise AlignError(f"beside: {path} is not UTF-8 text: {hint}") from None
    except csv.Error as exc:
        raise AlignError(f"beside: {path} is not a CSV file ({exc}): {hint}") from None
    except OSError as exc:
        raise AlignError(f"beside: cannot read {path}: {exc.strerror}") from None
    if any(None in r for r in raw):
        raise AlignError(f"beside: {path} has a row with more fields than its header: {hint}")
    scores = {r.get("score") or SCORE for r in raw}
    unknown = sorted(scores - set(SCORES))
    if unknown or len(scores) > 1:
        what = f"an unknown score {shorten(unknown[0], 40)!r}" if unknown else f"several scores ({', '.join(scores)})"
        raise AlignError(f"beside: {path} has {what}: {hint}")
    needed = ["optimizer", *(f"{s}_mean" for s in scores)]
    missing = [c for c in needed if c not in header]
    if missing:
        raise AlignError(f"beside: {path} has no column {', '.join(missing)}: {hint}")
    return [_entry(r, path, line, hint) for line, r in enumerate(raw, start=2)]


def _entry(row: dict[str, str | None], path: Path, line: int, hint: str) -> dict[str, Any]:
    """One summary entry: every mean, std and comparison column as a number (NaN where blank or absent)."""
    entry: dict[str, Any] = {column: math.nan for column in COMPARISON}
    for column, text in row.items():
        if not (column.endswith(("_mean", "_std")) or column in COMPARISON):
            continue
        try:
            entry[column] = float(text) if text not in ("", None) else math.nan
        except ValueError:
            raise AlignError(f"beside: {path} line {line}, column {column}: {shorten(str(text), 40)!r} is not a "
                             f"number: {hint}") from None
    pairs = entry["pairs"]
    if not math.isnan(pairs) and not (math.isfinite(pairs) and pairs >= 0 and pairs == int(pairs)):
        raise AlignError(f"beside: {path} line {line}, column pairs: {pairs!r} is not a count: {hint}")
    entry["pairs"] = None if math.isnan(pairs) else int(pairs)
    entry.update(optimizer=row["optimizer"] or "", verdict=row.get("verdict") or None,
                 score=row.get("score") or SCORE)
    return entry
