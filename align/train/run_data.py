"""What a run trains and is measured on (orchestration): the splits in their roles (train, validation,
test, or a holdout of training images), the embedding dims, the batch sampler and the learning-rate schedule.

Determinism: the data order of epoch e comes from a generator seeded by (seed, e), so it never depends on how
often a run was interrupted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from align.cache.embeddings import PairedEmbeddings
from align.cache.read import load_cached_split, split_manifest
from align.common.errors import AlignError
from align.train.config import TrainConfig


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


WINDOW_BLOCKS = 4  # the blocks order shuffles rows within windows of this many consecutive blocks
EPOCH_CHUNK = 1 << 16  # images an epoch's order is completed for at a time


def block_order(n: int, block_rows: int, gen: torch.Generator) -> Tensor:
    """A permutation of 0..n-1 read mostly in sequence: positions cut into contiguous blocks of ``block_rows``
    (the last one shorter), the blocks shuffled, then rows shuffled within each window of ``WINDOW_BLOCKS``
    consecutive blocks of that order (as webdataset-style loaders shuffle shards, then a buffer of samples). A split
    of one block is the random order: the same permutation, bit for bit."""
    if n <= block_rows:
        return torch.randperm(n, generator=gen)
    blocks = math.ceil(n / block_rows)
    starts = torch.randperm(blocks, generator=gen) * block_rows
    out = []
    for w in range(0, blocks, WINDOW_BLOCKS):
        window = torch.cat([torch.arange(a, min(a + block_rows, n)) for a in starts[w:w + WINDOW_BLOCKS].tolist()])
        out.append(window[torch.randperm(len(window), generator=gen)])
    return torch.cat(out)


class Sampler:
    """Batches of (image rows, caption rows) for step s: the images of each epoch in an order drawn from (seed,
    epoch), one random caption each.

    ``order`` "random": a uniform permutation of the images per epoch. "blocks": ``block_order`` over the images
    in row order, so that a batch's rows lie in a few contiguous stretches of the cache (a cache larger than memory
    is then read mostly sequentially), at the price of batches drawn from a window of ``WINDOW_BLOCKS`` ×
    ``block_rows`` neighbouring images rather than from the whole set."""

    def __init__(self, caption_to_image: Tensor, num_images: int, batch_size: int, seed: int,
                 device: torch.device, order: str = "random", block_rows: int | None = None) -> None:
        c2i = caption_to_image.cpu()
        # Indices kept in int32 where they fit: a few int64 arrays per row are most of what a run of millions of
        # rows holds besides its head (the embeddings stay in the cache's maps). The values are the same.
        index = torch.int32 if max(num_images, len(c2i)) < 2 ** 31 else torch.int64
        counts = torch.bincount(c2i, minlength=num_images)
        has = counts > 0  # images without a caption never train
        self.images = torch.nonzero(has).flatten().to(index)
        self.starts = (torch.cumsum(counts, 0) - counts)[has].to(index)
        self.counts = counts[has].to(index)
        del counts, has
        self.order = torch.argsort(c2i, stable=True).to(index)  # captions grouped by image
        self.batch_size, self.seed, self.device = batch_size, seed, device
        if order not in ("random", "blocks") or (order == "blocks" and not block_rows):
            raise ValueError(f"order {order!r} with block_rows {block_rows}: random, or blocks of block_rows >= 1")
        self.image_order, self.block_rows = order, block_rows  # schedule.order and schedule.block_rows
        if len(self.images) < batch_size:
            raise AlignError(f"schedule.batch_size={batch_size} exceeds the {len(self.images)} training images "
                             f"with captions: use --set schedule.batch_size={max(2, len(self.images))} or less")
        self.per_epoch = len(self.images) // batch_size  # the incomplete last batch is dropped
        self._epoch, self._rows = -1, (torch.empty(0), torch.empty(0))

    def _epoch_rows(self, epoch: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.images)
        perm = torch.randperm(n, generator=gen) if self.image_order == "random" else \
            block_order(n, self.block_rows, gen)
        uniform = torch.rand(n, generator=gen)
        images, captions = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        for lo in range(0, n, EPOCH_CHUNK):  # in pieces: no temporaries of the epoch's length
            part = perm[lo:lo + EPOCH_CHUNK]
            counts = self.counts[part]  # a random caption of each image: floor(u · count), below count
            pick = torch.minimum((uniform[lo:lo + EPOCH_CHUNK] * counts).long(), counts - 1)
            captions[lo:lo + EPOCH_CHUNK] = self.order[self.starts[part] + pick]
            images[lo:lo + EPOCH_CHUNK] = self.images[part]
        return images.to(self.device), captions.to(self.device)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(B,) image row indices and (B,) caption row indices, on the device, for 0-based step ``step``."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._rows = epoch, self._epoch_rows(epoch)
        lo, hi = pos * self.batch_size, (pos + 1) * self.batch_size
        return self._rows[0][lo:hi], self._rows[1][lo:hi]

    def fixed_batches(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """``n`` fixed batches (first caption of each image) for sharpness: independent of the training order."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983)
        perm = torch.randperm(len(self.images), generator=gen)
        n = max(1, min(n, self.per_epoch))
        out = []
        for i in range(n):
            rows = perm[i * self.batch_size:(i + 1) * self.batch_size]
            out.append((self.images[rows].long().to(self.device), self.order[self.starts[rows]].long().to(self.device)))
        return out


def load_data(cfg: TrainConfig, splits: list[str]) -> dict[str, PairedEmbeddings]:
    """The cached PairedEmbeddings of each split (AlignError naming the command to build a missing cache)."""
    return {split: load_cached_split(cfg.data, split) for split in dict.fromkeys(splits)}


def holdout_split(paired: PairedEmbeddings, n: int) -> tuple[PairedEmbeddings, PairedEmbeddings]:
    """(rest, held): ``n`` images of a PairedEmbeddings (a fixed pseudo-random choice), held out with their captions."""
    _check_holdout(n, paired.num_images)
    order = torch.randperm(paired.num_images, generator=torch.Generator().manual_seed(0))  # same for every seed

    def subset(images: Tensor, name: str) -> PairedEmbeddings:
        images = images.sort().values
        new_index = torch.full((paired.num_images,), -1, dtype=torch.long)
        new_index[images] = torch.arange(len(images))
        keep = new_index[paired.caption_to_image] >= 0
        labelled = {} if paired.labels is None else {
            "labels": paired.labels[images], "class_text": paired.class_text, "class_names": paired.class_names}
        return PairedEmbeddings(paired.image.subset(images), paired.text.subset(torch.nonzero(keep).flatten()),
                                new_index[paired.caption_to_image[keep]], dict(paired.meta, split=name), **labelled)

    return subset(order[n:], "train"), subset(order[:n], "train-holdout")


def _check_holdout(n: int, images: int) -> None:
    if not 0 < n < images:
        raise AlignError(f"eval.holdout_images={n} must be between 1 and the {images - 1} training images")


def resolve_dims(cfg: TrainConfig, paired: PairedEmbeddings) -> TrainConfig:
    """``cfg`` with image_dim/text_dim filled from the cache; AlignError if they were set and disagree."""
    return _with_dims(cfg, SplitShape.of(paired))


def _with_dims(cfg: TrainConfig, shape: SplitShape) -> TrainConfig:
    dims = {"image_dim": shape.image_dim, "text_dim": shape.text_dim}
    for key, actual in dims.items():
        expected = getattr(cfg, key)
        if expected is not None and expected != actual:
            raise AlignError(f"{key}={expected} in the config but the cached {cfg.data.dataset.kind} embeddings have "
                             f"{key.split('_')[0]} dimension {actual}: fix {key} (or drop it) or use the matching cache")
    return cfg.model_copy(update=dims)


@dataclass
class RunData:
    """The splits in their roles: what trains, what picks the best head (val), what reports it (test)."""

    train: Any
    val: Any | None
    test: Any | None


@dataclass(frozen=True)
class SplitShape:
    """What the checks of the splits' roles need of a split: its counts, dims, and whether it has class labels;
    read from a cache's manifest (a plan, nothing loaded) or from loaded embeddings (a run)."""

    images: int
    captions: int
    image_dim: int
    text_dim: int
    labelled: bool

    @classmethod
    def of_manifest(cls, manifest: dict[str, Any]) -> SplitShape:
        return cls(manifest["counts"]["images"], manifest["counts"]["captions"], manifest["dims"]["image"],
                   manifest["dims"]["text"], "labels.npy" in manifest["files"])

    @classmethod
    def of(cls, paired: PairedEmbeddings) -> SplitShape:
        return cls(paired.num_images, paired.num_captions, int(paired.image.shape[1]), int(paired.text.shape[1]),
                   paired.labelled)


def role_splits(cfg: TrainConfig) -> list[str]:
    """The splits ``cfg`` trains, validates and tests on, train first; AlignError when one is not embedded."""
    holdout = cfg.eval.holdout_images
    splits = ["train"] + ([] if holdout else [cfg.eval.split]) + ([cfg.eval.test_split] if cfg.eval.test_split else [])
    missing = [s for s in splits if s not in cfg.data.splits]
    if missing:
        raise AlignError(f"split(s) {', '.join(missing)} are not in data.splits ({', '.join(cfg.data.splits)}): "
                         "add them, change eval.split / eval.test_split, or validate on eval.holdout_images")
    return list(dict.fromkeys(splits))


def check_roles(cfg: TrainConfig, shapes: dict[str, SplitShape]) -> tuple[TrainConfig, int]:
    """Check that the splits (``shapes`` of every ``role_splits``) fit their roles → (``cfg`` with the embedding
    dims filled in, the validation rows: images and captions; for held-out training images their captions are
    counted at the training split's mean per image). AlignError, one line, naming the key to change."""
    train, ev = shapes["train"], cfg.eval
    cfg = _with_dims(cfg, train)
    for split in role_splits(cfg)[1:]:
        _with_dims(cfg, shapes[split])
    if ev.holdout_images:
        _check_holdout(ev.holdout_images, train.images)
        val = SplitShape(ev.holdout_images, math.ceil(ev.holdout_images * train.captions / max(1, train.images)),
                         train.image_dim, train.text_dim, train.labelled)
    else:
        val = shapes[ev.split]
    if ev.select.startswith("zeroshot") and not val.labelled:
        where = "the held-out training images have" if ev.holdout_images else f"split {ev.split!r} has"
        raise AlignError(f"eval.select={ev.select} needs class labels, but {where} none (dataset kind "
                         f"{cfg.data.dataset.kind!r}; labelled: mnist): use --set eval.select=mean_R@1")
    for role, shape in (("validation", val), ("test", shapes.get(ev.test_split) if ev.test_split else None)):
        if shape is not None and ev.knn_k >= shape.images:
            raise AlignError(f"eval.knn_k={ev.knn_k} needs more than {ev.knn_k} images but the {role} split has "
                             f"{shape.images}: use --set eval.knn_k={max(1, shape.images - 1)} or less")
    return cfg, val.images + val.captions


def planned_roles(cfg: TrainConfig) -> tuple[TrainConfig, int]:
    """``check_roles`` from the caches' manifests alone (no array is read): what a study's parent process plans
    its packs with, before anything is written → (``cfg`` with its dims, the validation rows)."""
    return check_roles(cfg, {s: SplitShape.of_manifest(split_manifest(cfg.data, s)) for s in role_splits(cfg)})


def prepare_data(cfg: TrainConfig) -> tuple[TrainConfig, RunData]:
    """Load and check the splits ``cfg`` needs → (cfg with embedding dims filled in, the splits in their roles)."""
    loaded = load_data(cfg, role_splits(cfg))
    cfg, _ = check_roles(cfg, {split: SplitShape.of(paired) for split, paired in loaded.items()})
    holdout = cfg.eval.holdout_images
    data = RunData(train=loaded["train"], val=None if holdout else loaded[cfg.eval.split],
                   test=loaded[cfg.eval.test_split] if cfg.eval.test_split else None)
    if holdout:
        data.train, data.val = holdout_split(loaded["train"], holdout)
    return cfg, data
