"""The pieces `align embed` writes through: the work/ folder's frozen plan and shards (align.cache.work), and the
cache writer with its read-only twin for the ranks other than 0 (align.cache.write). No encoder runs here."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from align.cache import work as cache_work
from align.cache.work import WorkFolder, shard_ranges
from align.cache.write import CacheWriter, ReadOnlyCacheWriter
from align.common.distributed import Rank
from align.common.errors import AlignError
from align.common.locks import exclusive


def test_shard_ranges_cover_every_row_once():
    assert shard_ranges(20, 8) == [range(0, 8), range(8, 16), range(16, 20)]
    assert shard_ranges(8, 8) == [range(0, 8)]
    assert shard_ranges(0, 8) == []


def test_a_new_plan_rounds_shards_up_to_whole_encoder_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)
    logged = []
    work = WorkFolder.freeze(tmp_path / "work", "k", images=10, captions=21, shard_size=5, log=logged.append)
    # 5 rows asked, 4-row batches: shards of 8 rows, so no batch crosses two shards
    assert json.loads((tmp_path / "work" / "plan.json").read_text()) == {
        "key": "k", "images": 10, "captions": 21, "encode_rows": 4, "shard_size": 8}
    assert work.rows == 4 and work.image_shards == [range(0, 8), range(8, 10)]
    assert work.text_shards == [range(0, 8), range(8, 16), range(16, 21)]
    assert logged == []
    todo = work.todo(labelled=True)
    assert (todo.images, todo.captions, todo.prompts, todo.resumed) == ([0, 1], [0, 1, 2], True, False)


def test_an_interrupted_plan_is_resumed_with_its_own_shard_size_and_its_finished_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)
    first = WorkFolder.freeze(tmp_path / "work", "k", images=10, captions=20, shard_size=4, log=print)
    first.save_shard("image", 1, np.ones((6, 3), np.float32), {"start": 4, "stop": 10, "skipped": [], "seconds": 0.5,
                                                                "encoded": 6})
    first.save_shard("text", 0, np.ones((4, 3), np.float32), {"start": 0, "stop": 4, "seconds": 0.25, "encoded": 4})
    first.save_prompts(np.zeros((6, 3), np.float32))
    logged = []
    again = WorkFolder.freeze(tmp_path / "work", "k", images=10, captions=20, shard_size=64, log=logged.append)
    assert again.plan["shard_size"] == 4 and len(again.image_shards) == 3 and len(again.text_shards) == 5
    assert logged == ["resuming with the interrupted run's shard_size=4 (its finished shards are kept; the values do "
                      "not depend on it)"]
    todo = again.todo(labelled=True)
    assert (todo.images, todo.captions, todo.prompts, todo.resumed) == ([0, 2], [1, 2, 3, 4], False, True)
    assert json.loads((tmp_path / "work" / "classes.json").read_text()) == {"prompts": 6}


def test_a_plan_for_other_data_is_discarded_with_its_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)
    old = WorkFolder.freeze(tmp_path / "work", "k", images=10, captions=20, shard_size=4, log=print)
    old.save_shard("image", 0, np.ones((4, 3), np.float32), {"start": 0, "stop": 4, "skipped": [], "seconds": 0.0,
                                                             "encoded": 4})
    logged = []
    new = WorkFolder.freeze(tmp_path / "work", "k", images=12, captions=20, shard_size=4, log=logged.append)
    assert logged == [f"discarding an unfinished run in {tmp_path / 'work'} (it was for different data or an older "
                      f"format)"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["plan.json"]
    assert new.plan["images"] == 12 and new.todo(labelled=False).images == [0, 1, 2]


def test_shards_read_back_in_source_order_with_their_skips_and_times(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 2)
    work = WorkFolder.freeze(tmp_path / "work", "k", images=3, captions=5, shard_size=2, log=print)
    rows = np.arange(15, dtype=np.float32).reshape(5, 3)
    work.save_shard("image", 1, rows[2:3], {"start": 2, "stop": 3, "skipped": [], "seconds": 2.0, "encoded": 1})
    skip = {"index": 1, "image_id": "b", "reason": "broken"}
    work.save_shard("image", 0, rows[:2], {"start": 0, "stop": 2, "skipped": [skip], "seconds": 1.0, "encoded": 1})
    for s, (a, b) in enumerate([(0, 2), (2, 4), (4, 5)]):
        work.save_shard("text", s, -rows[a:b], {"start": a, "stop": b, "seconds": 0.5, "encoded": b - a})
    records = work.records()
    image_parts, text_parts = list(work.parts("image")), list(work.parts("text"))
    assert [rows_ for rows_, _ in image_parts] == [range(0, 2), range(2, 3)]
    assert np.concatenate([a for _, a in image_parts]).tolist() == rows[:3].tolist()
    assert np.concatenate([a for _, a in text_parts]).tolist() == (-rows).tolist()
    assert records.skipped == [skip] and records.dims == {"image": 3, "text": 3}
    assert records.seconds == {"image": 3.0, "image_encoded": 2, "text": 1.5}
    assert [p.name for p in work.files()] == ["image-00000.npy", "image-00000.json", "image-00001.npy",
                                              "image-00001.json", "text-00000.npy", "text-00000.json",
                                              "text-00001.npy", "text-00001.json", "text-00002.npy",
                                              "text-00002.json"]


def test_rank_0_holds_the_writer_and_its_lock(tmp_path):
    folder = tmp_path / "synthetic-train-0123"
    with CacheWriter.for_rank(folder, Rank(0, 2)) as writer:
        assert type(writer) is CacheWriter
        assert writer.claim() is False  # no manifest: not finished, so it takes the lock
        with pytest.raises(AlignError, match=f"in use by process {os.getpid()}"), exclusive(folder, "cache"):
            pass
    with exclusive(folder, "cache"):  # released when the writer closes
        pass


def test_the_twin_on_other_ranks_writes_nothing(tmp_path):
    folder = tmp_path / "synthetic-train-0123"
    (folder / "work").mkdir(parents=True)
    leftovers = [folder / ".image.npy.99.tmp", folder / "work" / ".text-00000.npy.99.tmp", folder / "verified.json"]
    for path in leftovers:
        path.write_bytes(b"x")
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    with CacheWriter.for_rank(folder, Rank(1, 2)) as twin:
        assert isinstance(twin, ReadOnlyCacheWriter)
        assert twin.claim() is False
        twin.clean()
        twin.finalize(job=None)  # touches neither the job nor the folder
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before
        with exclusive(folder, "cache"):  # the twin took no lock
            pass
    with CacheWriter.for_rank(folder, Rank(0, 2)) as writer:
        writer.claim()
        writer.clean()  # rank 0's writer removes a killed run's temp files and the stale verification record
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [".lock", "work"]
    assert not folder.exists()  # it wrote nothing: closing it leaves nothing (issue 21), not even its lock
