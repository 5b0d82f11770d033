"""``align cache import``: a verified cache made from embeddings computed elsewhere (edge layer).

Two sources (``open_source``):
- a plain pair of ``.npy`` files, ``--image`` (N_img × D_img) and ``--text`` (N_cap × D_txt), float16 or float32,
  with an optional ``--pairs`` caption → image index (integers, one per text row); without it row i of each is one
  pair (the counts must agree);
- a clip-retrieval output folder: ``img_emb/img_emb_N.npy`` and ``text_emb/text_emb_N.npy`` (numbered parts,
  concatenated in numeric order, row i of a part's images paired with row i of its captions), and, when there,
  ``metadata/metadata_N.parquet`` (captions, keys, urls), whose row counts must match the parts' and whose columns
  the manifest records (the cache format has no place for the caption strings).

The result is a cache like ``align embed``'s (``align.cache.key``): the same five arrays, manifest, checksums and
loading checks, at ``<cache root>/<NAME>-<split>-<digest>``, where the digest hashes what determines its bytes
(the sha256 of image.npy, text.npy and caption_to_image.npy, the encoder names, the split), so equal inputs give an
equal key. ``align cache ls/info/verify/rm`` treat it like any cache; a config names it as ``data.caches.<split>:
NAME``. Its manifest's dataset kind is ``imported`` (no images behind it: no galleries).

Memory stays bounded: every input is read in blocks of about ``BLOCK_BYTES`` (plain reads, never a whole array)
and written through ``NpyStream``. The inputs are read twice: a first pass checks every row (finite values, pair
indices inside the images, every image with a caption) and computes the checksums of the files to be written, which
make the key; only then is anything written, under the key's lock, in a second pass that must reproduce those
checksums (an input that changed in between is refused). A failed or refused import leaves nothing behind.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from numpy.lib import format as npy

from align.cache.key import ARRAYS, CACHE_FORMAT, IMPORTED, KEY_NAME, MANIFEST, PLAIN_NAME, VERIFIED, imported_key
from align.cache.read import check_cache
from align.cache.work import StreamedArray, block_rows, save_text
from align.common.errors import AlignError, shorten
from align.common.files import remove_quietly, require_writable
from align.common.locks import LOCK_FILE, exclusive
from align.common.progress import Bar, Log, progress_bar

IMPORT_AGAIN = "`align cache import` again"  # what a failed write says to run
CLIP_PARTS = {"image": ("img_emb", ".npy"), "text": ("text_emb", ".npy"), "metadata": ("metadata", ".parquet")}
INT64 = np.dtype(np.int64)


@dataclass(frozen=True)
class Part:
    """One ``.npy`` file of an input, known from its header (read with numpy's safe parser: nothing unpickled)."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # where the rows start

    @classmethod
    def open(cls, path: Path, what: str, rank: int) -> Part:
        """The header of ``path`` checked: a plain C-order array of ``rank`` dimensions whose size matches it."""
        name = f"{what} {path}"
        try:
            with open(path, "rb") as fh:
                version = npy.read_magic(fh)
                read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, fortran, dtype = read(fh)
                offset = fh.tell()
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise AlignError(f"{name} not found") from None
        except IsADirectoryError:
            raise AlignError(f"{name} is a folder: give a .npy file") from None
        except (OSError, ValueError, SyntaxError, TypeError) as exc:
            raise AlignError(f"{name} is not a .npy file ({shorten(str(exc), 80)})") from None
        if dtype.hasobject:
            raise AlignError(f"{name} holds Python objects (dtype {dtype}): only plain numeric arrays are imported "
                             "(objects are never unpickled)")
        if fortran:
            raise AlignError(f"{name} is stored in Fortran (column) order: save it with np.save(path, "
                             "np.ascontiguousarray(array))")
        if len(shape) != rank:
            expected = "2-D (rows × dims)" if rank == 2 else "1-D (one entry per text row)"
            raise AlignError(f"{name} is {len(shape)}-D {list(shape)}, expected {expected}")
        described = offset + math.prod(shape) * dtype.itemsize
        if size != described:
            raise AlignError(f"{name} is {size} bytes but its header describes {described} (truncated or padded)")
        return cls(Path(path), tuple(shape), dtype, offset)

    @property
    def rows(self) -> int:
        return self.shape[0]

    def read(self, fh: Any, rows: int) -> np.ndarray:
        """The next ``rows`` rows from ``fh`` (positioned in this file), in native byte order."""
        block = np.empty((rows, *self.shape[1:]), dtype=self.dtype)  # rows ≥ 1, columns ≥ 1 (checked)
        view, got = memoryview(block).cast("B"), 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise AlignError(f"{self.path} ended early (it changed while being read): import again once it no "
                                 "longer changes")
            got += n
        return block.astype(self.dtype.newbyteorder("="), copy=False)


class Input:
    """One array of the cache as it comes in: its parts (a plain file is one) concatenated in order, read in
    blocks of about ``BLOCK_BYTES``, one block in memory at a time."""

    def __init__(self, what: str, parts: list[Part]) -> None:
        self.what, self.parts = what, parts
        first = parts[0]
        for part in parts[1:]:
            if part.shape[1:] != first.shape[1:]:
                raise AlignError(f"{part.path.name} has {part.shape[1]} columns but {first.path.name} has "
                                 f"{first.shape[1]}: every part of {what} must have one width")
            if part.dtype != first.dtype:
                raise AlignError(f"{part.path.name} is {part.dtype} but {first.path.name} is {first.dtype}: every "
                                 f"part of {what} must have one dtype")

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def columns(self) -> int:
        return self.parts[0].shape[1] if len(self.parts[0].shape) == 2 else 1

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype.newbyteorder("=")

    def where(self, row: int) -> str:
        """Where row ``row`` of the whole input lives: its file, and its row there when there are several."""
        for part in self.parts:
            if row < part.rows:
                return part.path.name if len(self.parts) == 1 else f"{part.path.name} row {row}"
            row -= part.rows
        return self.what

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index of its first row in the whole input, rows), in order."""
        step, first = block_rows(self.columns, self.dtype.itemsize), 0
        for part in self.parts:
            with open(part.path, "rb") as fh:
                fh.seek(part.offset)
                for start in range(0, part.rows, step):
                    yield first + start, part.read(fh, min(step, part.rows - start))
            first += part.rows


@dataclass(frozen=True)
class ImportSource:
    """What an import reads: the image and text embeddings, the optional caption → image index, and what the
    manifest records about where they came from."""

    image: Input
    text: Input
    pairs: Input | None
    described: dict[str, Any]


def open_source(folder: Path | None, image: Path | None, text: Path | None, pairs: Path | None) -> ImportSource:
    """The source the user named, its headers, dtypes, dims and counts checked (no row read yet): a clip-retrieval
    ``folder``, or the plain pair ``image`` + ``text`` (+ ``pairs``)."""
    if folder is not None and (image or text or pairs):
        raise AlignError("give either SOURCE (a clip-retrieval output folder) or --image and --text, not both")
    if folder is not None:
        return clip_retrieval_source(folder)
    if image is None or text is None:
        raise AlignError("give SOURCE (a clip-retrieval output folder with img_emb/ and text_emb/), or --image FILE "
                         "and --text FILE (.npy embeddings; --pairs FILE for several captions per image)")
    return pair_source(image, text, pairs)


def pair_source(image: Path, text: Path, pairs: Path | None) -> ImportSource:
    """A plain pair of embedding files, with or without a caption → image index."""
    source = ImportSource(Input("--image", [Part.open(image, "--image", 2)]),
                          Input("--text", [Part.open(text, "--text", 2)]),
                          None if pairs is None else Input("--pairs", [Part.open(pairs, "--pairs", 1)]),
                          {"form": "pair", "image": str(Path(image).absolute()), "text": str(Path(text).absolute()),
                           "pairs": None if pairs is None else str(Path(pairs).absolute())})
    _check_embeddings(source)
    n_img, n_cap = source.image.rows, source.text.rows
    if source.pairs is None and n_img != n_cap:
        raise AlignError(f"--image has {n_img} rows and --text {n_cap}: without --pairs row i of each is one pair; "
                         "give --pairs FILE (each text row's image row) for several captions per image")
    if source.pairs is not None:
        kind = source.pairs.dtype
        if kind.kind not in "iu":
            raise AlignError(f"--pairs {pairs} holds {kind}, not integers: give each text row's image row as an "
                             "integer array")
        if source.pairs.rows != n_cap:
            raise AlignError(f"--pairs has {source.pairs.rows} entries but --text {n_cap} rows: give one image row "
                             "per text row")
    return source


def clip_retrieval_source(folder: Path) -> ImportSource:
    """A clip-retrieval output folder: numbered image and text parts, row for row, and their metadata if any."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AlignError(f"SOURCE {folder} is not a folder: give a clip-retrieval output folder (img_emb/, "
                         "text_emb/), or --image and --text")
    numbered = {kind: _numbered(folder, kind) for kind in CLIP_PARTS}
    if not numbered["image"]:
        raise AlignError(f"no img_emb/img_emb_N.npy under {folder}: give a clip-retrieval output folder")
    for kind in ("text", "metadata"):
        if kind == "metadata" and not (folder / CLIP_PARTS[kind][0]).is_dir():
            continue
        _same_numbers(numbered["image"], numbered[kind], folder)
    order = sorted(numbered["image"])
    parts = {kind: [Part.open(numbered[kind][n], CLIP_PARTS[kind][0], 2) for n in order] for kind in ("image", "text")}
    for img, txt in zip(parts["image"], parts["text"]):
        if img.rows != txt.rows:
            raise AlignError(f"{img.path.name} has {img.rows} rows but {txt.path.name} {txt.rows}: clip-retrieval "
                             "pairs image and caption row for row")
    meta = _metadata(numbered["metadata"], order, parts["image"]) if numbered["metadata"] else None
    source = ImportSource(Input(CLIP_PARTS["image"][0], parts["image"]), Input(CLIP_PARTS["text"][0], parts["text"]),
                          None, {"form": "clip-retrieval", "folder": str(folder.absolute()), "parts": order,
                                 "metadata": meta})
    _check_embeddings(source)
    return source


def _numbered(folder: Path, kind: str) -> dict[int, Path]:
    """{part number: file} of one kind of clip-retrieval part (``img_emb/img_emb_N.npy``, ...)."""
    sub, ext = CLIP_PARTS[kind]
    pattern = re.compile(rf"{sub}_(\d+){re.escape(ext)}")
    found: dict[int, Path] = {}
    for path in sorted((folder / sub).iterdir()) if (folder / sub).is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match:
            number = int(match.group(1))
            if number in found:
                raise AlignError(f"{found[number].name} and {path.name} are both part {number} of {folder / sub}: "
                                 "keep one")
            found[number] = path
    return found


def _same_numbers(images: dict[int, Path], other: dict[int, Path], folder: Path) -> None:
    for number in sorted(set(images) ^ set(other)):
        have, lack = (images, other) if number in images else (other, images)
        what = next(iter(lack.values())).parent.name if lack else "text_emb"
        raise AlignError(f"{have[number].name} has no part {number} in {folder / what}: every part needs its "
                         "image embeddings, text embeddings and (when there) metadata")


def _metadata(files: dict[int, Path], order: list[int], images: list[Part]) -> dict[str, Any]:
    """What the metadata parts hold (row counts checked against the parts', columns recorded)."""
    import pyarrow.parquet as pq  # heavy: only when a clip-retrieval folder has metadata

    columns: list[str] = []
    for number, part in zip(order, images):
        try:
            parquet = pq.ParquetFile(files[number])
        except Exception as exc:  # pyarrow's errors have no common base besides Exception
            raise AlignError(f"{files[number]} is not a parquet file ({shorten(str(exc), 80)})") from None
        rows = parquet.metadata.num_rows
        if rows != part.rows:
            raise AlignError(f"{files[number].name} has {rows} rows but {part.path.name} {part.rows}: the metadata "
                             "must describe the embeddings row for row")
        columns = columns or list(parquet.schema_arrow.names)
    return {"files": len(files), "rows": sum(p.rows for p in images), "columns": columns}


def _check_embeddings(source: ImportSource) -> None:
    for side in (source.image, source.text):
        if side.dtype.name not in ("float16", "float32"):
            raise AlignError(f"{side.what} holds {side.dtype}: a cache stores float16 or float32 embeddings; convert "
                             "them first (e.g. array.astype(np.float32))")
        if side.rows == 0 or side.columns == 0:
            raise AlignError(f"{side.what} holds {side.rows} rows of {side.columns} values: nothing to import")
    if source.image.dtype != source.text.dtype:
        raise AlignError(f"the image embeddings are {source.image.dtype} but the text embeddings "
                         f"{source.text.dtype}: a cache stores both in one dtype; convert one of them first")


def import_cache(source: ImportSource, name: str, split: str, encoders: dict[str, str], root: Path,
                 progress: bool = True, log: Log = print) -> tuple[Path, bool]:
    """Make the cache of ``source`` under ``root`` → (its folder, whether it was written now; False: the same
    cache was there already). AlignError, one line, for bad input, a different cache of that name, a full disk."""
    return CacheImport(source, name, split, encoders, Path(root)).run(progress, log)


class CacheImport:
    """One import: the request checked, the rows checked and keyed (first pass), then written (second pass)."""

    def __init__(self, source: ImportSource, name: str, split: str, encoders: dict[str, str], root: Path) -> None:
        for what, value in (("--name", name), ("--split", split)):
            if not PLAIN_NAME.fullmatch(value):
                raise AlignError(f"{what} {shorten(repr(value), 60)} must be 1 to 64 letters, digits, '_' or '.', "
                                 f"starting with a letter or digit (no '-': the cache is NAME-SPLIT-DIGEST)")
        for side, value in encoders.items():
            if not value.strip() or not value.isprintable() or len(value) > 200:
                raise AlignError(f"--{side}-encoder {shorten(repr(value), 60)} must name the encoder in 1 to 200 "
                                 "printable characters")
        self.source, self.name, self.split, self.root = source, name, split, root
        self.encoders = {"image": encoders["image"], "text": encoders["text"]}

    def run(self, progress: bool, log: Log) -> tuple[Path, bool]:
        require_writable(self.root, "cache root", "give another --root or set ALIGN_HOME")
        rows = self.source.image.rows + self.source.text.rows
        with progress_bar(rows, f"checking {self.name} ({self.split})", enabled=progress) as bar:
            expected = {name: array.write(None) for name, array in self.arrays(bar).items()}
        identity = self.identity(expected)
        folder = self.root / imported_key(self.name, self.split, identity)
        if (folder / MANIFEST).exists():
            check_cache(folder)
            log(f"{self.name} ({self.split}): already imported as {folder.name}")
            return folder, False
        self._refuse_namesakes(folder)
        with progress_bar(rows, f"writing {folder.name}", enabled=progress) as bar:
            written = self.write(folder, expected, identity, bar)
        if written:
            log(f"{self.name} ({self.split}): {self.source.image.rows} images, {self.source.text.rows} captions → "
                f"{folder}")
        return folder, written

    def arrays(self, bar: Bar) -> dict[str, StreamedArray]:
        """The cache's five arrays, their rows checked as they stream from the inputs (in file order)."""
        image, text, pairs = self.source.image, self.source.text, self.source.pairs
        n_img, n_cap = image.rows, text.rows
        return {"image.npy": StreamedArray((n_img, image.columns), image.dtype, _finite_rows(image, bar)),
                "text.npy": StreamedArray((n_cap, text.columns), text.dtype, _finite_rows(text, bar)),
                "caption_to_image.npy": StreamedArray((n_cap,), INT64, _counting(n_cap) if pairs is None
                                                      else _pair_rows(pairs, n_img)),
                "image_rows.npy": StreamedArray((n_img,), INT64, _counting(n_img)),
                "caption_rows.npy": StreamedArray((n_cap,), INT64, _counting(n_cap))}

    def identity(self, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """What the key hashes: everything that determines the cache's bytes (the index arrays follow from them)."""
        return {"format": CACHE_FORMAT, "kind": IMPORTED, "split": self.split, "encoders": self.encoders,
                "sha256": {name: files[name]["sha256"] for name in ("image.npy", "text.npy", "caption_to_image.npy")}}

    def _refuse_namesakes(self, folder: Path) -> None:
        """A finished cache of the same name and split with other contents is refused (a name finds one cache)."""
        prefix = f"{self.name}-{self.split}-"
        for other in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if other.name.startswith(prefix) and KEY_NAME.fullmatch(other.name) and (other / MANIFEST).is_file():
                raise AlignError(shorten(f"a different cache named {self.name} for split {self.split} is under "
                                         f"{self.root} ({other.name}): import under another --name, or remove it "
                                         f"first with `align cache rm {other.name} --root {self.root}`"))

    def write(self, folder: Path, expected: dict[str, dict[str, Any]], identity: dict[str, Any], bar: Bar) -> bool:
        """The arrays, then the manifest, under the key's lock → False when another import finished it meanwhile.
        On any failure what this import wrote is removed (the folder too, when this import made it)."""
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        with exclusive(folder, "cache", "another `align cache import` is writing it; wait for it to finish"):
            if (folder / MANIFEST).exists():
                check_cache(folder)
                return False
            try:
                for leftover in [folder / VERIFIED, *folder.glob(".*.tmp")]:  # a killed import's
                    leftover.unlink(missing_ok=True)
                files = {}
                for name, array in self.arrays(bar).items():
                    files[name] = array.write(folder / name, IMPORT_AGAIN)
                    if files[name]["sha256"] != expected[name]["sha256"]:
                        raise AlignError(f"the input of {name} changed while it was imported: import again once it "
                                         "no longer changes")
                save_text(folder / MANIFEST, json.dumps(self.manifest(folder.name, files, identity), indent=1),
                          IMPORT_AGAIN)
            except BaseException:
                _remove_unfinished(folder, made)
                raise
        return True

    def manifest(self, key: str, files: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
        """manifest.json, with the fields an embed's has (no skipped images, no normalisation by align)."""
        image, text = self.source.image, self.source.text
        return {"format": CACHE_FORMAT, "key": key, "split": self.split,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "dataset": {"name": self.name, "kind": IMPORTED, "images_in_source": image.rows,
                            "captions_in_source": text.rows},
                "encoders": dict(self.encoders),
                "counts": {"images": image.rows, "captions": text.rows, "skipped_images": 0, "dropped_captions": 0},
                "dims": {"image": image.columns, "text": text.columns}, "storage_dtype": str(image.dtype),
                "normalize": False, "files": files, "skipped": [], "identity": identity,
                "source": self.source.described, "versions": _versions()}


def _finite_rows(side: Input, bar: Bar) -> Iterator[np.ndarray]:
    """The blocks of ``side``; a row with NaN or inf is one AlignError line naming it."""
    for first, block in side.blocks():
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if len(bad):
            row = first + int(bad[0])
            raise AlignError(f"{side.what} row {row} ({side.where(row)}) holds NaN or inf: fix or drop that row "
                             f"({len(bad)} such rows in its block), then import again")
        bar.advance(len(block))
        yield block


def _pair_rows(pairs: Input, images: int) -> Iterator[np.ndarray]:
    """The caption → image index in int64, each entry inside the image rows, and every image with a caption."""
    captioned = np.zeros(images, dtype=bool)
    for first, block in pairs.blocks():
        outside = np.flatnonzero((block < 0) | (block >= images))
        if len(outside):
            row = first + int(outside[0])
            raise AlignError(f"--pairs row {row} is image {block[outside[0]]}, outside the {images} image rows "
                             f"(0 to {images - 1})")
        captioned[block] = True
        yield block.astype(INT64)
    lonely = np.flatnonzero(~captioned)
    if len(lonely):
        raise AlignError(f"image row {lonely[0]} has no caption in --pairs ({len(lonely)} images have none): every "
                         "image needs at least one")


def _counting(n: int) -> Iterator[np.ndarray]:
    """0, 1, ..., n - 1 in int64 blocks (row indices)."""
    step = block_rows(1, INT64.itemsize)
    for start in range(0, n, step):
        yield np.arange(start, min(start + step, n), dtype=INT64)


def _remove_unfinished(folder: Path, made: list[Path]) -> None:
    """What a failed import wrote in ``folder`` (arrays, temporary files, its lock), then the folders it made."""
    for name in [*ARRAYS, VERIFIED, LOCK_FILE]:
        remove_quietly(folder / name)
    for leftover in folder.glob(".*.tmp"):
        remove_quietly(leftover)
    for path in made:
        try:
            path.rmdir()  # fails on a folder something else wrote into meanwhile: it then stays
        except OSError:
            break


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"numpy": np.__version__}
    for dist in ("align", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
