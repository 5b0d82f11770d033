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

from align.common.errors import AlignError
from align.train.config import TrainConfig


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def uniform_loss(kind: str, batch_size: int) -> float:
    """The loss when every logit is equal (a collapsed scale): CLIP ln B; SigLIP its best constant-logit value."""
    b = float(batch_size)
    if kind == "clip":
        return math.log(b)
    # SigLIP with all logits = c: −(log σ(c) + (B−1) log σ(−c)), minimised at σ(c) = 1/B.
    return -(math.log(1.0 / b) + (b - 1.0) * math.log(1.0 - 1.0 / b))


class Sampler:
    """Batches of (image rows, caption rows) for step s: a permutation of images per epoch, one caption each."""

    def __init__(self, caption_to_image: Tensor, num_images: int, batch_size: int, seed: int,
                 device: torch.device) -> None:
        c2i = caption_to_image.cpu()
        counts = torch.bincount(c2i, minlength=num_images)
        self.images = torch.nonzero(counts > 0).flatten()  # images without a caption never train
        self.counts = counts[self.images]
        self.order = torch.argsort(c2i, stable=True)  # captions grouped by image
        starts = torch.cumsum(counts, 0) - counts
        self.starts = starts[self.images]
        self.batch_size, self.seed, self.device = batch_size, seed, device
        if len(self.images) < batch_size:
            raise AlignError(f"schedule.batch_size={batch_size} exceeds the {len(self.images)} training images "
                             f"with captions: use --set schedule.batch_size={max(2, len(self.images))} or less")
        self.per_epoch = len(self.images) // batch_size  # the incomplete last batch is dropped
        self._epoch, self._rows = -1, (torch.empty(0), torch.empty(0))

    def _epoch_rows(self, epoch: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.images), generator=gen)
        pick = torch.minimum((torch.rand(len(self.images), generator=gen) * self.counts[perm]).long(),
                             self.counts[perm] - 1)
        caption = self.order[self.starts[perm] + pick]
        return self.images[perm].to(self.device), caption.to(self.device)

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
            out.append((self.images[rows].to(self.device), self.order[self.starts[rows]].to(self.device)))
        return out


def load_data(cfg: TrainConfig, splits: list[str]) -> dict[str, Any]:
    """The cached PairedEmbeddings of each split (AlignError naming the command to build a missing cache)."""
    from align.cache.read import load_cached_split

    return {split: load_cached_split(cfg.data, split) for split in dict.fromkeys(splits)}


def holdout_split(paired: Any, n: int) -> tuple[Any, Any]:
    """(rest, held) of a PairedEmbeddings: ``n`` images (fixed pseudo-random choice) with all their captions held out."""
    from align.cache.embeddings import PairedEmbeddings

    if not 0 < n < paired.num_images:
        raise AlignError(f"eval.holdout_images={n} must be between 1 and the {paired.num_images - 1} training images")
    order = torch.randperm(paired.num_images, generator=torch.Generator().manual_seed(0))  # same for every seed

    def subset(images: Tensor, name: str) -> PairedEmbeddings:
        images = images.sort().values
        new_index = torch.full((paired.num_images,), -1, dtype=torch.long)
        new_index[images] = torch.arange(len(images))
        keep = new_index[paired.caption_to_image] >= 0
        labelled = {} if paired.labels is None else {
            "labels": paired.labels[images], "class_text": paired.class_text, "class_names": paired.class_names}
        return PairedEmbeddings(paired.image[images], paired.text[keep], new_index[paired.caption_to_image[keep]],
                                dict(paired.meta, split=name), **labelled)

    return subset(order[n:], "train"), subset(order[:n], "train-holdout")


def resolve_dims(cfg: TrainConfig, paired: Any) -> TrainConfig:
    """``cfg`` with image_dim/text_dim filled from the cache; AlignError if they were set and disagree."""
    dims = {"image_dim": int(paired.image.shape[1]), "text_dim": int(paired.text.shape[1])}
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


def prepare_data(cfg: TrainConfig) -> tuple[TrainConfig, RunData]:
    """Load and check the splits ``cfg`` needs → (cfg with embedding dims filled in, the splits in their roles)."""
    holdout = cfg.eval.holdout_images
    splits = ["train"] + ([] if holdout else [cfg.eval.split]) + ([cfg.eval.test_split] if cfg.eval.test_split else [])
    missing = [s for s in splits if s not in cfg.data.splits]
    if missing:
        raise AlignError(f"split(s) {', '.join(missing)} are not in data.splits ({', '.join(cfg.data.splits)}): "
                         "add them, change eval.split / eval.test_split, or validate on eval.holdout_images")
    loaded = load_data(cfg, splits)
    cfg = resolve_dims(cfg, loaded["train"])
    for split in splits[1:]:
        resolve_dims(cfg, loaded[split])
    data = RunData(train=loaded["train"], val=loaded.get(cfg.eval.split),
                   test=loaded[cfg.eval.test_split] if cfg.eval.test_split else None)
    if holdout:
        data.train, data.val = holdout_split(loaded["train"], holdout)
    if cfg.eval.select.startswith("zeroshot") and not (data.val is not None and data.val.labelled):
        where = "the held-out training images have" if holdout else f"split {cfg.eval.split!r} has"
        raise AlignError(f"eval.select={cfg.eval.select} needs class labels, but {where} none (dataset kind "
                         f"{cfg.data.dataset.kind!r}; labelled: mnist): use --set eval.select=mean_R@1")
    for role, paired in (("validation", data.val), ("test", data.test)):
        if paired is not None and cfg.eval.knn_k >= paired.num_images:
            raise AlignError(f"eval.knn_k={cfg.eval.knn_k} needs more than {cfg.eval.knn_k} images but the {role} "
                             f"split has {paired.num_images}: use --set eval.knn_k={max(1, paired.num_images - 1)} "
                             "or less")
    return cfg, data
