"""Image–caption datasets (edge layer): hub sets through ``datasets``, local folders, CSV/TSV files, synthetic.

``load_split(spec, split)`` returns an ``ImageCaptionSet``: stable image ids, every selected caption (flat) and
the image index of each caption. Images stay lazy: ``load_image(i)`` reads and decodes one image on demand and
raises ``ImageUnreadable`` (the cache skips and counts it, or fails with ``--strict``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
from PIL import Image

from align.config import StrictModel
from align.errors import AlignError
from align.synthetic import SyntheticConfig


class ImageUnreadable(AlignError):
    """A missing, corrupt or unreadable image; the message names the image id and the reason."""


@dataclass
class ImageCaptionSet:
    """Images (lazy) and their captions: ``captions[k]`` describes image ``caption_to_image[k]``."""

    name: str
    image_ids: list[str]
    captions: list[str]
    caption_to_image: np.ndarray  # int64 (N_cap,)
    loader: Callable[[int], Image.Image] = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.image_ids)

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; raises ImageUnreadable naming its id and the reason."""
        raise NotImplementedError

    def captions_of(self, i: int) -> list[str]:
        """The selected captions of image ``i``, in order."""
        raise NotImplementedError


class DatasetSpec(StrictModel):
    """Which image–caption set to load and which part of it (every field except ``streaming`` changes values)."""

    kind: Literal["synthetic", "hub", "imagefolder", "csv"] = "synthetic"
    preset: str | None = None  # "flickr30k" | "mscoco": fill the hub fields (Karpathy test splits)
    # hub
    name: str | None = None  # hub id, or a local folder written by datasets' save_to_disk
    config_name: str | None = None
    hf_split: str | None = None  # the hub split to read (default: the requested split)
    revision: str | None = None
    image_column: str | None = None  # hub default "image"; csv default: first column
    caption_column: str | None = None  # a str column or a list-of-str column; default "caption"/"captions"
    split_column: str | None = None  # keep rows whose split_column value is in split_values[split] (or == split)
    split_values: dict[str, list[str]] | None = None
    streaming: bool = False
    # imagefolder / csv
    path: str | None = None
    delimiter: str | None = None  # csv: auto by extension (.tsv → tab)
    # synthetic
    synthetic: SyntheticConfig = SyntheticConfig()
    # selection
    max_images: int | None = None  # the first N images (deterministic)
    caption_index: int | None = None  # None: all captions; i: only the i-th caption of each image (0 is valid)

    def identity(self, split: str) -> dict[str, Any]:
        """Everything that changes the loaded values for ``split`` (JSON-able, canonical) — the cache key part."""
        raise NotImplementedError


def load_split(spec: DatasetSpec, split: str) -> ImageCaptionSet:
    """The ``split`` of the set described by ``spec`` (synthetic: train | val | test; else what the source has)."""
    raise NotImplementedError
