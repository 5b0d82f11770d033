"""What the table-like sources (hub, imagefolder, csv) share: which columns hold the image, the captions and the
split, and how a caption cell becomes captions (edge layer: part of reading a source).

``Columns`` is the column part of a ``DatasetSpec``; ``pick_column`` finds a column by name or by the usual
names (``IMAGE_COLUMN_GUESSES``, ``CAPTION_COLUMN_GUESSES``); ``split_captions`` turns a cell (text, text with
separators, or a list of texts) into non-empty captions, or one AlignError line naming the row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align.common.errors import AlignError

IMAGE_COLUMN_GUESSES = ("image", "img", "jpg", "jpeg", "png", "webp", "file_name", "image_path", "filepath", "path",
                        "file")
CAPTION_COLUMN_GUESSES = ("captions", "caption", "txt", "text", "sentences", "alt_text", "sentence")


@dataclass(frozen=True)
class Columns:
    """The column mapping of a spec: None means the source's default (a guess among the usual names)."""

    image_column: str | None = None
    caption_column: str | None = None
    caption_separator: str | None = None  # split a text column into several captions (e.g. "\n")
    split_column: str | None = None  # keep rows whose value is in split_values[split] (default: == split)
    split_values: dict[str, list[str]] | None = None

    def accepted(self, split: str) -> list[str]:
        """The split-column values that mean ``split``."""
        if self.split_values and split in self.split_values:
            return list(self.split_values[split])
        return [split]

    def split_filter(self, split: str) -> set[str] | None:
        """The accepted split-column values, or None when there is no split column (every row is kept)."""
        return set(self.accepted(split)) if self.split_column else None

    def identity(self, split: str) -> dict[str, Any]:
        """The mapping as it changes the loaded values of ``split`` (part of a source's cache-key identity)."""
        return {"image_column": self.image_column, "caption_column": self.caption_column,
                "caption_separator": self.caption_separator, "split_column": self.split_column,
                "split_values": self.accepted(split) if self.split_column else None}


def pick_column(columns: list[str], wanted: str | None, guesses: tuple[str, ...], role: str, where: str,
                fallback: int | None = None) -> str:
    """``wanted`` if the table has it; else the first of ``guesses`` it has; else column ``fallback``."""
    if wanted is not None:
        if wanted not in columns:
            raise AlignError(f"{where}: no {role} column {wanted!r}; columns are: {', '.join(columns)} "
                             f"(set {role}_column)")
        return wanted
    for guess in guesses:
        if guess in columns:
            return guess
    if fallback is not None and len(columns) > fallback:
        return columns[fallback]
    raise AlignError(f"{where}: cannot tell which column holds the {role}; columns are: {', '.join(columns)} "
                     f"(set {role}_column)")


def split_captions(value: Any, separator: str | None, where: str) -> list[str]:
    """A caption cell (text, text with separators, or a list of texts) → non-empty captions."""
    if value is None:
        raise AlignError(f"{where}: missing caption; fix or remove this row")
    if isinstance(value, str) and separator is not None:
        parts = [p for p in value.split(separator) if p.strip()]  # blank lines are formatting, not captions
        return [_clean(p, where) for p in parts] or [_clean("", where)]
    if isinstance(value, (list, tuple)):
        if not value:
            raise AlignError(f"{where}: empty caption list; fix or remove this row")
        return [_clean(v, where) for v in value]
    return [_clean(value, where)]


def _clean(text: Any, where: str) -> str:
    """A caption stripped of surrounding whitespace; empty or non-text captions are an AlignError."""
    if not isinstance(text, str):
        raise AlignError(f"{where}: caption is {type(text).__name__}, expected text")
    text = text.strip()
    if not text:
        raise AlignError(f"{where}: empty caption; fix or remove this row")
    return text
