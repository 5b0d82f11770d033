"""The ``work/`` folder of a webdataset embed: one finished record per tar shard, and the cache's arrays streamed
from them (edge layer).

``plan.json`` freezes the split's tar shards (names, in order). Tar shard ``t`` becomes ``tar-TTTTT-image.npy``
(one row per sample, zero where skipped), ``tar-TTTTT-text.npy`` (one row per caption), ``tar-TTTTT-captions.npy``
(each caption's sample in the shard) and ``tar-TTTTT.json`` written last (counts, skipped samples with reasons,
encode seconds): the tar counts as done from there, so a killed run re-reads only the tars it was encoding. The
final arrays are assembled one tar at a time (memory holds one tar's rows, whatever the number of tars).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from align.cache.key import ENCODE_ROWS
from align.cache.work import (
    PLAN,
    StreamedArray,
    Todo,
    discard_unfinished,
    read_plan,
    save_array,
    save_text,
    write_plan,
)
from align.common.errors import AlignError
from align.common.progress import Log

TAR_FILES = ("image.npy", "text.npy", "captions.npy")  # a tar's arrays: tar-TTTTT-<name>; its record tar-TTTTT.json


@dataclass(frozen=True)
class TarPart:
    """One finished tar's rows, read back: which samples are kept, and where its rows start in the split."""

    image: np.ndarray  # (samples, D_img), memory-mapped
    text: np.ndarray  # (captions, D_txt), memory-mapped
    caption_sample: np.ndarray  # (captions,) each caption's sample in the tar
    keep: np.ndarray  # (samples,) bool: not skipped
    first_sample: int  # the tar's first sample's index in the split
    first_caption: int
    kept_before: int  # kept samples of the earlier tars (rows of image.npy before this tar's)


@dataclass(frozen=True)
class TarRecords:
    """What the finished tars' records say (no rows read): skipped samples with their index in the split, encode
    seconds, the embeddings' widths, and each tar's counts."""

    skipped: list[dict]
    seconds: dict[str, float]
    dims: dict[str, int]
    tars: list[dict[str, Any]]


class TarWorkFolder:
    """``work/`` of one webdataset cache key: the frozen list of tar shards and what is finished of them."""

    def __init__(self, path: Path, plan: dict[str, Any]) -> None:
        self.path, self.plan = path, plan
        self.rows = plan["encode_rows"]
        self.tars: list[str] = plan["tars"]

    @classmethod
    def freeze(cls, path: Path, key: str, tars: list[str], log: Log) -> TarWorkFolder:
        """The plan of an interrupted run of the same shards (its finished tars kept), else a new one."""
        plan = {"key": key, "tars": tars, "encode_rows": ENCODE_ROWS}
        if (path / PLAN).is_file():
            if read_plan(path / PLAN) == plan:
                return cls(path, plan)
            discard_unfinished(path, log)
        write_plan(path, plan)
        return cls(path, plan)

    def file(self, t: int, name: str) -> Path:
        return self.path / f"tar-{t:05d}-{name}" if name in TAR_FILES else self.path / f"tar-{t:05d}.json"

    def todo(self) -> Todo:
        """The tars without their record (``Todo.images`` holds tar numbers: a tar carries its captions)."""
        left = [t for t in range(len(self.tars)) if not self.file(t, "json").is_file()]
        return Todo(left, [], False, len(left) < len(self.tars))

    def save_tar(self, t: int, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        """Tar ``t``'s arrays, then its record, from which it counts as done."""
        for name in TAR_FILES:
            save_array(self.file(t, name), arrays[name])
        save_text(self.file(t, "json"), json.dumps(record))

    def files(self) -> list[Path]:
        """Every file of the plan's tars (what rank 0 waits to see when other ranks wrote some)."""
        return [self.file(t, name) for t in range(len(self.tars)) for name in (*TAR_FILES, "json")]

    def records(self) -> TarRecords:
        """The finished tars' records, skipped samples numbered in the split."""
        tars = [json.loads(self.file(t, "json").read_text()) for t in range(len(self.tars))]
        skipped, first = [], 0
        for record in tars:
            skipped += [dict(s, index=first + s["index"]) for s in record["skipped"]]
            first += record["samples"]
        seconds = {"image": sum(r["seconds"]["image"] for r in tars), "text": sum(r["seconds"]["text"] for r in tars),
                   "image_encoded": sum(r["encoded"] for r in tars)}
        dims = {kind: int(np.load(self.file(0, f"{kind}.npy"), mmap_mode="r", allow_pickle=False).shape[1])
                for kind in ("image", "text")}
        return TarRecords(skipped, seconds, dims, tars)

    def parts(self, records: TarRecords) -> Iterator[TarPart]:
        """Each tar's rows in order, one tar at a time (memory-mapped)."""
        first_sample = first_caption = kept_before = 0
        for t, record in enumerate(records.tars):
            keep = np.ones(record["samples"], dtype=bool)
            keep[[s["index"] for s in record["skipped"] if s["index"] < record["samples"]]] = False
            load = {name: np.load(self.file(t, name), mmap_mode="r", allow_pickle=False) for name in TAR_FILES}
            if len(load["image.npy"]) != record["samples"] or len(load["text.npy"]) != record["captions"]:
                raise AlignError(f"the shards of tar {t} in {self.path} do not match its record: delete {self.path} "
                                 f"and run `align embed` again")
            yield TarPart(load["image.npy"], load["text.npy"], np.asarray(load["captions.npy"]), keep, first_sample,
                          first_caption, kept_before)
            first_sample, first_caption = first_sample + record["samples"], first_caption + record["captions"]
            kept_before += int(keep.sum())

    def arrays(self, records: TarRecords, stored: Callable[[np.ndarray, str], np.ndarray],
               dtype: np.dtype) -> tuple[dict[str, StreamedArray], dict[str, int]]:
        """The cache's five arrays, streamed tar by tar (``stored``: rows of a tower → storage form) → (arrays by
        file name, the manifest's counts)."""
        n_img = sum(r["kept_samples"] for r in records.tars)
        n_cap = sum(r["kept_captions"] for r in records.tars)
        all_caps = sum(r["captions"] for r in records.tars)
        kept_cap = lambda p: p.keep[p.caption_sample]  # a caption stays with its image
        arrays = {
            "image.npy": StreamedArray((n_img, records.dims["image"]), dtype,
                                       (stored(np.asarray(p.image[p.keep]), "image") for p in self.parts(records))),
            "text.npy": StreamedArray((n_cap, records.dims["text"]), dtype,
                                      (stored(np.asarray(p.text[kept_cap(p)]), "text") for p in self.parts(records))),
            "caption_to_image.npy": StreamedArray((n_cap,), np.dtype(np.int64), (
                (p.kept_before + np.cumsum(p.keep) - 1)[p.caption_sample[kept_cap(p)]].astype(np.int64)
                for p in self.parts(records))),
            "image_rows.npy": StreamedArray((n_img,), np.dtype(np.int64), (
                (p.first_sample + np.flatnonzero(p.keep)).astype(np.int64) for p in self.parts(records))),
            "caption_rows.npy": StreamedArray((n_cap,), np.dtype(np.int64), (
                (p.first_caption + np.flatnonzero(kept_cap(p))).astype(np.int64) for p in self.parts(records))),
        }
        counts = {"images": n_img, "captions": n_cap, "skipped_images": len(records.skipped),
                  "dropped_captions": all_caps - n_cap}
        return arrays, counts

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
