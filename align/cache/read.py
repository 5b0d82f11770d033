"""Reading a cache folder, never trusting it (edge layer): manifest structure, checks, verified loads.

Every load (``load_cached_split``, ``load_cache_dir``) goes through ``check_cache`` first: manifest structure,
``.npy`` headers (C order, plain numbers), shapes, dtypes, counts and dims, finite embeddings, and the sha256 of
each file. Hashing (and the scan for NaN rows) is skipped only for a file whose (size, mtime_ns, ctime_ns, inode,
device) equals what ``verified.json`` recorded when it last matched the manifest, so a later load of a large cache
reads none of its rows. Any change made through the file system since then (a write, a copy, a rename over it,
restoring the mtime with ``os.utime``) changes ctime or the inode, so the next load hashes again. What that fast
path cannot see is a change that bypasses the file system (bit rot on the disk, a raw device write); ``align cache
verify`` always re-hashes every file.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy

from align.cache.embeddings import EmbeddingRows, PairedEmbeddings
from align.cache.key import (ARRAYS, CACHE_FORMAT, KEY_NAME, LABEL_ARRAYS, MANIFEST, VERIFIED, WORK, CachesConfig,
                             EmbedConfig, split_folder)
from align.common.config import shorten
from align.common.errors import AlignError
from align.common.files import atomic_write_text, sha256_file


class _Damaged(Exception):
    """One problem found in a cache folder (a short phrase; check_cache turns it into the user's line)."""


KINDS = {str: "text", bool: "true or false", dict: "a mapping", list: "a list"}
DTYPES = {"image.npy": ("float16", "float32"), "text.npy": ("float16", "float32"),
          "caption_to_image.npy": ("int64",), "image_rows.npy": ("int64",), "caption_rows.npy": ("int64",),
          "labels.npy": ("int64",), "class_text.npy": ("float16", "float32")}
FIELDS = (("key", str), ("split", str), ("storage_dtype", str), ("normalize", bool), ("dataset", dict),
          ("encoders", dict), ("counts", dict), ("dims", dict), ("files", dict))
# A file changed within this long of the last verification could share its ctime tick (coarse timestamps),
# so it is not trusted without hashing until verified.json has been rewritten at least this much later.
RACY_NS = 100_000_000


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a cache folder, or None when it is missing, unreadable or not shaped like a manifest."""
    try:
        return _load_manifest(Path(path))
    except _Damaged:
        return None


def manifest_of(path: str | Path) -> dict[str, Any]:
    """The manifest of a cache folder (structure checked, files not read); one AlignError line if it has none."""
    path = Path(path)
    _require_manifest(path)
    try:
        return _load_manifest(path)
    except _Damaged as exc:
        raise AlignError(_problem_line(path, str(exc))) from None


def _require_manifest(path: Path) -> None:
    """A folder without a manifest is not damaged but unfinished (or no cache): say so, and how to go on."""
    if not (path / MANIFEST).is_file():
        raise AlignError(f"{path} is not a finished embedding cache (no {MANIFEST}): run `align embed` to make it, "
                         f"or to resume it if its embed was interrupted")


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise _Damaged(f"no {MANIFEST}") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Damaged(f"{MANIFEST} is not valid JSON ({shorten(str(exc), 80)})") from None
    problem = _structure_problem(manifest)
    if problem:
        raise _Damaged(f"{MANIFEST}: {problem}")
    return manifest


def is_own_manifest(path: Path) -> bool:
    """Whether ``path``/manifest.json is the manifest ``align embed`` wrote for this very folder: the folder is
    named like a cache key, and its manifest is a JSON object of a cache format whose key is that name (its other
    fields may be damaged: the folder is still a cache)."""
    if KEY_NAME.fullmatch(Path(path).name) is None:
        return False
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and is_count(manifest.get("format"), 1)
            and manifest.get("key") == Path(path).name)


def is_count(value: Any, least: int = 0) -> bool:
    """Whether a JSON value is an integer ≥ ``least`` (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _structure_problem(m: Any) -> str | None:
    """What makes ``m`` not a manifest this version can trust the types of, or None."""
    if not isinstance(m, dict):
        return f"expected a JSON object, found {type(m).__name__}"
    if m.get("format") != CACHE_FORMAT or isinstance(m.get("format"), bool):
        return f"format {shorten(repr(m.get('format')), 40)}, this align reads format {CACHE_FORMAT}"
    for name, kind in FIELDS:
        if not isinstance(m.get(name), kind):
            return f"{name!r} must be {KINDS[kind]}, found {type(m.get(name)).__name__}"
    for section, names, least in (("counts", ("images", "captions", "skipped_images"), 0),
                                  ("dims", ("image", "text"), 1)):
        for name in names:
            value = m[section].get(name)
            if not is_count(value, least):
                return f"{section}.{name} must be an integer ≥ {least}, found {shorten(repr(value), 40)}"
    if set(m["files"]) not in (set(ARRAYS), set(ARRAYS + LABEL_ARRAYS)):
        listed = shorten(", ".join(map(str, m["files"])), 80) or "nothing"
        return (f"'files' is not a cache's set of arrays ({', '.join(ARRAYS)}, and {', '.join(LABEL_ARRAYS)} "
                f"if labelled): it lists {listed}")
    if "labels.npy" in m["files"] and not _classes_ok(m.get("classes")):
        return "a labelled cache needs 'classes': {names: [text, ...], templates: [text, ...]}, both non-empty"
    for name, info in m["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                and all(is_count(n) for n in info["shape"]) and isinstance(info.get("dtype"), str)
                and is_count(info.get("bytes")) and isinstance(info.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", info["sha256"])):
            return f"files[{name!r}] must be {{shape: [integers], dtype: text, bytes: integer, sha256: 64 hex}}"
    return None


def _classes_ok(classes: Any) -> bool:
    return isinstance(classes, dict) and all(
        isinstance(classes.get(k), list) and classes[k] and all(isinstance(x, str) for x in classes[k])
        for k in ("names", "templates"))


def is_complete(path: Path) -> bool:
    """A well-formed manifest is there and every file it lists has the recorded size (the rest: check_cache)."""
    manifest = read_manifest(path)
    if manifest is None:
        return False
    try:
        return all((Path(path) / name).stat().st_size == info["bytes"] for name, info in manifest["files"].items())
    except OSError:
        return False


def _problem_line(path: Path, problem: str) -> str:
    """The user's one line for a damaged cache: the folder, the problem, and how to get a sound one (≤ 300). The
    ``align cache rm`` it suggests names the folder's root, and only where rm would delete it (its manifest says
    it is this cache)."""
    head = f"damaged cache {path}: "
    if is_own_manifest(path):  # the fix names the key and its root: the folder, without spelling its path twice
        head = f"damaged cache {path.name}: "
        tail = (f"; fix: `align cache rm {shlex.quote(path.name)} --root {shlex.quote(str(path.parent))}`, then "
                "`align embed`")
    else:
        tail = (f"; fix: delete this folder ({MANIFEST} does not name it, so `align cache rm` keeps it), then "
                "`align embed`")
    return shorten(head + shorten(problem, max(60, 300 - len(head) - len(tail))) + tail)


def check_cache(path: str | Path, rehash: bool = False) -> dict[str, Any]:
    """The manifest of a sound cache folder, after checking everything a load relies on; AlignError otherwise.

    Checks, in order: the manifest's structure and types; each ``.npy`` header (parsed, never unpickled: C
    order and plain numbers only) against the file size and the manifest; counts and dims against the arrays;
    caption indices inside image.npy; finite embeddings and the sha256 of each file, unless ``verified.json``
    vouches for it (see the module docstring for what that fast path guarantees) or ``rehash`` is set. Every
    read streams in blocks: a cache larger than memory is checked in bounded memory.
    """
    return _checked(Path(path), rehash)[0]


def _checked(path: Path, rehash: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(manifest, memory-mapped arrays) of a sound cache; AlignError (one line) on the first problem."""
    _require_manifest(path)
    try:
        manifest = _load_manifest(path)
        names = list(manifest["files"])  # the five arrays, and the two label arrays of a labelled set
        headers = {name: _npy_header(path / name) for name in names}
        for name, header in headers.items():
            _check_file(path / name, header, manifest["files"][name])
        _check_counts(manifest, {name: shape for name, (shape, _, _) in headers.items()})
        arrays = {name: _open_array(path / name) for name in names}
        _check_indices(arrays, manifest)
        unvouched = _unvouched(path, manifest, rehash)
        _check_finite(arrays, unvouched)
        _check_hashes(path, manifest, unvouched)
    except _Damaged as exc:
        raise AlignError(_problem_line(path, str(exc))) from None
    return manifest, arrays


def _npy_header(file: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a ``.npy`` header, read with numpy's safe parser (no pickle, no eval)."""
    try:
        with open(file, "rb") as fh:
            version = npy.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, fortran_order, dtype = read(fh)
            offset = fh.tell()
    except FileNotFoundError:
        raise _Damaged(f"{file.name} is missing") from None
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        raise _Damaged(f"{file.name} has no valid .npy header ({shorten(str(exc), 80)})") from None
    if dtype.hasobject:
        raise _Damaged(f"{file.name} holds Python objects (dtype {dtype}), which are never unpickled")
    if fortran_order:
        raise _Damaged(f"{file.name} is stored in Fortran (column) order; a cache array must be in C order")
    return tuple(shape), dtype, offset


def _check_file(file: Path, header: tuple[tuple[int, ...], np.dtype, int], info: dict[str, Any]) -> None:
    """The header against the file's size, the manifest's entry, and the dtypes a cache may hold."""
    shape, dtype, offset = header
    size = file.stat().st_size
    expected = offset + math.prod(shape) * dtype.itemsize  # Python ints: a garbage shape cannot overflow
    if size != expected:
        raise _Damaged(f"{file.name} is {size} bytes but its header describes {expected} (truncated or padded)")
    if size != info["bytes"]:
        raise _Damaged(f"{file.name} is {size} bytes, the manifest says {info['bytes']}")
    if list(shape) != info["shape"] or str(dtype) != info["dtype"]:
        raise _Damaged(f"{file.name} holds {list(shape)} {dtype}, the manifest says {info['shape']} {info['dtype']}")
    if str(dtype) not in DTYPES[file.name]:
        raise _Damaged(f"{file.name} has dtype {dtype}; a cache stores {' or '.join(DTYPES[file.name])}")


def _check_counts(m: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Array ranks and lengths against each other and against the manifest's counts and dims."""
    image, text = shapes["image.npy"], shapes["text.npy"]
    ranks = {"image.npy": 2, "text.npy": 2, "caption_to_image.npy": 1, "image_rows.npy": 1, "caption_rows.npy": 1}
    for name, rank in ranks.items():
        if len(shapes[name]) != rank:
            raise _Damaged(f"{name} has {len(shapes[name])} dimensions, expected {rank}")
    for what, got, name, rows in (("counts.images", m["counts"]["images"], "image.npy", image[0]),
                                  ("counts.captions", m["counts"]["captions"], "text.npy", text[0]),
                                  ("dims.image", m["dims"]["image"], "image.npy", image[1]),
                                  ("dims.text", m["dims"]["text"], "text.npy", text[1])):
        if got != rows:
            unit = "rows" if what.startswith("counts") else "columns"
            raise _Damaged(f"the manifest's {what} is {got} but {name} has {rows} {unit}")
    for name, rows in (("caption_to_image.npy", text[0]), ("caption_rows.npy", text[0]),
                       ("image_rows.npy", image[0])):
        if shapes[name][0] != rows:
            raise _Damaged(f"{name} has {shapes[name][0]} entries, expected {rows} (one per row)")
    if image[0] == 0 or text[0] == 0:
        raise _Damaged(f"it holds {image[0]} images and {text[0]} captions")
    if "labels.npy" in shapes:
        _check_label_counts(m, shapes)


def _check_label_counts(m: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """labels.npy: one class per image; class_text.npy: one row per class and template, text-wide."""
    labels, prompts = shapes["labels.npy"], shapes["class_text.npy"]
    rows = len(m["classes"]["names"]) * len(m["classes"]["templates"])
    if len(labels) != 1 or labels[0] != shapes["image.npy"][0]:
        raise _Damaged(f"labels.npy holds {list(labels)}, expected one entry per image ({shapes['image.npy'][0]})")
    if len(prompts) != 2 or prompts[0] != rows or prompts[1] != m["dims"]["text"]:
        raise _Damaged(f"class_text.npy holds {list(prompts)}, expected [{rows}, {m['dims']['text']}] (one row per "
                       f"class and prompt template)")


def _open_array(file: Path) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _Damaged(f"{file.name} cannot be read ({shorten(str(exc), 80)})") from None


def _check_indices(arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """Caption indices that point into image.npy, and labels that name a class (small arrays: read every load)."""
    c2i, n_img = arrays["caption_to_image.npy"], len(arrays["image.npy"])
    outside = np.flatnonzero((c2i < 0) | (c2i >= n_img))
    if len(outside):
        raise _Damaged(f"caption_to_image.npy row {outside[0]} points to image {c2i[outside[0]]}, outside "
                       f"image.npy's {n_img} rows")
    if "labels.npy" in arrays:
        labels, classes = arrays["labels.npy"], len(manifest["classes"]["names"])
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if len(bad):
            raise _Damaged(f"labels.npy row {bad[0]} is class {labels[bad[0]]}, outside the {classes} classes")


def _check_finite(arrays: dict[str, np.ndarray], unvouched: dict[str, list[int]]) -> None:
    """Finite embeddings (NaN/inf rows are bad data) in every embedding file about to be hashed. A file that
    ``verified.json`` vouches for holds the bytes that passed this check when it was recorded, so a later load
    reads none of a large cache's rows."""
    for name in [n for n in ("image.npy", "text.npy", "class_text.npy") if n in arrays and n in unvouched]:
        bad = _nonfinite_rows(arrays[name])
        if len(bad):
            raise _Damaged(f"{name} has {len(bad)} row(s) with NaN or inf (first: row {bad[0]}): the cached "
                           f"embeddings are bad data")


def _nonfinite_rows(array: np.ndarray, block: int = 8192) -> np.ndarray:
    """Indices of rows holding NaN or inf, read in blocks (bounded memory for large caches)."""
    bad = [start + np.flatnonzero(~np.isfinite(array[start:start + block]).all(axis=1))
           for start in range(0, len(array), block)]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def _stat_key(st: os.stat_result) -> list[int]:
    """What any change through the file system alters: size, mtime, ctime (utime cannot set it), inode, device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _unvouched(path: Path, manifest: dict[str, Any], rehash: bool) -> dict[str, list[int]]:
    """The files whose sha256 (and values) must be checked, each with its ``_stat_key`` taken now: all of them with
    ``rehash``, else those ``verified.json`` does not vouch for (recorded with this very stat and sha256, and changed
    well before the record was written)."""
    record, record_mtime = _read_verified(path)
    out = {}
    for name, info in manifest["files"].items():
        before = _stat_key((path / name).stat())
        if (rehash or record.get(name) != {"stat": before, "sha256": info["sha256"]}
                or before[2] + RACY_NS >= record_mtime):  # ctime not well before the record was written
            out[name] = before
    return out


def _check_hashes(path: Path, manifest: dict[str, Any], unvouched: dict[str, list[int]]) -> None:
    """The sha256 of every ``unvouched`` file against the manifest; verified.json then vouches for each one that
    did not change while it was checked (and keeps vouching for the others)."""
    if not unvouched:
        return
    record, _ = _read_verified(path)
    fresh = {name: record[name] for name in manifest["files"] if name not in unvouched}
    for name, before in unvouched.items():
        want = manifest["files"][name]["sha256"]
        if sha256_file(path / name) != want:
            raise _Damaged(f"{name} differs from its sha256 in the manifest (changed after the embed wrote it)")
        if _stat_key((path / name).stat()) == before:  # unchanged while its values and bytes were checked
            fresh[name] = {"stat": before, "sha256": want}
    try:
        atomic_write_text(path / VERIFIED, json.dumps({"format": CACHE_FORMAT, "files": fresh}))
    except (OSError, AlignError):  # the file system's refusal, as atomic_write_text says it in one line
        pass  # a read-only cache is still sound; its next load hashes again


def _read_verified(path: Path) -> tuple[dict[str, Any], int]:
    """(file name → {stat, sha256}, the record's own mtime_ns); empty when missing or unreadable."""
    try:
        mtime = (path / VERIFIED).stat().st_mtime_ns
        record = json.loads((path / VERIFIED).read_text())
        files = record["files"] if record.get("format") == CACHE_FORMAT else {}
        return (files, mtime) if isinstance(files, dict) else ({}, 0)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}, 0


def split_manifest(cfg: EmbedConfig | CachesConfig, split: str) -> dict[str, Any]:
    """The manifest of ``split``'s cache (a data section of either form, ``split_folder``), its structure checked
    and no array read (what a plan needs: counts, dims, classes); AlignError naming what to do when the cache is
    missing, unfinished or damaged."""
    path = split_folder(cfg, split)
    if not (path / MANIFEST).exists():
        if (path / WORK).is_dir():
            raise AlignError(f"the embedding of split {split!r} into {path} did not finish: run `align embed "
                             f"--config FILE` with this config again to resume it")
        raise AlignError(f"no cached embeddings for split {split!r} (key {path.name} under {cfg.cache_root}): "
                         f"run `align embed --config FILE` with this config first")
    return manifest_of(path)


def load_cached_split(cfg: EmbedConfig | CachesConfig, split: str) -> PairedEmbeddings:
    """The cached embeddings of ``split`` memory-mapped (checked first); AlignError naming what to do otherwise."""
    split_manifest(cfg, split)
    return load_cache_dir(split_folder(cfg, split))


def load_cache_dir(path: str | Path) -> PairedEmbeddings:
    """A sound cache folder (``check_cache``) → PairedEmbeddings whose image and caption rows are read-only memory
    maps of its ``.npy`` files (``EmbeddingRows``: read as float32 a batch or a chunk at a time, never copied
    whole; every process reading the cache shares the page cache); the caption → image index, labels and class
    prompts (small) in memory."""
    manifest, arrays = _checked(Path(path), rehash=False)
    meta = {"key": manifest["key"], "split": manifest["split"], "path": str(path), "dataset": manifest["dataset"],
            "encoders": manifest["encoders"], "dims": manifest["dims"], "normalize": manifest["normalize"],
            "storage_dtype": manifest["storage_dtype"], "skipped_images": manifest["counts"]["skipped_images"]}
    labelled: dict[str, Any] = {}
    if "labels.npy" in arrays:
        classes = manifest["classes"]
        prompts = np.array(arrays["class_text.npy"], dtype=np.float32)
        labelled = {"labels": torch.from_numpy(np.array(arrays["labels.npy"], dtype=np.int64)),
                    "class_text": torch.from_numpy(prompts).view(len(classes["names"]), len(classes["templates"]), -1),
                    "class_names": list(classes["names"])}
        meta["prompt_templates"] = list(classes["templates"])
    return PairedEmbeddings(
        image=EmbeddingRows(arrays["image.npy"]), text=EmbeddingRows(arrays["text.npy"]),
        caption_to_image=torch.from_numpy(np.array(arrays["caption_to_image.npy"], dtype=np.int64)),
        meta=meta, **labelled,
    )


def source_rows(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Each cached image's and caption's row in the source split (``image_rows.npy``, ``caption_rows.npy`` of a
    sound cache): what shows the images and captions behind the embeddings."""
    _, arrays = _checked(Path(path), rehash=False)
    return (np.array(arrays["image_rows.npy"], dtype=np.int64), np.array(arrays["caption_rows.npy"], dtype=np.int64))
