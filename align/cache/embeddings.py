"""The paired embeddings that training and evaluation take, and their rows read in batches and chunks (no I/O here:
``align.cache.read`` opens the memory maps; a split larger than memory is read a batch or a chunk at a time)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from align.common.errors import AlignError

CHUNK_ROWS = 65_536  # rows read at once when a split streams through a head (128 MiB of 512-d float32)


class EmbeddingRows:
    """An (N, D) matrix of embeddings read by rows, as float32: a cache's memory-mapped ``.npy`` array (float16 or
    float32 on disk, never copied whole) or an array in memory (a tensor or ndarray a caller built), optionally
    through ``rows``, the matrix rows this view shows (a subset such as held-out images, never copied).

    ``gather`` reads any rows in the order given (one batch); ``chunks`` reads consecutive rows a chunk at a time
    (a split through a head); ``to_tensor`` is the one whole float32 copy, for callers whose result is the matrix
    itself (the raw embeddings' retrieval). float16 → float32 is exact, so a batch holds the values a whole
    float32 copy would.
    """

    def __init__(self, array: np.ndarray | Tensor, rows: np.ndarray | None = None) -> None:
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        if array.ndim != 2:
            raise AlignError(f"embeddings must be 2-D, got shape {tuple(array.shape)}")
        self.array = array
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, dims) of what this view shows."""
        return (len(self), int(self.array.shape[1]))

    def __len__(self) -> int:
        return int(self.array.shape[0] if self.rows is None else len(self.rows))

    @property
    def mapped(self) -> bool:
        """Whether the rows are read from a memory map (the page cache holds them, shared by every process)."""
        return isinstance(self.array, np.memmap)

    def _matrix_rows(self, index: np.ndarray) -> np.ndarray:
        return index if self.rows is None else self.rows[index]

    def gather(self, index: Tensor | np.ndarray, out: Tensor | None = None) -> Tensor:
        """Rows ``index`` (in that order, repeats allowed) → a float32 (len(index), D) tensor, written into ``out``
        when given (e.g. a pinned buffer). The rows are read in ascending order (a mostly sequential read of the
        file), then put back in the order asked for."""
        wanted = self._matrix_rows(np.asarray(index, dtype=np.int64))
        order = np.argsort(wanted, kind="stable")
        if out is None:
            out = torch.empty((len(wanted), self.shape[1]), dtype=torch.float32)
        if out.shape != (len(wanted), self.shape[1]) or out.dtype != torch.float32 or out.device.type != "cpu":
            raise AlignError(f"a batch of {len(wanted)} rows needs a float32 host buffer of "
                             f"{(len(wanted), self.shape[1])}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        out.numpy()[order] = self.array[wanted[order]]  # numpy casts float16 → float32 exactly
        return out

    def chunks(self, size: int = 0) -> Iterator[Tensor]:
        """Consecutive rows, ``size`` at a time (default ``CHUNK_ROWS``), each a fresh float32 tensor (the last one
        shorter)."""
        size = size or CHUNK_ROWS
        for lo in range(0, len(self), size):
            hi = min(lo + size, len(self))
            if self.rows is None:  # a slice of the map: one sequential read, copied once into float32
                yield torch.from_numpy(np.array(self.array[lo:hi], dtype=np.float32))
            else:
                yield self.gather(np.arange(lo, hi))

    def to_tensor(self) -> Tensor:
        """The whole matrix as one float32 tensor (a copy, filled a chunk at a time): only where the result is the
        matrix itself, never to read batches from."""
        out = torch.empty(self.shape, dtype=torch.float32)
        lo = 0
        for chunk in self.chunks():
            out[lo:lo + len(chunk)] = chunk
            lo += len(chunk)
        return out

    def subset(self, index: Tensor | np.ndarray) -> EmbeddingRows:
        """The view of rows ``index`` of this one (no copy)."""
        return EmbeddingRows(self.array, self._matrix_rows(np.asarray(index, dtype=np.int64)))


@dataclass
class PairedEmbeddings:
    """Image embeddings (N_img, D_img), caption embeddings (N_cap, D_txt) and each caption's image index.

    A labelled split (zero-shot classification) also has each image's class, the class names and the text
    embeddings of the class prompts, one per zero-shot template: ``class_text`` (C, T, D_txt), kept per template
    because CLIP's prompt ensemble averages them only after the head (``align.zeroshot.class_embeddings``).
    """

    image: EmbeddingRows  # a tensor or ndarray given here is wrapped (rows in memory)
    text: EmbeddingRows
    caption_to_image: torch.Tensor  # int64, shape (N_cap,), values in [0, N_img)
    meta: dict[str, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None  # int64 (N_img,), values in [0, C)
    class_text: torch.Tensor | None = None  # (C, T, D_txt)
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.image, self.text = (x if isinstance(x, EmbeddingRows) else EmbeddingRows(x)
                                 for x in (self.image, self.text))
        if self.caption_to_image.shape != (self.text.shape[0],):
            raise AlignError("caption_to_image must have one entry per caption")
        if self.text.shape[0] and (int(self.caption_to_image.min()) < 0
                                   or int(self.caption_to_image.max()) >= self.image.shape[0]):
            raise AlignError("caption_to_image points outside the image embeddings")
        if (self.labels is None) != (self.class_text is None) or (self.labels is None) != (self.class_names is None):
            raise AlignError("a labelled split needs labels, class_text and class_names together")
        if self.labels is not None:
            assert self.class_text is not None and self.class_names is not None
            if self.labels.shape != (self.image.shape[0],):
                raise AlignError("labels must have one entry per image")
            if self.class_text.ndim != 3 or self.class_text.shape[0] != len(self.class_names) \
                    or self.class_text.shape[2] != self.text.shape[1]:
                raise AlignError(f"class_text must be (classes, templates, {self.text.shape[1]}), got "
                                 f"{tuple(self.class_text.shape)} for {len(self.class_names)} classes")
            if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
                raise AlignError("labels point outside the classes")

    @property
    def labelled(self) -> bool:
        """Whether the split has class labels and prompt embeddings (zero-shot classification is defined)."""
        return self.labels is not None

    @property
    def num_images(self) -> int:
        return len(self.image)

    @property
    def num_captions(self) -> int:
        return len(self.text)

    def first_caption_per_image(self) -> torch.Tensor:
        """Index of the first caption of each image, shape (N_img,) (for one-caption-per-image metrics)."""
        n = self.num_images
        first = torch.full((n,), -1, dtype=torch.long)
        order = torch.arange(self.num_captions - 1, -1, -1)
        first[self.caption_to_image[order]] = order
        if bool((first < 0).any()):
            raise AlignError("some images have no caption")
        return first
