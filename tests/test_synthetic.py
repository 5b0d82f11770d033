"""The built-in synthetic set: determinism, captions, hard negatives, split disjointness, distinct test images.

Pixel checks use colour values and image regions written here, not the module's tables, so a drawing that
does not match its attributes fails.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from align.common.config import validate
from align.data.datasets import DatasetSpec, load_image_caption_split
from align.common.errors import AlignError
from align.data.synthetic import SyntheticConfig, plan_split

# Roughly the intended colours; the drawn ones are jittered by at most 14 per channel.
EXPECTED_RGB = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 75, 225), "yellow": (240, 210, 35),
                "purple": (135, 55, 175), "orange": (245, 135, 25), "pink": (245, 125, 195), "cyan": (45, 200, 215)}
# Where a single object's centre must fall: (x range, y range) as fractions of the side.
THIRDS = {"left": (0.0, 0.4), "center": (0.35, 0.65), "right": (0.6, 1.0)}


def _spec(**synthetic) -> DatasetSpec:
    return validate(DatasetSpec, {"synthetic": synthetic})


def _digest(img) -> str:
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def test_split():
    return load_image_caption_split(_spec(), "test")


def test_same_config_gives_identical_pixels_and_captions_in_any_order(test_split):
    again = load_image_caption_split(_spec(), "test")
    assert again.captions == test_split.captions and again.image_ids == test_split.image_ids
    n = len(test_split)
    forward = [_digest(test_split.load_image(i)) for i in range(n)]
    backward = [_digest(again.load_image(i)) for i in reversed(range(n))][::-1]
    assert forward == backward
    # a prefix (max_images) is the same images, and drawing one alone gives the same bytes
    head = load_image_caption_split(_spec().model_copy(update={"max_images": 20}), "test")
    assert head.captions == test_split.captions[:100]
    assert [_digest(head.load_image(i)) for i in range(20)] == forward[:20]
    other_seed = load_image_caption_split(_spec(seed=1), "test")
    assert other_seed.captions != test_split.captions


def test_five_captions_per_image_and_configurable(test_split):
    counts = np.bincount(test_split.caption_to_image, minlength=len(test_split))
    assert len(test_split) == 300 and counts.tolist() == [5] * 300
    for i in range(len(test_split)):
        caps = test_split.captions_of(i)
        assert len(set(caps)) == 5  # paraphrases, not copies
    three = load_image_caption_split(_spec(captions_per_image=3, test_images=10), "test")
    assert np.bincount(three.caption_to_image).tolist() == [3] * 10
    img = test_split.load_image(0)
    assert img.mode == "RGB" and img.size == (128, 128)
    assert load_image_caption_split(_spec(image_size=64, test_images=2), "test").load_image(1).size == (64, 64)


def test_split_sizes_defaults_and_other_splits_do_not_change_test():
    data = {s: load_image_caption_split(_spec(), s) for s in ("train", "val", "test")}
    assert [len(data[s]) for s in ("train", "val", "test")] == [800, 200, 300]
    resized = load_image_caption_split(_spec(train_images=5, val_images=7), "test")
    assert resized.captions == data["test"].captions
    assert _digest(resized.load_image(299)) == _digest(data["test"].load_image(299))
    assert len(load_image_caption_split(_spec(), "validation")) == 200
    with pytest.raises(AlignError, match="splits train, val, test"):
        load_image_caption_split(_spec(), "dev")


def _differing_keys(a: dict, b: dict) -> set[str]:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_hard_negatives_differ_in_exactly_one_attribute(test_split):
    attrs, pairs = test_split.attributes, test_split.hard_negatives
    assert len(pairs) >= 0.15 * len(test_split)  # a real share of the set, not a token few
    changed = set()
    for src, dst, key in pairs:
        diff = _differing_keys(attrs[src], attrs[dst])
        assert diff == {key}, (src, dst, attrs[src], attrs[dst])
        assert set(test_split.captions_of(src)).isdisjoint(test_split.captions_of(dst))
        changed.add(key.rstrip("12"))
    assert changed == {"shape", "colour", "size", "position", "relation"}  # every kind of attribute occurs


def test_contents_and_images_are_distinct_within_the_test_split(test_split):
    # identical content would cap even a perfect model's recall (benchmark notes): every content is unique
    keys = [tuple(sorted(a.items())) for a in test_split.attributes]
    assert len(set(keys)) == len(keys)
    digests = [_digest(test_split.load_image(i)) for i in range(len(test_split))]
    assert len(set(digests)) == len(digests)
    assert len(set(test_split.captions)) > 0.95 * len(test_split.captions)
    n_two = sum(a["n_objects"] == 2 for a in test_split.attributes)
    assert 0.35 * len(test_split) < n_two < 0.65 * len(test_split)


def test_splits_are_disjoint():
    data = {s: load_image_caption_split(_spec(), s) for s in ("train", "val", "test")}
    ids = [set(d.image_ids) for d in data.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    digests = {s: {_digest(d.load_image(i)) for i in range(len(d))} for s, d in data.items()}
    assert sum(len(v) for v in digests.values()) == 1300  # no image repeats within or across splits
    assert not (digests["train"] & digests["test"] or digests["val"] & digests["test"])


@pytest.mark.parametrize("synthetic", [{}, {"seed": 3, "train_images": 1200, "val_images": 300, "test_images": 500}])
def test_splits_share_no_content_and_no_caption(synthetic):
    """Every content and every caption of every split against all of each other split (sizes do not matter)."""
    data = {s: load_image_caption_split(_spec(**synthetic), s) for s in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        contents_a = {frozenset(x.items()) for x in data[a].attributes}
        shared_content = [x for x in data[b].attributes if frozenset(x.items()) in contents_a]
        assert not shared_content, (a, b, shared_content[:3])
        captions_a = {" ".join(c.lower().split()) for c in data[a].captions}  # case and spacing do not count
        shared_caption = [c for c in data[b].captions if " ".join(c.lower().split()) in captions_a]
        assert not shared_caption, (a, b, shared_caption[:3])


def _mask(pixels: np.ndarray, colour: str, tol: float = 45.0) -> np.ndarray:
    dist = np.linalg.norm(pixels.astype(np.float32) - np.array(EXPECTED_RGB[colour], np.float32), axis=-1)
    return dist < tol


def test_pixels_show_the_attributes(test_split):
    """Independent check: the named colour is where the position / relation says, large is larger than small."""
    side = 128
    areas = {"small": [], "large": []}
    checked_single = checked_pair = 0
    for i, a in enumerate(test_split.attributes):
        pixels = np.asarray(test_split.load_image(i))
        if a["n_objects"] == 1:
            mask = _mask(pixels, a["colour"])
            assert mask.sum() > 40, (i, a)
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean() / side, ys.mean() / side
            pos = a["position"]
            horizontal = "left" if "left" in pos else "right" if "right" in pos else "center"
            vertical = "left" if "top" in pos else "right" if "bottom" in pos else "center"  # top≈low y
            assert THIRDS[horizontal][0] <= cx <= THIRDS[horizontal][1], (i, a, cx)
            assert THIRDS[vertical][0] <= cy <= THIRDS[vertical][1], (i, a, cy)
            areas[a["size"]].append(mask.sum())
            checked_single += 1
        elif a["colour1"] != a["colour2"]:
            m1, m2 = _mask(pixels, a["colour1"]), _mask(pixels, a["colour2"])
            assert m1.sum() > 40 and m2.sum() > 40, (i, a)
            (y1, x1), (y2, x2) = [np.nonzero(m) for m in (m1, m2)]
            if a["relation"] == "left_of":
                assert x1.mean() + 20 < x2.mean(), (i, a)
            else:
                assert y1.mean() + 20 < y2.mean(), (i, a)
            checked_pair += 1
    assert checked_single > 100 and checked_pair > 100
    assert np.median(areas["large"]) > 2.5 * np.median(areas["small"])


def test_plan_is_a_prefix_and_size_zero_works():
    cfg = SyntheticConfig()
    full, part = plan_split(cfg, "train"), plan_split(cfg, "train", 50)
    assert full.attributes[:50] == part.attributes and full.captions[:50] == part.captions
    assert [p for p in full.hard_negatives if p[1] < 50] == part.hard_negatives
    assert plan_split(SyntheticConfig(test_images=0), "test").attributes == []
