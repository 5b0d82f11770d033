"""The pieces the dataset sources share: Selection (max_images, caption_index) and Columns (split values)."""
from __future__ import annotations

import numpy as np
import pytest

from align.common.errors import AlignError
from align.data.caption_set import Selection
from align.data.datasets import DatasetSpec
from align.data.source_columns import Columns, pick_column, split_captions

IDS = ["a", "b", "c"]
CAPTIONS = [["a0", "a1"], ["b0"], ["c0", "c1", "c2"]]


def _apply(selection: Selection, **extra):
    return selection.apply("set/test", IDS, CAPTIONS, loader=lambda i: None, meta={"source": "x"}, **extra)


def test_all_captions_of_every_image_flatten_in_order():
    got = _apply(Selection())
    assert got.captions == ["a0", "a1", "b0", "c0", "c1", "c2"]
    assert got.caption_to_image.tolist() == [0, 0, 1, 2, 2, 2]
    assert got.meta == {"source": "x", "images": 3, "captions": 6}
    assert [got.captions_of(i) for i in range(3)] == CAPTIONS


def test_max_images_keeps_the_first_images_and_their_labels():
    got = _apply(Selection(max_images=2), labels=np.array([2, 0, 1]), class_names=["p", "q", "r"],
                 prompts=[["p"], ["q"], ["r"]])
    assert got.image_ids == ["a", "b"]
    assert got.captions == ["a0", "a1", "b0"]
    assert got.labels.tolist() == [2, 0]


def test_caption_index_keeps_one_caption_per_image_or_names_the_image_that_lacks_it():
    got = _apply(Selection(caption_index=0))
    assert got.captions == ["a0", "b0", "c0"]
    assert got.caption_to_image.tolist() == [0, 1, 2]
    with pytest.raises(AlignError, match="image b has 1 caption"):
        _apply(Selection(caption_index=1))
    assert _apply(Selection(max_images=1, caption_index=1)).captions == ["a1"]  # b is cut before it is checked


def test_columns_accept_the_mapped_split_values_and_only_filter_with_a_split_column():
    cols = Columns(split_column="karpathy", split_values={"test": ["test", "restval"]})
    assert cols.accepted("test") == ["test", "restval"]
    assert cols.accepted("train") == ["train"]
    assert cols.split_filter("test") == {"test", "restval"}
    assert Columns(split_values={"test": ["x"]}).split_filter("test") is None
    assert Columns().identity("test")["split_values"] is None
    assert cols.identity("test")["split_values"] == ["test", "restval"]


def test_a_spec_hands_its_fields_to_its_source():
    spec = DatasetSpec(kind="csv", path="rows.csv", caption_column="text", delimiter=";", max_images=3,
                       caption_index=0)
    source = spec.table_source()
    assert (source.kind, source.path, source.delimiter) == ("csv", "rows.csv", ";")
    assert source.columns == Columns(caption_column="text")
    assert source.selection == Selection(3, 0)
    hub = DatasetSpec(preset="flickr30k", hf_split={"test": "validation"}).resolved().table_source()
    assert (hub.name, hub.id_column, hub.columns.caption_separator) == ("clip-benchmark/wds_flickr30k", "__key__", "\n")
    assert hub.hub_split("test") == "validation"
    with pytest.raises(AlignError, match="dataset kind 'synthetic' is not read from a table"):
        DatasetSpec().table_source()


def test_column_guesses_and_caption_cells():
    assert pick_column(["path", "text"], None, ("image", "path"), "image", "f") == "path"
    assert pick_column(["x", "y"], None, (), "caption", "f", fallback=1) == "y"
    with pytest.raises(AlignError, match="no image column 'img'"):
        pick_column(["x"], "img", (), "image", "f")
    assert split_captions(" one \n\n two ", "\n", "row 1") == ["one", "two"]
    assert split_captions(["a ", "b"], None, "row 1") == ["a", "b"]
    with pytest.raises(AlignError, match="row 3: empty caption"):
        split_captions("   ", None, "row 3")
