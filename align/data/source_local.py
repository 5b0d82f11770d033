"""Local image–caption sources (edge layer): a folder of images with metadata, or a CSV/TSV file of rows.

- ``imagefolder``: a folder of images with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + ``caption``
  or ``captions``); split sub-folders (``root/test/metadata.jsonl``) or a split column. A flat folder is the
  split ``train`` (the ``datasets`` convention), so a test split is never silently the training data.
- ``csv``: a CSV/TSV file of (image path, caption) rows, paths relative to the file; rows naming the same image
  are one image with several captions. ``{split}`` in ``path`` selects a file per split.

Image paths must stay inside the folder unless ``allow_outside_root``. A source is identified by content (the
metadata bytes; name, size and mtime of each image: ``stat_fingerprint``), not by its absolute path.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from PIL import Image

from align.common.config import shorten
from align.common.errors import AlignError
from align.common.files import sha256_file
from align.data.caption_set import ImageCaptionSet, Selection, open_image
from align.data.source_columns import (CAPTION_COLUMN_GUESSES, IMAGE_COLUMN_GUESSES, Columns, pick_column,
                                       split_captions)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FLAT_SPLIT = "train"  # what a source without splits is called (as in ``datasets``)


class _FileImages:
    """Picklable loader of image files: ``root / relpath``."""

    def __init__(self, root: Path, relpaths: list[str]) -> None:
        self.root, self.relpaths = root, relpaths

    def __call__(self, i: int) -> Image.Image:
        return open_image(self.root / self.relpaths[i], self.relpaths[i])


@dataclass
class _LocalRows:
    """Parsed local metadata: image paths (relative to root) with their captions, in first-seen order."""

    root: Path
    source: Path  # the metadata / CSV file
    relpaths: list[str]
    captions: list[list[str]]


@dataclass(frozen=True)
class LocalSource:
    """An ``imagefolder`` or ``csv`` source: where it is, how its columns map, which part of a split to keep."""

    kind: Literal["imagefolder", "csv"]
    path: str  # folder or file; "{split}" in it is replaced by the split
    columns: Columns
    selection: Selection
    allow_outside_root: bool = False  # read image paths that are absolute or climb out of the folder with ..
    delimiter: str | None = None  # csv: auto by extension (.tsv/.tab → tab, else comma)

    def load(self, split: str) -> ImageCaptionSet:
        """The rows of ``split``: images read from files on demand."""
        rows = self._parse(split)
        if not rows.relpaths:
            raise AlignError(f"{rows.source}: no rows for split {split!r}")
        meta = {"source": str(rows.source), "split": split}
        return self.selection.apply(f"{rows.source.name}/{split}", rows.relpaths, rows.captions,
                                    _FileImages(rows.root, rows.relpaths), meta)

    def identity(self, split: str) -> dict[str, Any]:
        """The metadata file's bytes and the stat fingerprint of the selected images, plus the column mapping."""
        rows = self._parse(split)
        limit = self.selection.max_images
        n = len(rows.relpaths) if limit is None else min(limit, len(rows.relpaths))
        return {"split": split, "metadata_sha256": sha256_file(rows.source),
                "images_stat_sha256": stat_fingerprint((rows.root / p for p in rows.relpaths[:n]), rows.root),
                "delimiter": self.delimiter, **self.columns.identity(split)}

    def _parse(self, split: str) -> _LocalRows:
        return self._parse_imagefolder(split) if self.kind == "imagefolder" else self._parse_csv(split)

    def _parse_imagefolder(self, split: str) -> _LocalRows:
        meta, needs_split_rule = self._imagefolder_metadata(split)
        if needs_split_rule:
            self._check_flat_split(split, meta.parent)
        if meta.suffix == ".jsonl":
            names, rows = _read_jsonl(meta)
        else:
            names, rows = _read_table(meta, ",")
        cols = self.columns
        image_col = pick_column(names, cols.image_column, ("file_name",), "image", str(meta))
        caption_col = pick_column(names, cols.caption_column, CAPTION_COLUMN_GUESSES, "caption", str(meta))
        if cols.split_column is not None:
            pick_column(names, cols.split_column, (), "split", str(meta))
        relpaths, captions = self._group_rows(rows, image_col, caption_col, split, str(meta),
                                              parse_json_lists=meta.suffix == ".csv")
        return _LocalRows(meta.parent, meta, relpaths, captions)

    def _parse_csv(self, split: str) -> _LocalRows:
        path, by_placeholder = self._split_path(split)
        if not path.is_file():
            raise AlignError(f"CSV file not found: {path} (set path to a CSV/TSV of image path, caption rows)")
        if not by_placeholder:
            self._check_flat_split(split, path)
        delimiter = self.delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
        header, rows = _read_table(path, delimiter)
        cols = self.columns
        image_col = pick_column(header, cols.image_column, IMAGE_COLUMN_GUESSES, "image", str(path), fallback=0)
        caption_col = pick_column(header, cols.caption_column, CAPTION_COLUMN_GUESSES, "caption", str(path),
                                  fallback=1)
        if cols.split_column is not None:
            pick_column(header, cols.split_column, (), "split", str(path))
        relpaths, captions = self._group_rows(rows, image_col, caption_col, split, str(path), parse_json_lists=True)
        return _LocalRows(path.parent, path, relpaths, captions)

    def _split_path(self, split: str) -> tuple[Path, bool]:
        """The path for ``split`` and whether the path itself selects the split (``{split}`` placeholder)."""
        if "{split}" in self.path:
            return Path(self.path.replace("{split}", split)).expanduser(), True
        return Path(self.path).expanduser(), False

    def _imagefolder_metadata(self, split: str) -> tuple[Path, bool]:
        """(metadata file, whether the rows still need the split-column filter / flat-split rule)."""
        root, by_placeholder = self._split_path(split)
        if not root.is_dir():
            raise AlignError(f"image folder not found: {root} (set path to a folder with images and metadata.jsonl "
                             f"or metadata.csv)")
        if not by_placeholder:
            sub = _find_metadata(root / split) if (root / split).is_dir() else None
            if sub is not None:
                return sub, False
        meta = _find_metadata(root)
        if meta is None:
            raise AlignError(f"{root} has no metadata.jsonl or metadata.csv (one row per image: file_name plus "
                             f"caption or captions)")
        return meta, not by_placeholder

    def _check_flat_split(self, split: str, where: Path) -> None:
        if self.columns.split_column is None and split != FLAT_SPLIT:
            raise AlignError(f"{where} has no split {split!r}: use split {FLAT_SPLIT!r} for a source without splits, "
                             f"put the split in a sub-folder or a file named with {{split}} in path, or set "
                             f"split_column")

    def _group_rows(self, rows: Iterable[tuple[int, dict[str, Any]]], image_col: str, caption_col: str, split: str,
                    where: str, parse_json_lists: bool) -> tuple[list[str], list[list[str]]]:
        """(line number, row) → image paths in first-seen order and their captions; split filter applied."""
        cols = self.columns
        accepted = cols.split_filter(split)
        order: dict[str, list[str]] = {}
        for line, row in rows:
            here = f"{where} line {line}"
            if accepted is not None:
                if cols.split_column not in row:
                    raise AlignError(f"{here}: no split column {cols.split_column!r} (set split_column)")
                if str(row[cols.split_column]) not in accepted:
                    continue
            image = row.get(image_col)
            if not isinstance(image, str) or not image.strip():
                raise AlignError(f"{here}: missing image path in column {image_col!r}")
            if not self.allow_outside_root and _leaves_root(image.strip()):
                raise AlignError(f"{here}: image path {shorten(repr(image.strip()), 80)} is outside the dataset "
                                 f"folder: move the image inside it, or set allow_outside_root: true in the dataset "
                                 f"spec")
            value = row.get(caption_col)
            if parse_json_lists and isinstance(value, str) and value.lstrip().startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise AlignError(f"{here}: column {caption_col!r} looks like a JSON list but does not parse") \
                        from None
            order.setdefault(image.strip(), []).extend(split_captions(value, cols.caption_separator, here))
        return list(order), list(order.values())


def stat_fingerprint(paths: Iterable[Path], root: Path) -> str:
    """sha256 over (path relative to root, size, mtime_ns) — changes when any image file changes."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = p.stat()
            entry = [os.path.relpath(p, root), st.st_size, st.st_mtime_ns]
        except OSError:
            entry = [os.path.relpath(p, root), "missing"]
        h.update(json.dumps(entry).encode() + b"\n")
    return h.hexdigest()


def _find_metadata(folder: Path) -> Path | None:
    found = [folder / m for m in METADATA_FILES if (folder / m).is_file()]
    return found[0] if found else None


def _leaves_root(image: str) -> bool:
    """Whether a metadata image path is absolute or climbs out of its folder (judged on the text: a symlink
    placed inside the folder is the owner's choice)."""
    return os.path.isabs(image) or os.path.normpath(image).split(os.sep)[0] == ".."


def _read_utf8(path: Path) -> str:
    """A metadata file's text; a file that is not UTF-8 is one line naming the byte offset and line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AlignError(f"cannot read {path}: {exc.strerror or exc}") from None
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark (spreadsheet exports) is fine
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        line = raw.count(b"\n", 0, at) + 1
        raise AlignError(f"{path} is not UTF-8: byte {at} (line {line}) is {raw[at:at + 1]!r}; save the file as "
                         f"UTF-8") from None


def _read_table(path: Path, delimiter: str) -> tuple[list[str], Iterable[tuple[int, dict[str, Any]]]]:
    """Header and (line number, row) pairs of a CSV/TSV file."""
    text = _read_utf8(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = list(reader.fieldnames or [])
    if not header:
        raise AlignError(f"{path} is empty; expected a header row naming the image and caption columns")

    def rows() -> Iterable[tuple[int, dict[str, Any]]]:
        line = 1
        for row in reader:
            yield line + 1, row
            line = reader.line_num
    return header, rows()


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Column names (in first-seen order) and (line number, object) pairs of a JSON-lines file."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(io.StringIO(_read_utf8(path)), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AlignError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise AlignError(f"{path} line {n}: expected a JSON object per line")
        rows.append((n, row))
    columns: list[str] = []
    for _, row in rows:
        columns += [k for k in row if k not in columns]
    return columns, rows
