"""The built-in procedural image–caption set (shapes, colours, sizes, positions, relations), needing no network."""
from __future__ import annotations

from pydantic import Field

from align.config import StrictModel


class SyntheticConfig(StrictModel):
    """Sizes per split, seed and drawing size of the synthetic set."""

    train_images: int = Field(800, ge=0)
    val_images: int = Field(200, ge=0)
    test_images: int = Field(300, ge=0)
    seed: int = 0
    image_size: int = Field(128, ge=32)
    captions_per_image: int = Field(5, ge=1, le=5)
