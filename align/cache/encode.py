"""Frozen encoders run over the shards of one split, each finished shard saved into ``work/`` (edge layer).

Encoders run on fixed micro-batches of the plan's rows (``ENCODE_ROWS``), cut at multiples of the global row
index: a row's embedding depends (by ~1e-6) on which rows share its batch, so this makes the stored bytes the same
whatever batch_size, shard_size, the number of ranks or where a resumed run starts.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from align.cache.key import EmbedConfig
from align.cache.work import WorkFolder
from align.common.config import shorten
from align.common.errors import AlignError
from align.common.progress import progress_bar
from align.data.caption_set import ImageUnreadable


class ShardEncoder:
    """Encodes shards of ``data`` (one split) into ``work``: images, captions and a labelled set's prompts."""

    def __init__(self, data: Any, work: WorkFolder, cfg: EmbedConfig, split: str, progress: bool) -> None:
        self.data, self.work, self.cfg, self.split, self.progress = data, work, cfg, split, progress

    def images(self, encoder: Any, todo: list[int]) -> None:
        """The image shards in ``todo``; each becomes work/image-SSSSS.npy (+ .json, written last)."""
        shards, rows = self.work.image_shards, self.work.rows
        # A loading step reads whole micro-batches (about batch_size images) of one shard; the encoder then runs
        # each micro-batch on its own, so its rows are the same in every run whatever batch_size and shard_size are.
        step = rows * max(1, -(-self.cfg.batch_size // rows))
        batches = [list(shard[i:i + step]) for s in todo for shard in [shards[s]] for i in range(0, len(shard), step)]
        loader = torch.utils.data.DataLoader(_ImageItems(self.data, encoder.preprocess), batch_sampler=batches,
                                             num_workers=self.cfg.num_workers, collate_fn=_as_list,
                                             pin_memory=encoder.device.type == "cuda")
        pending = {s: _ImageShard(shards[s]) for s in todo}
        shard_of = {i: s for s in todo for i in shards[s]}
        with progress_bar(len(self.data.image_ids), f"images ({self.split})", enabled=self.progress) as bar:
            bar.advance(len(self.data.image_ids) - sum(len(shards[s]) for s in todo))  # done before
            for items in loader:
                s = shard_of[items[0][0]]
                self._encode_images(encoder, items, pending[s])
                bar.advance(len(items))
                if pending[s].complete:
                    self.work.save_shard("image", s, pending[s].array(encoder), pending[s].meta())
                    del pending[s]

    def _encode_images(self, encoder: Any, items: list[tuple[int, Any, str | None]], shard: _ImageShard) -> None:
        """One loading step: unreadable images skipped (or refused with --strict), the rest in micro-batches."""
        for i, _, reason in items:
            if reason is not None:
                if self.cfg.strict:
                    raise AlignError(f"image {i} ({self.data.image_ids[i]}) of split {self.split!r} is unreadable: "
                                     f"{reason} (drop --strict to skip unreadable images)")
                shard.skipped.append({"index": i, "image_id": str(self.data.image_ids[i]), "reason": reason})
        for micro in _micro_batches([(i, x) for i, x, _ in items if x is not None], self.work.rows):
            t0 = time.perf_counter()
            emb = encoder.encode(torch.stack([x for _, x in micro]))
            shard.seconds += time.perf_counter() - t0
            require_finite(emb, [self.data.image_ids[i] for i, _ in micro], "image", self.split)
            for (i, _), row in zip(micro, emb.numpy()):
                shard.rows[i] = row

    def captions(self, encoder: Any, todo: list[int]) -> None:
        """The caption shards in ``todo``; each becomes work/text-SSSSS.npy (+ .json, written last)."""
        shards, rows, captions = self.work.text_shards, self.work.rows, self.data.captions
        with progress_bar(len(captions), f"captions ({self.split})", enabled=self.progress) as bar:
            bar.advance(len(captions) - sum(len(shards[s]) for s in todo))  # done before
            for s in todo:
                shard, parts, seconds = shards[s], [], 0.0
                for start in range(shard.start, shard.stop, rows):  # shards start at multiples of it
                    stop = min(start + rows, shard.stop)
                    t0 = time.perf_counter()
                    emb = encoder.encode([captions[i] for i in range(start, stop)])
                    seconds += time.perf_counter() - t0
                    require_finite(emb, [f"caption {i}" for i in range(start, stop)], "text", self.split)
                    parts.append(emb.numpy().astype(np.float32, copy=False))
                    bar.advance(stop - start)
                meta = {"start": shard.start, "stop": shard.stop, "seconds": seconds, "encoded": len(shard)}
                self.work.save_shard("text", s, np.concatenate(parts), meta)

    def prompts(self, encoder: Any) -> None:
        """The zero-shot prompts of a labelled set, class-major, in fixed batches → work/classes.npy."""
        prompts, rows = [p for per_class in self.data.prompts for p in per_class], self.work.rows
        parts = []
        for start in range(0, len(prompts), rows):
            emb = encoder.encode(prompts[start:start + rows])
            require_finite(emb, [f"prompt {shorten(repr(p), 40)}" for p in prompts[start:start + rows]], "text",
                          self.split)
            parts.append(emb.numpy().astype(np.float32, copy=False))
        self.work.save_prompts(np.concatenate(parts))


class _ImageShard:
    """An image shard being encoded: its rows so far, the images skipped, the encoders' seconds."""

    def __init__(self, shard: range) -> None:
        self.shard, self.rows, self.skipped, self.seconds = shard, {}, [], 0.0

    @property
    def complete(self) -> bool:
        return len(self.rows) + len(self.skipped) == len(self.shard)

    def array(self, encoder: Any) -> np.ndarray:
        """The shard's rows in order; ``encoder.dim`` (a dummy forward pass) only when every image was skipped."""
        dim = len(next(iter(self.rows.values()))) if self.rows else encoder.dim
        array = np.zeros((len(self.shard), dim), dtype=np.float32)  # skipped rows stay zero, dropped at the end
        for i, row in self.rows.items():
            array[i - self.shard.start] = row
        return array

    def meta(self) -> dict[str, Any]:
        return {"start": self.shard.start, "stop": self.shard.stop,
                "skipped": sorted(self.skipped, key=lambda d: d["index"]), "seconds": self.seconds,
                "encoded": len(self.rows)}


class _ImageItems(torch.utils.data.Dataset):
    """Index → (index, preprocessed (3, H, W) tensor or None, reason); runs in DataLoader workers."""

    def __init__(self, data: Any, preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.data, self.preprocess = data, preprocess

    def __len__(self) -> int:
        return len(self.data.image_ids)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        from PIL import Image  # heavy: only where images are decoded (DataLoader workers)

        try:
            return index, self.preprocess(self.data.load_image(index)), None
        except ImageUnreadable as exc:
            return index, None, str(exc)
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # what PIL raises on broken files
            return index, None, f"{type(exc).__name__}: {exc}"


def _as_list(items: list) -> list:
    return items


def _micro_batches(items: list[tuple[int, Any]], rows: int) -> list[list[tuple[int, Any]]]:
    """(row, value) pairs grouped by their micro-batch, row // rows, in order."""
    groups: dict[int, list[tuple[int, Any]]] = {}
    for item in items:
        groups.setdefault(item[0] // rows, []).append(item)
    return list(groups.values())


def require_finite(emb: torch.Tensor, names: list, tower: str, split: str) -> None:
    """An AlignError naming up to 5 rows of ``emb`` that hold NaN or inf."""
    bad = (~torch.isfinite(emb)).any(dim=1)
    if bool(bad.any()):
        which = [str(names[i]) for i in torch.nonzero(bad).flatten().tolist()[:5]]
        raise AlignError(f"the {tower} encoder produced NaN/inf embeddings for {', '.join(which)} in split "
                         f"{split!r}: check the weights, or use precision: fp32")
