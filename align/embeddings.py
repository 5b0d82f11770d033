"""The in-memory paired embeddings that training and evaluation take (no I/O here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from align.errors import AlignError


@dataclass
class PairedEmbeddings:
    """Image embeddings (N_img, D_img), caption embeddings (N_cap, D_txt) and each caption's image index."""

    image: torch.Tensor
    text: torch.Tensor
    caption_to_image: torch.Tensor  # int64, shape (N_cap,), values in [0, N_img)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.text.ndim != 2:
            raise AlignError(f"embeddings must be 2-D, got image {tuple(self.image.shape)}, text {tuple(self.text.shape)}")
        if self.caption_to_image.shape != (self.text.shape[0],):
            raise AlignError("caption_to_image must have one entry per caption")
        if self.text.shape[0] and (int(self.caption_to_image.min()) < 0
                                   or int(self.caption_to_image.max()) >= self.image.shape[0]):
            raise AlignError("caption_to_image points outside the image embeddings")

    @property
    def num_images(self) -> int:
        return int(self.image.shape[0])

    @property
    def num_captions(self) -> int:
        return int(self.text.shape[0])

    def first_caption_per_image(self) -> torch.Tensor:
        """Index of the first caption of each image, shape (N_img,) (for one-caption-per-image metrics)."""
        n = self.num_images
        first = torch.full((n,), -1, dtype=torch.long)
        order = torch.arange(self.num_captions - 1, -1, -1)
        first[self.caption_to_image[order]] = order
        if bool((first < 0).any()):
            raise AlignError("some images have no caption")
        return first
