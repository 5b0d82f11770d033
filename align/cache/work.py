"""The ``work/`` folder of an embed in progress, and the atomic writes every file of a cache goes through (edge).

``work/plan.json`` freezes the shard layout of a run (reused on resume, so the same shards count as done). Each
shard becomes ``image-SSSSS.npy`` or ``text-SSSSS.npy`` plus a ``.json`` written last: the shard is done from
there, so a run killed at any point loses at most the shards it was encoding. A labelled set adds
``classes.npy`` (+ ``classes.json``), the zero-shot prompts. Every rank of a torchrun job writes its own shards
here; rank 0 reads them back one at a time to assemble the cache.

A cache's final arrays are written by ``NpyStream``: the header ``np.save`` would write, then the rows block by
block, hashed as they go, to a temporary name renamed at the end. Memory stays one block whatever the number of
rows (``align embed``'s finalize and ``align cache import``), and the bytes equal ``np.save`` of the whole array.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from numpy.lib import format as npy

from align.cache.key import ENCODE_ROWS, KEY_NAME
from align.cache.read import is_count
from align.common.errors import AlignError
from align.common.files import atomic_write_text, is_write_problem, remove_quietly, sha256_file, write_error
from align.common.progress import Log

PLAN = "plan.json"
KINDS = ("image", "text")  # a shard's file names: <kind>-SSSSS.npy and .json
EMBED_AGAIN = "`align embed` again (finished shards are kept and it resumes)"  # what a failed write says to run
BLOCK_BYTES = 16 << 20  # about how much of an array a streamed block holds


def save_array(path: Path, array: np.ndarray) -> str:
    """``np.save`` to a temporary file in the same folder, fsync, rename; returns the file's sha256.

    A failed write (disk full, ...) removes the temporary file and is one AlignError line naming ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one name per process: writers never share it
    try:
        with open(tmp, "wb") as fh:
            _write_npy(fh, np.ascontiguousarray(array))
            fh.flush()
            os.fsync(fh.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)  # never a second error over the first
        raise _write_error(path, exc, EMBED_AGAIN) from None
    return digest


def _write_npy(fh: Any, array: np.ndarray) -> None:
    """The one place array bytes are written (tests make it fail to simulate a full disk)."""
    np.save(fh, array, allow_pickle=False)


def save_text(path: Path, text: str, again: str = EMBED_AGAIN) -> None:
    """``atomic_write_text`` (it removes its own temp file on failure), with OSError as one AlignError line."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise _write_error(path, exc, again) from None


def _write_error(path: Path, exc: OSError, again: str) -> AlignError:
    """The one line of a failed write: ``again`` says what to run once the problem is fixed."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return AlignError(f"no space left on the device writing {path}: free some space, then run the same {again}")
    if is_write_problem(exc):  # read-only, no permission, a name too long, a link loop
        return write_error(path, exc)
    return AlignError(f"cannot write {path}: {exc.strerror or exc} (check the folder's permissions and disk)")


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The header ``np.save`` writes for a C-order array of ``shape`` and ``dtype``: format 1.0, or 2.0 where the
    header is too long for 1.0 (as ``np.save`` chooses)."""
    header = {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(n) for n in shape)}  # Python ints: numpy's would print as np.int64(n)
    out = io.BytesIO()
    try:
        npy.write_array_header_1_0(out, header)
    except ValueError:  # more than 65535 bytes of header
        out = io.BytesIO()
        npy.write_array_header_2_0(out, header)
    return out.getvalue()


def block_rows(columns: int, itemsize: int) -> int:
    """Rows of a streamed block of an array with ``columns`` values of ``itemsize`` bytes per row."""
    return max(1, BLOCK_BYTES // max(1, columns * itemsize))


class NpyStream:
    """One ``.npy`` file of a cache written block by block: the header first, then the rows in order, hashed as
    they go, into a temporary file in the same folder that ``close`` fsyncs and renames over ``path``. The bytes
    are those ``np.save`` writes for the whole array. With ``path`` None nothing is written: only the sha256 and
    size of the file it would be (what ``align cache import`` keys a cache by before writing it).

    Use it as a context manager: a failure (disk full, a bad block) removes the temporary file, and a write the
    file system refuses is one AlignError line naming ``path`` and saying to run ``again``."""

    def __init__(self, path: Path | None, shape: tuple[int, ...], dtype: Any, again: str = EMBED_AGAIN) -> None:
        self.path, self.again = path, again
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.rows, self.size, self._sha = 0, 0, hashlib.sha256()
        self._tmp = None if path is None else path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._fh: Any = None
        self._put(npy_header(self.shape, self.dtype))

    def __enter__(self) -> NpyStream:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is not None:
            self.discard()

    def write(self, rows: np.ndarray) -> None:
        """The next rows (their dtype and row shape must be the file's; never converted here)."""
        rows = np.ascontiguousarray(rows)
        if rows.dtype != self.dtype or rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{rows.shape} {rows.dtype} rows do not fit {self.shape} {self.dtype} after row "
                             f"{self.rows}")
        self.rows += len(rows)
        if rows.size:
            self._put(memoryview(rows).cast("B"))

    def close(self) -> dict[str, Any]:
        """The file complete (fsynced, renamed into place) → its manifest entry: shape, dtype, bytes, sha256."""
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.rows} rows written of {self.shape[0]}")
        if self.path is not None:
            try:
                if self._fh is None:
                    self._fh = open(self._tmp, "wb")
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                os.replace(self._tmp, self.path)
            except OSError as exc:
                self.discard()
                raise _write_error(self.path, exc, self.again) from None
        return {"shape": list(self.shape), "dtype": str(self.dtype), "bytes": self.size,
                "sha256": self._sha.hexdigest()}

    def discard(self) -> None:
        """The temporary file removed (never a second error over the first)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
        if self._tmp is not None:
            remove_quietly(self._tmp)

    def _put(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self.size += len(data)
        if self.path is None:
            return
        try:
            if self._fh is None:
                self._fh = open(self._tmp, "wb")
            _write_block(self._fh, data)
        except OSError as exc:
            self.discard()
            raise _write_error(self.path, exc, self.again) from None


@dataclass(frozen=True)
class StreamedArray:
    """One final array of a cache before it is written: its shape and dtype, and its rows as blocks in order
    (made while it is written, so only one of them is in memory at a time)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Iterable[np.ndarray]

    @classmethod
    def whole(cls, array: np.ndarray) -> StreamedArray:
        """A small array already in memory, as one block."""
        return cls(tuple(array.shape), array.dtype, [array])

    def write(self, path: Path | None, again: str = EMBED_AGAIN) -> dict[str, Any]:
        """The array written to ``path`` atomically (None: only hashed) → its manifest entry."""
        with NpyStream(path, self.shape, self.dtype, again) as out:
            for block in self.blocks:
                out.write(block)
            return out.close()


def _write_block(fh: Any, data: bytes | memoryview) -> None:
    """The one place a streamed array's bytes are written (tests make it fail to simulate a full disk)."""
    fh.write(data)


def shard_ranges(n: int, size: int) -> list[range]:
    """Rows ``0..n`` cut into consecutive shards of ``size`` rows (the last one shorter)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass(frozen=True)
class Todo:
    """What a run still has to encode: image and caption shard numbers, and whether the class prompts."""

    images: list[int]
    captions: list[int]
    prompts: bool
    resumed: bool  # some shards were finished by an earlier, interrupted run


@dataclass(frozen=True)
class ShardRecords:
    """What the finished shards' records say: the skipped images, encode time and counts, and the embeddings'
    widths (the rows themselves are read one shard at a time, ``WorkFolder.parts``)."""

    skipped: list[dict]  # {index, image_id, reason} of each unreadable image, in shard order
    seconds: dict[str, float]  # image, image_encoded (how many images), text
    dims: dict[str, int]  # image, text: columns of the shards


class WorkFolder:
    """``work/`` of one cache key: its frozen plan (rows per encoder batch, shard size, counts) and the shard
    files. Shards are whole encoder batches, so a batch never crosses two shards."""

    def __init__(self, path: Path, plan: dict[str, Any]) -> None:
        self.path, self.plan = path, plan
        self.rows = plan["encode_rows"]  # the encoders' fixed micro-batch: rows [k·rows, (k+1)·rows)
        self.image_shards = shard_ranges(plan["images"], plan["shard_size"])
        self.text_shards = shard_ranges(plan["captions"], plan["shard_size"])

    @classmethod
    def freeze(cls, path: Path, key: str, images: int, captions: int, shard_size: int, log: Log) -> WorkFolder:
        """The plan of an interrupted run of the same data (its finished shards are kept), else a new one written
        to ``path``/plan.json; an unfinished run of other data or an older format is discarded first."""
        rows = ENCODE_ROWS
        plan = {"key": key, "images": images, "captions": captions, "encode_rows": rows,
                "shard_size": -(-shard_size // rows) * rows}  # whole micro-batches: batches never cross shards
        if (path / PLAN).is_file():
            old = read_plan(path / PLAN)
            if old is not None and _resumes(old, plan):
                if old["shard_size"] != plan["shard_size"]:
                    log(f"resuming with the interrupted run's shard_size={old['shard_size']} (its finished shards "
                        f"are kept; the values do not depend on it)")
                return cls(path, old)
            discard_unfinished(path, log)
        write_plan(path, plan)
        return cls(path, plan)

    def shard_file(self, kind: str, s: int, ext: str) -> Path:
        return self.path / f"{kind}-{s:05d}.{ext}"

    def todo(self, labelled: bool) -> Todo:
        """The shards without their ``.json`` (not finished), and the prompts of a labelled set if not encoded."""
        images = [s for s in range(len(self.image_shards)) if not self.shard_file("image", s, "json").is_file()]
        captions = [s for s in range(len(self.text_shards)) if not self.shard_file("text", s, "json").is_file()]
        resumed = len(images) < len(self.image_shards) or len(captions) < len(self.text_shards)
        return Todo(images, captions, labelled and not (self.path / "classes.json").is_file(), resumed)

    def save_shard(self, kind: str, s: int, array: np.ndarray, meta: dict[str, Any]) -> None:
        """Shard ``s`` of ``kind`` (image or text): its rows, then its ``.json``, from which it counts as done."""
        save_array(self.shard_file(kind, s, "npy"), array)
        save_text(self.shard_file(kind, s, "json"), json.dumps(meta))

    def save_prompts(self, array: np.ndarray) -> None:
        save_array(self.path / "classes.npy", array)
        save_text(self.path / "classes.json", json.dumps({"prompts": len(array)}))  # done from here

    def files(self) -> list[Path]:
        """Every shard file of the plan (what rank 0 waits to see when other ranks wrote some)."""
        shards = {"image": self.image_shards, "text": self.text_shards}
        return [self.shard_file(kind, s, ext) for kind in KINDS for s in range(len(shards[kind]))
                for ext in ("npy", "json")]

    def records(self) -> ShardRecords:
        """The finished shards' records (no rows read: the widths come from the first shards' headers)."""
        skipped, img_seconds, img_encoded = [], 0.0, 0
        for s in range(len(self.image_shards)):
            meta = json.loads(self.shard_file("image", s, "json").read_text())
            skipped += meta["skipped"]
            img_seconds, img_encoded = img_seconds + meta["seconds"], img_encoded + meta["encoded"]
        txt_seconds = sum(json.loads(self.shard_file("text", s, "json").read_text())["seconds"]
                          for s in range(len(self.text_shards)))
        seconds = {"image": img_seconds, "image_encoded": img_encoded, "text": txt_seconds}
        dims = {kind: int(np.load(self.shard_file(kind, 0, "npy"), mmap_mode="r", allow_pickle=False).shape[1])
                for kind in KINDS}
        return ShardRecords(skipped, seconds, dims)

    def parts(self, kind: str) -> Iterator[tuple[range, np.ndarray]]:
        """(its rows in the source, its array) of each ``kind`` shard in source order, one shard in memory at a
        time; a shard of another width than the first is an AlignError (the folder is damaged)."""
        shards = self.image_shards if kind == "image" else self.text_shards
        width = None
        for s, rows in enumerate(shards):
            array = np.load(self.shard_file(kind, s, "npy"), allow_pickle=False)
            width = array.shape[1] if width is None else width
            if array.shape != (len(rows), width):
                raise AlignError(f"shard {self.shard_file(kind, s, 'npy')} holds {list(array.shape)}, expected "
                                 f"[{len(rows)}, {width}]: delete {self.path} and run `align embed` again")
            yield rows, array

    def prompts(self) -> np.ndarray:
        """The class prompts' embeddings (labelled sets), class-major."""
        return np.load(self.path / "classes.npy", allow_pickle=False)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def read_plan(path: Path) -> dict[str, Any] | None:
    """The plan.json of an earlier run, or None when it is unreadable or not a mapping."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def discard_unfinished(path: Path, log: Log) -> None:
    """Remove an unfinished run's work folder whose plan the new run cannot resume, saying so."""
    log(f"discarding an unfinished run in {path} (it was for different data or an older format)")
    shutil.rmtree(path, ignore_errors=True)


def write_plan(path: Path, plan: dict[str, Any]) -> None:
    """A new work folder at ``path`` holding ``plan`` (plan.json), the first file of a run."""
    path.mkdir(parents=True, exist_ok=True)
    save_text(path / PLAN, json.dumps(plan, indent=1))

def is_own_plan(work: Path, key: str) -> bool:
    """Whether ``work``/plan.json is the shard plan ``align embed`` wrote for cache ``key`` (a cache key's shape):
    its key, row counts, rows per encoder batch and shard size (a webdataset embed's: its key, tar names, rows)."""
    plan = read_plan(work / PLAN) if KEY_NAME.fullmatch(key) else None
    if plan is not None and plan.get("key") == key and isinstance(plan.get("tars"), list):  # a webdataset embed's
        return all(isinstance(t, str) for t in plan["tars"]) and is_count(plan.get("encode_rows"), 1)
    return (plan is not None and plan.get("key") == key and is_count(plan.get("images"))
            and is_count(plan.get("captions")) and is_count(plan.get("encode_rows"), 1)
            and is_count(plan.get("shard_size"), 1))


def _resumes(old: dict[str, Any], plan: dict[str, Any]) -> bool:
    """Whether an earlier run's plan is this run's: same key, counts and batch rows, shards of whole batches."""
    same = all(old.get(k) == plan[k] for k in ("key", "images", "captions", "encode_rows"))
    return same and is_count(old.get("shard_size"), 1) and old["shard_size"] % plan["encode_rows"] == 0
