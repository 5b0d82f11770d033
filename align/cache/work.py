"""The ``work/`` folder of an embed in progress, and the atomic writes every file of a cache goes through (edge).

``work/plan.json`` freezes the shard layout of a run (reused on resume, so the same shards count as done). Each
shard becomes ``image-SSSSS.npy`` or ``text-SSSSS.npy`` plus a ``.json`` written last: the shard is done from
there, so a run killed at any point loses at most the shards it was encoding. A labelled set adds
``classes.npy`` (+ ``classes.json``), the zero-shot prompts. Every rank of a torchrun job writes its own shards
here; rank 0 reads them all back to assemble the cache.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from align.cache.key import ENCODE_ROWS, KEY_NAME
from align.cache.read import is_count
from align.common.errors import AlignError
from align.common.files import atomic_write_text, is_write_problem, remove_quietly, sha256_file, write_error
from align.common.progress import Log

PLAN = "plan.json"
KINDS = ("image", "text")  # a shard's file names: <kind>-SSSSS.npy and .json


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
        raise _write_error(path, exc) from None
    return digest


def _write_npy(fh: Any, array: np.ndarray) -> None:
    """The one place array bytes are written (tests make it fail to simulate a full disk)."""
    np.save(fh, array, allow_pickle=False)


def save_text(path: Path, text: str) -> None:
    """``atomic_write_text`` (it removes its own temp file on failure), with OSError as one AlignError line."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise _write_error(path, exc) from None


def _write_error(path: Path, exc: OSError) -> AlignError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return AlignError(f"no space left on the device writing {path}: free some space, then run the same "
                          f"`align embed` again (finished shards are kept and it resumes)")
    if is_write_problem(exc):  # read-only, no permission, a name too long, a link loop
        return write_error(path, exc)
    return AlignError(f"cannot write {path}: {exc.strerror or exc} (check the folder's permissions and disk)")


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
class ShardContents:
    """The finished shards read back: every row in source order, the skipped images, encode time and counts."""

    image: np.ndarray  # (N_img, D_img) float32, zero rows where an image was skipped
    text: np.ndarray  # (N_cap, D_txt) float32
    skipped: list[dict]  # {index, image_id, reason} of each unreadable image, in shard order
    seconds: dict[str, float]  # image, image_encoded (how many images), text


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
            old = _read_plan(path / PLAN)
            if old is not None and _resumes(old, plan):
                if old["shard_size"] != plan["shard_size"]:
                    log(f"resuming with the interrupted run's shard_size={old['shard_size']} (its finished shards "
                        f"are kept; the values do not depend on it)")
                return cls(path, old)
            log(f"discarding an unfinished run in {path} (it was for different data or an older format)")
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        save_text(path / PLAN, json.dumps(plan, indent=1))
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

    def read(self) -> ShardContents:
        """The finished shards concatenated in source order."""
        img_parts, skipped, img_seconds, img_encoded = [], [], 0.0, 0
        for s in range(len(self.image_shards)):
            meta = json.loads(self.shard_file("image", s, "json").read_text())
            img_parts.append(np.load(self.shard_file("image", s, "npy"), allow_pickle=False))
            skipped += meta["skipped"]
            img_seconds, img_encoded = img_seconds + meta["seconds"], img_encoded + meta["encoded"]
        txt_parts, txt_seconds = [], 0.0
        for s in range(len(self.text_shards)):
            meta = json.loads(self.shard_file("text", s, "json").read_text())
            txt_parts.append(np.load(self.shard_file("text", s, "npy"), allow_pickle=False))
            txt_seconds += meta["seconds"]
        seconds = {"image": img_seconds, "image_encoded": img_encoded, "text": txt_seconds}
        return ShardContents(np.concatenate(img_parts), np.concatenate(txt_parts), skipped, seconds)

    def prompts(self) -> np.ndarray:
        """The class prompts' embeddings (labelled sets), class-major."""
        return np.load(self.path / "classes.npy", allow_pickle=False)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _read_plan(path: Path) -> dict[str, Any] | None:
    """The plan.json of an earlier run, or None when it is unreadable or not a mapping."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def is_own_plan(work: Path, key: str) -> bool:
    """Whether ``work``/plan.json is the shard plan ``align embed`` wrote for cache ``key`` (a cache key's shape):
    its key, row counts, rows per encoder batch and shard size."""
    plan = _read_plan(work / PLAN) if KEY_NAME.fullmatch(key) else None
    return (plan is not None and plan.get("key") == key and is_count(plan.get("images"))
            and is_count(plan.get("captions")) and is_count(plan.get("encode_rows"), 1)
            and is_count(plan.get("shard_size"), 1))


def _resumes(old: dict[str, Any], plan: dict[str, Any]) -> bool:
    """Whether an earlier run's plan is this run's: same key, counts and batch rows, shards of whole batches."""
    same = all(old.get(k) == plan[k] for k in ("key", "images", "captions", "encode_rows"))
    return same and is_count(old.get("shard_size"), 1) and old["shard_size"] % plan["encode_rows"] == 0
