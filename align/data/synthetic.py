"""The built-in procedural image–caption set: shapes, colours, sizes, positions and relations, no network needed.

Each split is planned from ``(seed, split)`` alone: a sequence of structured contents (one object at a named
position, or two objects related by "left of" / "above"), unique within the split so that a perfect model can
reach 100% recall (identical content across images capped the prototype at ≈94% R@1, see
docs/benchmark-notes.md). Splits never share a content, nor therefore a caption (a caption names every
attribute, so it determines its content): every possible content belongs to one split by a fixed hash
partition of ``(seed, content)`` (``SPLIT_SHARES``), which no split size changes. About a quarter of the images are *hard negatives*: a copy of an earlier image of the
same split with exactly one attribute changed (a shape, a colour, a size, the position or the relation).
Each image is drawn on demand from its content and its own random stream ``(seed, split, index)`` — jittered
positions, sizes, rotations and colours, one of five backgrounds, half of them with noise or stripes — so the
pixels do not depend on which images were drawn before. Five paraphrased captions per image, including the
inverse phrasing of a relation ("a B to the right of an A").
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from align.common.config import Integer, Number, StrictModel
from align.common.errors import AlignError

# Bump when drawing or captioning changes, so that caches keyed on the synthetic set's identity are invalidated.
GENERATOR_VERSION = 2

SPLITS = {"train": 0, "val": 1, "test": 2}
# The share of all contents each split may draw from: about the default split sizes, with room to spare.
SPLIT_SHARES = {"train": 0.6, "val": 0.15, "test": 0.25}
SPLIT_ALIASES = {"validation": "val", "valid": "val"}

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 225),
    "yellow": (240, 210, 35),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
    "pink": (245, 125, 195),
    "cyan": (45, 200, 215),
}
SIZES = {"small": 0.085, "large": 0.16}  # radius as a fraction of the image side
POSITIONS = {  # centre (x, y) as fractions of the image side
    "top left": (0.27, 0.27), "top": (0.5, 0.27), "top right": (0.73, 0.27),
    "left": (0.27, 0.5), "center": (0.5, 0.5), "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73), "bottom": (0.5, 0.73), "bottom right": (0.73, 0.73),
}
RELATIONS = ("left_of", "above")  # obj1 RELATION obj2; captions also use the inverse ("right of", "below")
BACKGROUNDS = ((236, 236, 232), (178, 178, 178), (82, 82, 86), (26, 26, 30), (222, 205, 172))

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {
    "circle": ("circle", "disk"), "square": ("square",), "triangle": ("triangle",),
    "star": ("star",), "hexagon": ("hexagon",), "cross": ("cross", "plus sign"),
}
POSITION_WORDS = {
    "top left": ("in the top left corner", "at the upper left"),
    "top": ("at the top", "near the top edge"),
    "top right": ("in the top right corner", "at the upper right"),
    "left": ("on the left side", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the lower left"),
    "bottom": ("at the bottom", "near the bottom edge"),
    "bottom right": ("in the bottom right corner", "at the lower right"),
}
SINGLE_TEMPLATES = (
    "a {size} {colour} {shape} {pos}",
    "{pos} there is a {size} {colour} {shape}",
    "the picture shows a {size} {colour} {shape} {pos}",
    "a {colour} {shape}, {size}, {pos}",
    "one {size} {shape} in {colour}, placed {pos}",
)
PAIR_TEMPLATES = {
    "left_of": (
        "a {a} to the left of a {b}",
        "a {b} to the right of a {a}",
        "a {a} on the left and a {b} on the right",
        "the {b} is right of the {a}",
        "two shapes: a {a} left of a {b}",
    ),
    "above": (
        "a {a} above a {b}",
        "a {b} below a {a}",
        "a {a} at the top and a {b} at the bottom",
        "the {b} is underneath the {a}",
        "two shapes: a {a} over a {b}",
    ),
}
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges at little cost


class SyntheticConfig(StrictModel):
    """Sizes per split, seed and drawing options of the synthetic set (every field changes the values)."""

    train_images: Integer = Field(800, ge=0)
    val_images: Integer = Field(200, ge=0)
    test_images: Integer = Field(300, ge=0)
    seed: Integer = Field(0, ge=0)
    image_size: Integer = Field(128, ge=32, le=1024)
    captions_per_image: Integer = Field(5, ge=1, le=5)
    two_object_fraction: Number = Field(0.5, ge=0.0, le=1.0)
    hard_negative_fraction: Number = Field(0.25, ge=0.0, le=1.0)
    texture_fraction: Number = Field(0.5, ge=0.0, le=1.0)

    def split_size(self, split: str) -> int:
        """Number of images in ``split``."""
        return {"train": self.train_images, "val": self.val_images, "test": self.test_images}[canonical_split(split)]

    def identity(self, split: str) -> dict[str, Any]:
        """What changes the images and captions of ``split`` (other splits' sizes do not)."""
        split = canonical_split(split)
        data = self.model_dump(exclude={"train_images", "val_images", "test_images"})
        return {"generator_version": GENERATOR_VERSION, "split": split, "images": self.split_size(split), **data}


def canonical_split(split: str) -> str:
    """``train`` | ``val`` | ``test`` (``validation`` accepted), else an AlignError."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise AlignError(f"the synthetic set has splits train, val, test; got {split!r}")
    return split


@dataclass(frozen=True)
class SyntheticPlan:
    """The structured contents of one split: attributes, captions and the hard-negative pairs."""

    split: str
    attributes: list[dict[str, Any]]  # flat: n_objects + shape/colour/size/position, or shape1..size2 + relation
    captions: list[list[str]]
    hard_negatives: list[tuple[int, int, str]]  # (source image, its one-attribute variant, changed attribute)


def _content_key(attrs: dict[str, Any]) -> tuple:
    return tuple(sorted(attrs.items()))


def _owner(seed: int, attrs: dict[str, Any]) -> str:
    """The one split allowed to use this content: a hash of (seed, content), so independent of split sizes."""
    digest = hashlib.blake2b(repr((seed, _content_key(attrs))).encode(), digest_size=8).digest()
    u, edge = int.from_bytes(digest, "big") / 2.0**64, 0.0
    for split, share in SPLIT_SHARES.items():
        edge += share
        if u < edge:
            return split
    return split  # round-off at u ≈ 1


def _random_object(rng: np.random.Generator, suffix: str = "") -> dict[str, str]:
    return {
        f"shape{suffix}": SHAPES[rng.integers(len(SHAPES))],
        f"colour{suffix}": list(COLOURS)[rng.integers(len(COLOURS))],
        f"size{suffix}": list(SIZES)[rng.integers(len(SIZES))],
    }


def _random_content(rng: np.random.Generator, two_object_fraction: float) -> dict[str, Any]:
    if rng.random() < two_object_fraction:
        return {"n_objects": 2, **_random_object(rng, "1"), **_random_object(rng, "2"),
                "relation": RELATIONS[rng.integers(len(RELATIONS))]}
    return {"n_objects": 1, **_random_object(rng), "position": list(POSITIONS)[rng.integers(len(POSITIONS))]}


def _valid(attrs: dict[str, Any]) -> bool:
    """Two objects must differ in shape or colour, so each caption names them unambiguously."""
    if attrs["n_objects"] == 1:
        return True
    return (attrs["shape1"], attrs["colour1"]) != (attrs["shape2"], attrs["colour2"])


def _choices(key: str) -> tuple[str, ...]:
    base = key.rstrip("12")
    return {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
            "relation": RELATIONS}[base]


def _mutate(attrs: dict[str, Any], rng: np.random.Generator) -> tuple[dict[str, Any], str]:
    """A copy of ``attrs`` with exactly one attribute changed to another value; returns it and the key."""
    keys = [k for k in attrs if k != "n_objects"]
    key = keys[rng.integers(len(keys))]
    others = [v for v in _choices(key) if v != attrs[key]]
    return {**attrs, key: others[rng.integers(len(others))]}, key


def _captions(attrs: dict[str, Any], rng: np.random.Generator, count: int) -> list[str]:
    def pick(words: tuple[str, ...]) -> str:
        return words[rng.integers(len(words))]

    def phrase(suffix: str = "") -> str:
        return (f"{pick(SIZE_WORDS[attrs['size' + suffix]])} {attrs['colour' + suffix]} "
                f"{pick(SHAPE_WORDS[attrs['shape' + suffix]])}")

    out = []
    if attrs["n_objects"] == 1:
        for template in SINGLE_TEMPLATES[:count]:
            out.append(template.format(size=pick(SIZE_WORDS[attrs["size"]]), colour=attrs["colour"],
                                       shape=pick(SHAPE_WORDS[attrs["shape"]]),
                                       pos=pick(POSITION_WORDS[attrs["position"]])))
    else:
        for template in PAIR_TEMPLATES[attrs["relation"]][:count]:
            out.append(template.format(a=phrase("1"), b=phrase("2")))
    return [re.sub(r"\ba (?=[aeiou])", "an ", c) for c in out]


def _stream(config: SyntheticConfig, split: str, index: int, purpose: int) -> np.random.Generator:
    """An independent random stream per (seed, split, image, purpose): order-independent drawing."""
    return np.random.default_rng([config.seed, SPLITS[split], index, purpose])


def _fresh_content(rng: np.random.Generator, config: SyntheticConfig, split: str, seen: set[tuple]) -> dict[str, Any]:
    """A valid content owned by ``split`` and not in ``seen``; once none can be found (very large splits), a
    repeat within the split, never a content owned by another split."""
    def usable(attrs: dict[str, Any]) -> bool:
        return _valid(attrs) and _owner(config.seed, attrs) == split

    # Draw the number of objects first: rejecting used contents must not skew the one/two-object mix.
    kind = 1.0 if rng.random() < config.two_object_fraction else 0.0
    for fraction in (kind, config.two_object_fraction):
        for _ in range(200):
            attrs = _random_content(rng, fraction)
            if usable(attrs) and _content_key(attrs) not in seen:
                return attrs
    while not usable(attrs):
        attrs = _random_content(rng, config.two_object_fraction)
    return attrs


def plan_split(config: SyntheticConfig, split: str, count: int | None = None) -> SyntheticPlan:
    """The contents of the first ``count`` images of ``split`` (a prefix of the full split's plan)."""
    split = canonical_split(split)
    n = config.split_size(split) if count is None else min(count, config.split_size(split))
    rng = np.random.default_rng([config.seed, SPLITS[split], 0xA11])
    attributes: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    hard: list[tuple[int, int, str]] = []
    for i in range(n):
        attrs = None
        if i > 0 and rng.random() < config.hard_negative_fraction:
            src = int(rng.integers(i))
            for _ in range(32):  # most one-attribute variants belong to another split: try more of them
                cand, key = _mutate(attributes[src], rng)
                if _valid(cand) and _content_key(cand) not in seen and _owner(config.seed, cand) == split:
                    attrs = cand
                    hard.append((src, i, key))
                    break
        if attrs is None:
            attrs = _fresh_content(rng, config, split, seen)
        seen.add(_content_key(attrs))
        attributes.append(attrs)
    captions = [_captions(a, _stream(config, split, i, 2), config.captions_per_image)
                for i, a in enumerate(attributes)]
    return SyntheticPlan(split, attributes, captions, hard)


# ---------------------------------------------------------------- drawing

def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, offset: float = 0.0) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(angle + offset + 2 * math.pi * k / n),
                 cy + radius * math.sin(angle + offset + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "square":
        return ring(4, r * 1.05, math.pi / 4)
    if shape == "triangle":
        return ring(3, r * 1.15, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, r)
    if shape == "star":
        outer, inner = ring(5, r * 1.15, -math.pi / 2), ring(5, r * 0.48, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = r, r * 0.36  # arm half-length and half-width
        pts = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b),
               (-b, a)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(shape)


def _background(rng: np.random.Generator, side: int, texture_fraction: float) -> np.ndarray:
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float32)
    base = base + rng.uniform(-10, 10)  # brightness jitter
    img = np.broadcast_to(base, (side, side, 3)).copy()
    if rng.random() < texture_fraction:
        if rng.random() < 0.5:
            img += 9.0 * rng.standard_normal((side, side, 1), dtype=np.float32)
        else:
            theta = rng.uniform(0, math.pi)
            period = rng.uniform(0.05, 0.1) * side
            yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
            stripes = ((xx * math.cos(theta) + yy * math.sin(theta)) / period) % 2.0 < 1.0
            img += np.where(stripes, 14.0, -14.0)[..., None].astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _object_colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    jitter = rng.integers(-14, 15, size=3)
    return tuple(int(v) for v in np.clip(np.array(COLOURS[name]) + jitter, 0, 255))


def draw(config: SyntheticConfig, split: str, index: int, attrs: dict[str, Any]) -> Image.Image:
    """Image ``index`` of ``split`` (RGB, ``image_size`` square), drawn from its attributes and own stream."""
    split = canonical_split(split)
    rng = _stream(config, split, index, 1)
    side = config.image_size
    big = side * SUPERSAMPLE
    canvas = Image.fromarray(_background(rng, side, config.texture_fraction))
    if attrs["n_objects"] == 1:
        px, py = POSITIONS[attrs["position"]]
        objects = [("", px + rng.uniform(-0.05, 0.05), py + rng.uniform(-0.05, 0.05))]
    else:
        near, far = 0.27 + rng.uniform(-0.04, 0.04), 0.73 + rng.uniform(-0.04, 0.04)
        off1, off2 = 0.5 + rng.uniform(-0.14, 0.14), 0.5 + rng.uniform(-0.14, 0.14)
        if attrs["relation"] == "left_of":
            objects = [("1", near, off1), ("2", far, off2)]
        else:
            objects = [("1", off1, near), ("2", off2, far)]
    for suffix, fx, fy in objects:
        r = SIZES[attrs["size" + suffix]] * rng.uniform(0.9, 1.1) * big
        angle = math.radians(rng.uniform(-20, 20))
        colour = _object_colour(attrs["colour" + suffix], rng)
        cx, cy = fx * big, fy * big
        # The shape's coverage drawn at SUPERSAMPLE x and box-filtered: anti-aliased edges, flat colour inside.
        mask = Image.new("L", (big, big), 0)
        pen = ImageDraw.Draw(mask)
        if attrs["shape" + suffix] == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        else:
            pen.polygon(_polygon(attrs["shape" + suffix], cx, cy, r, angle), fill=255)
        canvas.paste(colour, (0, 0, side, side), mask.resize((side, side), Image.Resampling.BOX))
    return canvas
