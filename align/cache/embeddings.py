"""The in-memory paired embeddings that training and evaluation take (no I/O here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from align.common.errors import AlignError


@dataclass
class PairedEmbeddings:
    """Image embeddings (N_img, D_img), caption embeddings (N_cap, D_txt) and each caption's image index.

    A labelled split (zero-shot classification) also has each image's class, the class names and the text
    embeddings of the class prompts, one per zero-shot template: ``class_text`` (C, T, D_txt), kept per template
    because CLIP's prompt ensemble averages them only after the head (``align.zeroshot.class_embeddings``).
    """

    image: torch.Tensor
    text: torch.Tensor
    caption_to_image: torch.Tensor  # int64, shape (N_cap,), values in [0, N_img)
    meta: dict[str, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None  # int64 (N_img,), values in [0, C)
    class_text: torch.Tensor | None = None  # (C, T, D_txt)
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.text.ndim != 2:
            raise AlignError(f"embeddings must be 2-D, got image {tuple(self.image.shape)}, text {tuple(self.text.shape)}")
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
