"""A loaded image–caption split (edge layer: its loaders read images from disk or memory on demand).

``ImageCaptionSet`` holds stable image ids, every selected caption (flat) and the image index of each caption;
images stay lazy: ``load_image(i)`` decodes one image and raises ``ImageUnreadable`` (the cache skips and counts
it, or fails with ``--strict``). ``Selection`` applies a spec's ``max_images`` and ``caption_index`` to the rows a
source read and builds the set; ``open_image`` is the one decoder every source's loader goes through, and
``image_files`` lists a plain folder of images (``align search --images``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from align.common.errors import AlignError


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
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able facts about the source (shown in manifests)
    attributes: list[dict[str, Any]] | None = field(default=None, repr=False)  # synthetic: structured content
    hard_negatives: list[tuple[int, int, str]] = field(default_factory=list, repr=False)  # synthetic pairs
    # Labelled sets (mnist): each image's class, the class names and, per class, one prompt per zero-shot template.
    labels: np.ndarray | None = field(default=None, repr=False)  # int64 (N_img,)
    class_names: list[str] | None = None
    prompt_templates: list[str] | None = None
    prompts: list[list[str]] | None = field(default=None, repr=False)  # (C, T) texts, class-major

    def __post_init__(self) -> None:
        self.caption_to_image = np.asarray(self.caption_to_image, dtype=np.int64)
        if len(self.caption_to_image) != len(self.captions):
            raise ValueError("caption_to_image must have one entry per caption")
        order = np.argsort(self.caption_to_image, kind="stable")
        bounds = np.searchsorted(self.caption_to_image[order], np.arange(len(self.image_ids) + 1))
        self._order, self._bounds = order, bounds
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.image_ids),) or self.class_names is None or self.prompts is None:
                raise ValueError("a labelled set needs one label per image, class names and prompts")
            if len(self.prompts) != len(self.class_names) or len({len(p) for p in self.prompts}) != 1:
                raise ValueError("prompts must hold the same number of templates for every class")
            if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.class_names):
                raise ValueError("labels must index class_names")

    def __repr__(self) -> str:
        return f"ImageCaptionSet({self.name!r}, images={len(self.image_ids)}, captions={len(self.captions)})"

    def __len__(self) -> int:
        """Number of images."""
        return len(self.image_ids)

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; raises ImageUnreadable naming its id and the reason."""
        if not 0 <= i < len(self.image_ids):
            raise IndexError(f"image index {i} out of range for {len(self.image_ids)} images")
        return self.loader(i)

    def captions_of(self, i: int) -> list[str]:
        """The selected captions of image ``i``, in order."""
        return [self.captions[k] for k in self._order[self._bounds[i]:self._bounds[i + 1]]]


@dataclass(frozen=True)
class Selection:
    """Which part of a split to keep: the first ``max_images`` images, and all captions or only the
    ``caption_index``-th of each."""

    max_images: int | None = None
    caption_index: int | None = None

    def apply(self, name: str, ids: list[str], caption_lists: list[list[str]], loader: Any, meta: dict[str, Any],
              **extra: Any) -> ImageCaptionSet:
        """Apply max_images and caption_index to a source's rows, then flatten them into an ImageCaptionSet
        (``extra``: the set's optional fields, e.g. labels, which max_images cuts too)."""
        if self.max_images is not None:
            ids, caption_lists = ids[:self.max_images], caption_lists[:self.max_images]
            if extra.get("labels") is not None:
                extra["labels"] = extra["labels"][:self.max_images]
        if self.caption_index is not None:
            k = self.caption_index
            for image_id, caps in zip(ids, caption_lists):
                if len(caps) <= k:
                    raise AlignError(f"{name}: image {image_id} has {len(caps)} caption(s); caption_index={k} needs "
                                     f"at least {k + 1} (use a smaller caption_index or none for all captions)")
            caption_lists = [[caps[k]] for caps in caption_lists]
        captions = [c for caps in caption_lists for c in caps]
        c2i = np.repeat(np.arange(len(ids), dtype=np.int64), [len(c) for c in caption_lists])
        meta = {**meta, "images": len(ids), "captions": len(captions)}
        return ImageCaptionSet(name, list(ids), captions, c2i, loader, meta, **extra)


def open_image(source: str | Path | bytes, image_id: str) -> Image.Image:
    """Decode one image fully (so truncated files fail here) as RGB, EXIF orientation applied."""
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
        with handle, Image.open(handle) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageUnreadable(f"image {image_id}: file not found: {source}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageUnreadable(f"image {image_id}: cannot decode ({type(exc).__name__}: {exc})") from None


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (every extension PIL reads), sorted by name; AlignError (one line)
    when it is no folder or holds none."""
    path = Path(folder)
    if not path.is_dir():
        raise AlignError(f"{path} is not a folder of images: give a folder that holds image files")
    suffixes = {s.lower() for s in Image.registered_extensions()}
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not found:
        raise AlignError(f"{path} holds no image files (looked for {', '.join(sorted(suffixes)[:6])}, ...): give a "
                         "folder of images")
    return found
