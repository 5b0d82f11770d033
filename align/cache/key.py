"""What names a cache entry (edge layer): the embed config, the identity a key hashes, the key and its folder; and
the ``data:`` section of a train or study config in its two forms, the embed settings (``EmbedConfig``) or a cache
named per split (``CachesConfig``: ``caches: {train: NAME, val: NAME, test: NAME}``), with how a split's folder is
found from either (``split_folder``).

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
    .lock                        held (``align.common.locks.exclusive``) while ``align embed`` (or ``align cache
                                 import``) writes the folder
    work/                        shards of a run in progress (removed when the cache is complete)

``align cache import`` writes the same layout from embeddings made elsewhere, at ``<NAME>-<split>-<digest>``
(``imported_key``), its manifest's dataset kind ``imported``.

The key hashes everything that changes the values (dataset identity of the split, encoder specs and weight
identities, storage dtype, normalisation) and nothing that does not (batch size, device, workers, shard size):
encoders run on fixed micro-batches of ``ENCODE_ROWS`` rows cut at multiples of the global row index. Caches
written before labelled sets existed hold the five arrays only; they load as before, without labels.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator

from align.common import paths
from align.common.config import Integer, StrictModel, apply_overrides, parse_override, read_config, validate
from align.common.errors import AlignError, shorten
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
        if "caches" in raw["data"]:
            raise AlignError(f"{path}: its data: section names finished caches (data.caches), so there is nothing to "
                             "embed: `align cache import` makes imported caches, `align embed` an embed config's")
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
    return f"{_slug(str(cfg.dataset.kind))}-{_slug(split)}-{_digest(cache_identity(cfg, split))}"


def imported_key(name: str, split: str, identity: dict[str, Any]) -> str:
    """The key of an imported cache: ``<name>-<split>-<16 hex digits of sha256 over identity>`` (what determines its
    bytes: the arrays' checksums, the encoder names, the split; ``align.cache.importing``)."""
    return f"{name}-{split}-{_digest(identity)}"


def _digest(identity: dict[str, Any]) -> str:
    payload = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_path(cfg: EmbedConfig, split: str) -> Path:
    return Path(cfg.cache_root) / cache_key(cfg, split)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"


# -- the data: section of a train or study config: the embed settings, or a cache per split --------------------

IMPORTED = "imported"  # the dataset kind of an imported cache's manifest, and what a caches section reads as
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]{0,63}")  # a name of imported caches, a split: one part of a key


@dataclass(frozen=True)
class CachesSource:
    """What a caches section answers where code reads an embed section's ``dataset.kind``: the data is finished
    caches, made by ``align cache import`` (or by any embed)."""

    kind: str = IMPORTED


class CachesConfig(StrictModel):
    """The ``data:`` section that names a finished cache per split: ``caches: {train: NAME, val: NAME, test: NAME}``.

    An entry is a folder path (it has a ``/``); else, under ``cache_root``, a cache key or a unique key prefix (it
    has a ``-``); else the ``--name`` of ``align cache import`` (the folder ``<NAME>-<split>-<digest>`` of the
    entry's own split).
    Like an embed section it has ``splits`` (those it names) and ``dataset.kind`` (``imported``)."""

    caches: dict[str, str]
    cache_root: str = Field(default_factory=lambda: str(paths.cache_dir()))  # as the embed section's

    @field_validator("caches")
    @classmethod
    def _entries(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name a cache per split, e.g. caches: {train: NAME, val: NAME, test: NAME}")
        for split, entry in value.items():
            if not PLAIN_NAME.fullmatch(split):
                raise ValueError(f"split {shorten(repr(split), 40)} must be a plain name (letters, digits, '_', '.')")
            if not entry.strip():
                raise ValueError(f"caches.{split} is empty: give a cache's name, key, key prefix or folder")
        return value

    @property
    def splits(self) -> list[str]:
        return list(self.caches)

    @property
    def dataset(self) -> CachesSource:
        return CachesSource()

    def folder(self, split: str) -> Path:
        """The finished cache that ``split``'s entry names; AlignError (one line) when it names none or several."""
        entry, root = self.caches.get(split), Path(self.cache_root)
        where = f"data.caches.{split}"
        if entry is None:
            raise AlignError(f"data.caches names no cache for split {split!r}: add {where}: NAME")
        if "/" in entry:
            path = Path(entry).expanduser()
            if not (path / MANIFEST).is_file():
                raise AlignError(shorten(f"{where}: {entry} is no finished cache (no {MANIFEST} there): give a cache "
                                         "folder, or make one with `align cache import`"))
            return path
        caches = _finished_caches(root)
        if "-" in entry:  # a key or a key prefix
            named = [p for p in caches if p.name.startswith(entry)]
        else:  # a name: the cache of this split imported under it (a NAME alone never matches another name)
            named = [p for p in caches if p.name.startswith(f"{entry}-{split}-")]
        other_splits = sorted(p.name.split("-")[1] for p in caches if p.name.split("-")[0] == entry)
        if len(named) == 1:
            return named[0]
        if named:
            listed = ", ".join(p.name for p in named[:3])
            raise AlignError(shorten(f"{where}: {entry!r} matches {len(named)} caches under {root} ({listed}): "
                                     "give its key"))
        if "-" in entry:
            raise AlignError(shorten(f"{where}: no cache whose key starts with {entry!r} under {root}: see "
                                     f"`align cache ls --root {root}`"))
        have = f" ({entry} has split {', '.join(other_splits)} only)" if other_splits else ""
        raise AlignError(shorten(f"{where}: no cache {entry!r} for split {split!r} under {root}{have}: make it with "
                                 f"`align cache import SOURCE --name {entry} --split {split} --root {root}`, or see "
                                 f"`align cache ls --root {root}`"))


def _finished_caches(root: Path) -> list[Path]:
    """The folders under ``root`` named like a cache key that hold a manifest (finished caches, sound or not)."""
    try:
        names = sorted(os.listdir(root))
    except OSError:  # no such root (yet), or one that cannot be listed: no cache there
        return []
    return [root / n for n in names if KEY_NAME.fullmatch(n) and (root / n / MANIFEST).is_file()]


def _one_form(value: Any) -> Any:
    """A data section holds either form, whole: caches and embed settings together (or neither) are refused."""
    if not isinstance(value, dict):
        return value
    embed_keys = sorted(k for k in value if k in EmbedConfig.model_fields and k != "cache_root")
    if "caches" in value and embed_keys:
        raise ValueError(f"give either caches: (finished caches by name, key or folder) or the embed settings "
                         f"({', '.join(embed_keys)}, ...), not both")
    if "caches" not in value and "dataset" not in value:
        raise ValueError("give the embed settings (dataset, image_encoder, text_encoder) or caches: {train: NAME, "
                         "val: NAME, test: NAME} (caches made by `align cache import`, or any cache by key or folder)")
    return value


def _form(value: Any) -> str:
    if isinstance(value, dict):
        return "caches" if "caches" in value else "embed"
    return "caches" if isinstance(value, CachesConfig) else "embed"


# The data: section of a train or study config: the embed settings, or finished caches named per split.
DataSection = Annotated[Union[Annotated[EmbedConfig, Tag("embed")], Annotated[CachesConfig, Tag("caches")]],
                        Discriminator(_form), BeforeValidator(_one_form)]


def split_folder(data: EmbedConfig | CachesConfig, split: str) -> Path:
    """The cache folder of ``split`` in a data section of either form: an embed config's key under its cache_root,
    or the cache its caches entry names (``CachesConfig.folder``: AlignError when there is none)."""
    return data.folder(split) if isinstance(data, CachesConfig) else cache_path(data, split)


def stored_rows(array: np.ndarray, cfg: EmbedConfig, tower: str, split: str) -> np.ndarray:
    """Encoder rows as a cache of ``cfg`` stores them: optional L2 normalisation (in float32), then the storage
    dtype; overflow to inf is an error. ``align embed`` writes these, ``align.load_run`` embeds new rows alike."""
    array = array.astype(np.float32, copy=False)
    if cfg.normalize:
        array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
    stored = array.astype(cfg.storage_dtype)
    if not np.isfinite(stored).all():
        raise AlignError(f"{tower} embeddings of split {split!r} overflow {cfg.storage_dtype}: "
                         f"use storage_dtype: float32 or normalize: true")
    return stored
