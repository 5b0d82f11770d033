"""What names a cache entry (edge layer): the embed config, the identity a key hashes, the key and its folder.

Layout of ``<cache_root>/<key>/``:
    image.npy, text.npy          (N_img, D_img) and (N_cap, D_txt), float16 or float32, memory-mappable
    caption_to_image.npy         (N_cap,) int64, each caption's row in image.npy
    image_rows.npy, caption_rows.npy   (int64) each row's index in the source dataset (skipped items leave gaps)
    labels.npy, class_text.npy   labelled sets only (mnist): (N_img,) int64 class of each image, and the text
                                 embeddings of the zero-shot prompts, (C·T, D_txt), class-major, one row per
                                 class and template; the manifest's ``classes`` names the classes and templates
    manifest.json                written last: spec, versions, counts, shapes, dtypes, sha256 checksums,
                                 skipped items with reasons, timing
    verified.json                what the last load verified (per file: sha256, size, mtime, ctime, inode)
    .lock                        held (``align.common.locks.exclusive``) while ``align embed`` writes the folder
    work/                        shards of a run in progress (removed when the cache is complete)

The key hashes everything that changes the values (dataset identity of the split, encoder specs and weight
identities, storage dtype, normalisation) and nothing that does not (batch size, device, workers, shard size):
encoders run on fixed micro-batches of ``ENCODE_ROWS`` rows cut at multiples of the global row index. Caches
written before labelled sets existed hold the five arrays only; they load as before, without labels.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from align.common import paths
from align.common.config import Integer, StrictModel, apply_overrides, parse_override, read_config, validate
from align.common.errors import AlignError
from align.data.datasets import DatasetSpec
from align.data.encoder_spec import EncoderSpec

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
VERIFIED = "verified.json"
WORK = "work"
ARRAYS = ("image.npy", "text.npy", "caption_to_image.npy", "image_rows.npy", "caption_rows.npy")
LABEL_ARRAYS = ("labels.npy", "class_text.npy")  # labelled sets only
# Rows per encoder forward pass. A row's embedding depends (by ~1e-6) on which rows share its batch, so batches
# are fixed slices [k·ENCODE_ROWS, (k+1)·ENCODE_ROWS) of the global row index; changing this changes the stored
# bytes, so it would need a new CACHE_FORMAT.
ENCODE_ROWS = 64


class EmbedConfig(StrictModel):
    """What to embed (dataset, splits), with which encoders, how to store it, and run settings."""

    dataset: DatasetSpec
    splits: list[str] = ["train", "val", "test"]
    image_encoder: EncoderSpec
    text_encoder: EncoderSpec
    storage_dtype: Literal["float16", "float32"] = "float32"
    normalize: bool = False
    # run settings: they do not change the values, so they are not part of the key
    batch_size: Integer = Field(64, ge=1)  # images read per loading step; encoders always run ENCODE_ROWS-row batches
    device: str = "auto"
    num_workers: Integer = Field(0, ge=0)
    shard_size: Integer = Field(512, ge=1)
    cache_root: str = Field(default_factory=lambda: str(paths.cache_dir()))  # not in the key: moving it keeps keys
    strict: bool = False

    @model_validator(mode="after")
    def _mnist_size_from_encoder(self) -> "EmbedConfig":
        """An mnist set left without an image size is upscaled to the image encoder's input size (224 when the
        spec leaves it to the model), so the 28 px digits are resized once, by the recorded rule."""
        mnist = self.dataset.mnist
        if self.dataset.kind == "mnist" and mnist.image_size is None:
            size = self.image_encoder.image_size or 224
            self.dataset = self.dataset.model_copy(update={"mnist": mnist.model_copy(update={"image_size": size})})
        return self

    @model_validator(mode="after")
    def _splits_exist(self) -> "EmbedConfig":
        """Each split of a built-in set exists and has images: an empty one would fail only at embed, after a
        study has written its config and lock."""
        for split in self.splits:
            try:
                size = self.dataset.built_in_size(split)
            except AlignError as exc:
                raise ValueError(f"splits: {exc}") from None
            if size is not None and size[0] == 0:
                raise ValueError(f"split {split!r} of the {self.dataset.kind} set has no images (dataset.{size[1]} is "
                                 f"0): give it a size, or leave {split!r} out of splits")
        return self


def load_embed_config(path: str | Path, overrides: list[str] | None = None) -> EmbedConfig:
    """An EmbedConfig from a YAML file that is one, or that holds one under ``data:`` (train/compare configs).

    A ``data_from:`` reference counts as the ``data:`` section it names. ``--set`` overrides use the file's own
    key paths (``batch_size=32``, or ``data.batch_size=32``).
    """
    raw = read_config(path)
    if isinstance(raw.get("data"), dict):
        for text in overrides or []:
            if parse_override(text)[0][0] != "data":  # would land outside the embed settings, unseen
                raise AlignError(f"--set {text}: {path} keeps the embed settings under data: use --set data.{text}")
        return validate(EmbedConfig, apply_overrides(raw, overrides)["data"], source=f"{path} (data section)")
    raw = apply_overrides(raw, overrides)
    return validate(EmbedConfig, raw, source=str(path))


def cache_identity(cfg: EmbedConfig, split: str) -> dict[str, Any]:
    """Everything that determines the cached values of ``split`` (what the key hashes)."""
    return {
        "format": CACHE_FORMAT,
        "split": split,
        "dataset": cfg.dataset.identity(split),
        "image_encoder": cfg.image_encoder.identity(),
        "text_encoder": cfg.text_encoder.identity(),
        "storage_dtype": cfg.storage_dtype,
        "normalize": cfg.normalize,
    }


KEY_NAME = re.compile(r"[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[0-9a-f]{16}")  # what cache_key returns: kind-split-digest


def cache_key(cfg: EmbedConfig, split: str) -> str:
    """``<dataset kind>-<split>-<16 hex digits of sha256 over cache_identity>``."""
    payload = json.dumps(cache_identity(cfg, split), sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return f"{_slug(str(cfg.dataset.kind))}-{_slug(split)}-{digest}"


def cache_path(cfg: EmbedConfig, split: str) -> Path:
    return Path(cfg.cache_root) / cache_key(cfg, split)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"
