"""Frozen encoders run over webdataset tar shards as they stream by, each finished tar saved into ``work/``
(edge layer).

A DataLoader reads the tars (each DataLoader worker whole tars of its own) and hands over blocks of decoded,
preprocessed samples; this process encodes them and keeps one tar's rows until the tar ends, then encodes its
captions and saves it (``TarWorkFolder.save_tar``). Encoders run on fixed micro-batches cut at multiples of
``ENCODE_ROWS`` of the sample (and caption) index within the tar, so a tar's bytes do not depend on batch_size,
workers, ranks or resume; they equal an image folder's of the same images when every tar holds a multiple of
``ENCODE_ROWS`` samples (and captions) before the last one.
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from align.cache.encode import require_finite
from align.cache.key import EmbedConfig
from align.cache.tar_work import TarWorkFolder
from align.common.errors import AlignError
from align.common.progress import progress_bar
from align.data.caption_set import ImageUnreadable, open_image
from align.data.source_wds import WebDatasetSource

# (index in the tar, key, preprocessed image or None, why skipped or None, its SKIP_KINDS kind, captions)
Item = tuple[int, str, Any, "str | None", "str | None", list[str]]
T = TypeVar("T")
READ_AHEAD_BLOCKS = 2  # blocks of decoded samples read ahead of the encoders when no DataLoader worker does it


class TarEncoder:
    """Encodes whole tar shards of one split into ``work``: image rows, caption rows, skips."""

    def __init__(self, source: WebDatasetSource, paths: list[Path], work: TarWorkFolder, cfg: EmbedConfig,
                 split: str) -> None:
        self.source, self.paths, self.work, self.cfg, self.split = source, paths, work, cfg, split

    def run(self, todo: list[int], image_encoder: Any, text_encoder: Any, progress: bool) -> dict[str, int]:
        """The tars in ``todo`` encoded and saved → {"images": samples read, "captions": captions encoded}."""
        rows = self.work.rows
        step = rows * max(1, -(-self.cfg.batch_size // rows))  # blocks of whole micro-batches
        items = _TarItems(self.source, self.split, [(t, self.paths[t]) for t in todo], image_encoder.preprocess, step)
        workers = min(self.cfg.num_workers, len(todo))
        loader: Iterable[tuple[int, list[Item], bool]] = torch.utils.data.DataLoader(
            items, batch_size=None, num_workers=workers, collate_fn=_same)
        if workers == 0:  # without worker processes, parse and decode the next block while this one is encoded
            loader = read_ahead(loader, READ_AHEAD_BLOCKS)
        pending: dict[int, _TarState] = {}
        done = {"images": 0, "captions": 0}
        with progress_bar(len(self.paths), f"tar shards ({self.split})", enabled=progress) as bar:
            bar.advance(len(self.paths) - len(todo))
            for t, block, end in loader:
                state = pending.setdefault(t, _TarState(self.paths[t].name))
                for micro in self._accept(block, state):
                    t0 = time.perf_counter()
                    emb = image_encoder.encode(torch.stack([x for _, x in micro]))
                    state.seconds["image"] += time.perf_counter() - t0
                    require_finite(emb, [state.keys[i] for i, _ in micro], "image", self.split)
                    state.rows.update(zip((i for i, _ in micro), emb.numpy().astype(np.float32, copy=False)))
                if end:
                    self.work.save_tar(t, *state.finish(image_encoder, text_encoder, rows, self.split))
                    done["images"] += state.samples
                    done["captions"] += len(state.captions)
                    del pending[t]
                    bar.advance(1)
        return done

    def _accept(self, block: list[Item], state: _TarState) -> list[list[tuple[int, Any]]]:
        """A block's samples taken in (skips recorded, or refused with --strict) → its image micro-batches."""
        usable = []
        for index, key, image, reason, kind, captions in block:
            state.keys[index] = key
            state.samples = index + 1
            state.captions += captions
            state.caption_sample += [index] * len(captions)
            if reason is None:
                usable.append((index, image))
                continue
            if self.cfg.strict:
                raise AlignError(f"sample {key} of {state.name} (split {self.split!r}) is skipped: {reason} (drop "
                                 f"--strict to skip and list such samples)")
            state.skipped.append({"index": index, "image_id": key, "reason": reason, "kind": kind})
        groups: dict[int, list[tuple[int, Any]]] = {}
        for index, image in usable:
            groups.setdefault(index // self.work.rows, []).append((index, image))
        return list(groups.values())


class _TarState:
    """One tar being encoded: its samples so far, their captions, the rows encoded and the skips."""

    def __init__(self, name: str) -> None:
        self.name, self.samples = name, 0
        self.keys: dict[int, str] = {}
        self.captions: list[str] = []
        self.caption_sample: list[int] = []
        self.rows: dict[int, np.ndarray] = {}
        self.skipped: list[dict[str, Any]] = []
        self.seconds = {"image": 0.0, "text": 0.0}

    def finish(self, image_encoder: Any, text_encoder: Any, rows: int,
               split: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The tar's captions encoded in micro-batches → (its arrays, its record)."""
        dim = len(next(iter(self.rows.values()))) if self.rows else image_encoder.dim
        image = np.zeros((self.samples, dim), dtype=np.float32)  # skipped rows stay zero, dropped at the end
        for i, row in self.rows.items():
            image[i] = row
        parts = []
        for start in range(0, len(self.captions), rows):
            t0 = time.perf_counter()
            emb = text_encoder.encode(self.captions[start:start + rows])
            self.seconds["text"] += time.perf_counter() - t0
            require_finite(emb, [f"caption {k} of {self.name}" for k in range(start, start + len(emb))], "text", split)
            parts.append(emb.numpy().astype(np.float32, copy=False))
        text = np.concatenate(parts) if parts else np.zeros((0, text_encoder.dim), dtype=np.float32)
        c2s = np.asarray(self.caption_sample, dtype=np.int64)
        keep = np.ones(self.samples, dtype=bool)
        keep[[s["index"] for s in self.skipped]] = False
        record = {"shard": self.name, "samples": self.samples, "captions": len(self.captions),
                  "kept_samples": int(keep.sum()), "kept_captions": int(keep[c2s].sum()) if len(c2s) else 0,
                  "skipped": self.skipped, "seconds": self.seconds, "encoded": len(self.rows)}
        return {"image.npy": image, "text.npy": text, "captions.npy": c2s}, record


class _TarItems(torch.utils.data.IterableDataset):
    """(tar number, block of items, whether the tar ends here) for each block of ``step`` samples of each tar;
    a DataLoader worker reads whole tars (the i-th of its share), decoding and preprocessing the images."""

    def __init__(self, source: WebDatasetSource, split: str, tars: list[tuple[int, Path]],
                 preprocess: Callable[[Any], torch.Tensor], step: int) -> None:
        super().__init__()
        self.source, self.split, self.tars, self.preprocess, self.step = source, split, tars, preprocess, step

    def __iter__(self) -> Iterator[tuple[int, list[Item], bool]]:
        worker = torch.utils.data.get_worker_info()
        mine = self.tars if worker is None else self.tars[worker.id::worker.num_workers]
        for t, path in mine:
            block: list[Item] = []
            for sample in self.source.samples(path, self.split):
                block.append(self._item(sample))
                if len(block) == self.step:
                    yield t, block, False
                    block = []
            yield t, block, True

    def _item(self, sample: Any) -> Item:
        from PIL import Image  # heavy: only where images are decoded (DataLoader workers)

        head = (sample.index, sample.key)
        if sample.problem is not None:
            return *head, None, sample.problem, sample.kind, sample.captions
        try:
            return *head, self.preprocess(open_image(sample.image, sample.key)), None, None, sample.captions
        except ImageUnreadable as exc:
            return *head, None, str(exc), "image", sample.captions
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # what PIL raises on broken files
            return *head, None, f"{type(exc).__name__}: {exc}", "image", sample.captions


def _same(block: Any) -> Any:
    return block


def read_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` in their order, read by a background thread up to ``depth`` ahead of the consumer; an exception
    raised while reading is raised here, in its place. Parsing a tar and decoding its images (Python and PIL) then
    overlap the encoders (torch releases the GIL while it computes). Closing the iterator stops the thread."""
    slots: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in items:
                if not put((False, item)):
                    return
            put((True, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((True, exc))

    reader = threading.Thread(target=fill, name="tar-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            done, value = slots.get()
            if done:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
