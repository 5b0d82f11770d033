"""A training step's batches read from the training split (orchestration): each step's rows gathered from the
cache's memory maps as float32 (``align.cache.embeddings.EmbeddingRows.gather``), moved to the device, and the next
steps' rows read in a background thread while this step computes.

The sampler is deterministic, so the rows of the steps ahead are known: ``BatchReader.batches(step)`` takes the
batches read for ``step`` and asks for those of ``step + 1`` … ``step + PREFETCH_STEPS``. The sampler itself is only
ever called from the training thread, in step order; the thread only reads rows. The values are those an in-memory
float32 copy would give (float16 → float32 is exact), so prefetching changes when a batch is read, never what it
holds: a run is bit-identical with and without it.

On CUDA the rows are gathered into pinned host buffers (one set per step in flight) and copied with
``non_blocking=True``; a buffer is filled again only once the copy out of it has completed (a CUDA event). On a CPU
each batch is a fresh tensor (nothing is copied to a device, and a fresh tensor cannot be overwritten while in use).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor

from align.cache.embeddings import EmbeddingRows

PREFETCH_STEPS = 1  # steps read ahead in the background (0: each step's rows read when it starts)
Rows = list[tuple[slice, Tensor, Tensor]]  # heads [a:b] with their (B,) image rows and (B,) caption rows (CPU)
Batches = list[tuple[slice, Tensor, Tensor]]  # heads [a:b] with their (B, image_dim) and (B, text_dim) float32


class BatchReader:
    """The batches of a pack's steps: ``rows(step)`` says which rows (called from the training thread only, in step
    order), ``image`` and ``text`` hold them; ``batches(step)`` returns them on ``device``. Steps from ``stop`` on
    are never read ahead."""

    def __init__(self, image: EmbeddingRows, text: EmbeddingRows, rows: Callable[[int], Rows],
                 device: torch.device, stop: int, prefetch: int | None = None) -> None:
        self.image, self.text, self.rows, self.device, self.stop = image, text, rows, device, stop
        self.prefetch = PREFETCH_STEPS if prefetch is None else prefetch
        self.pinned = device.type == "cuda"
        self.slots = self.prefetch + 1  # host buffer sets on CUDA: the step being copied and those read ahead
        self.buffers: list[list[tuple[Tensor, Tensor]] | None] = [None] * self.slots
        self.copied: list[torch.cuda.Event | None] = [None] * self.slots  # the copy out of each set, once issued
        self.ahead: deque[tuple[int, Future]] = deque()  # (step, its read), in step order
        self.pool: ThreadPoolExecutor | None = None

    def batches(self, step: int) -> Batches:
        """The batches of ``step`` on the device; the reads of the steps after it start in the background."""
        if self.ahead and self.ahead[0][0] == step:
            host = self.ahead.popleft()[1].result()
        else:  # the first step (or one out of sequence): read now
            self._drain()
            host = self._read(self.rows(step), step % self.slots)
        out = self._to_device(host, step % self.slots)
        following = self.ahead[-1][0] + 1 if self.ahead else step + 1
        while len(self.ahead) < self.prefetch and following < self.stop:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="align-batches")
            plan = self.rows(following)
            self.ahead.append((following, self.pool.submit(self._read, plan, following % self.slots)))
            following += 1
        return out

    def _read(self, plan: Rows, slot: int) -> list[tuple[slice, Tensor, Tensor]]:
        """The host tensors of one step's rows (into buffer set ``slot`` on CUDA, once its last copy is done)."""
        if not self.pinned:
            return [(heads, self.image.gather(i), self.text.gather(t)) for heads, i, t in plan]
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
        sets = self.buffers[slot]
        if sets is None or [(len(a), len(b)) for a, b in sets] != [(len(i), len(t)) for _, i, t in plan]:
            sets = [(torch.empty((len(i), self.image.shape[1]), pin_memory=True),
                     torch.empty((len(t), self.text.shape[1]), pin_memory=True)) for _, i, t in plan]
            self.buffers[slot] = sets
        return [(heads, self.image.gather(i, out=a), self.text.gather(t, out=b))
                for (heads, i, t), (a, b) in zip(plan, sets)]

    def _to_device(self, host: list[tuple[slice, Tensor, Tensor]], slot: int) -> Batches:
        if not self.pinned:
            return [(heads, i.to(self.device), t.to(self.device)) for heads, i, t in host]
        out = [(heads, i.to(self.device, non_blocking=True), t.to(self.device, non_blocking=True))
               for heads, i, t in host]
        event = torch.cuda.Event()
        event.record()
        self.copied[slot] = event
        return out

    def _drain(self) -> None:
        """Wait for the reads in flight and drop them (their errors too: their steps are not taken)."""
        while self.ahead:
            self.ahead.popleft()[1].exception()

    def close(self) -> None:
        """Drop the reads ahead and stop the thread (training ended, or failed)."""
        self._drain()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
