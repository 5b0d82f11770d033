"""The streamed writing of a cache's final arrays (align.cache.work.NpyStream): the bytes np.save writes for the
whole array, hashed as they go, in memory that does not grow with the number of rows; and `align embed`'s finalize
through it writes the very files the old in-memory concatenation wrote."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from align.cache import work as cache_work
from align.cache.key import ARRAYS, EmbedConfig
from align.cache.work import NpyStream, StreamedArray, WorkFolder
from align.cache.write import EmbedJob, embed_split
from align.common.errors import AlignError


def saved(array: np.ndarray) -> bytes:
    """What np.save writes for ``array`` (the reference every streamed file is held to)."""
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


@pytest.mark.parametrize("array", [
    np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float16),
    np.random.default_rng(1).standard_normal((33, 512)).astype(np.float32),
    np.arange(12345, dtype=np.int64),
    np.zeros((0, 4), dtype=np.float32),
    np.full((1, 3), 7, dtype=np.float32),
], ids=["float16", "float32", "int64-1d", "no-rows", "one-row"])
def test_a_streamed_file_is_byte_for_byte_np_save_of_the_whole_array(tmp_path, array):
    path = tmp_path / "a.npy"
    with NpyStream(path, array.shape, array.dtype) as out:
        for start in range(0, max(1, len(array)), 97):  # uneven blocks
            out.write(array[start:start + 97])
        entry = out.close()
    expected = saved(array)
    assert path.read_bytes() == expected
    assert entry == {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": len(expected),
                     "sha256": hashlib.sha256(expected).hexdigest()}
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]  # no temporary file left
    dry = StreamedArray(array.shape, array.dtype, [array]).write(None)  # hashed only: the same entry, no file
    assert dry == entry and [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_a_stream_refuses_rows_of_another_dtype_or_width_and_leaves_no_file(tmp_path):
    for bad in (np.zeros((2, 4), np.float64), np.zeros((2, 5), np.float32), np.zeros((4, 4), np.float32)):
        with pytest.raises(ValueError), NpyStream(tmp_path / "a.npy", (3, 4), np.float32) as out:
            out.write(np.zeros((1, 4), np.float32))
            out.write(bad)
        assert list(tmp_path.iterdir()) == []


# -- align embed's finalize --------------------------------------------------------------------------------------

def _image_folder(root: Path) -> Path:
    """Six images with two captions each; image 2 is corrupt (skipped with its captions)."""
    root.mkdir(parents=True)
    rows = []
    for i in range(6):
        name = f"img{i}.png"
        if i == 2:
            (root / name).write_bytes(b"not an image")
        else:
            Image.new("RGB", (40, 40), (40 * i, 255 - 40 * i, 128)).save(root / name)
        rows.append({"file_name": name, "captions": [f"picture {i}", f"image {i} of the set"]})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.mark.parametrize("kind, storage, normalize", [("synthetic", "float32", False),
                                                      ("imagefolder", "float16", True)])
def test_embed_writes_the_bytes_the_in_memory_concatenation_wrote(tiny_dir, tmp_path, monkeypatch, kind, storage,
                                                                  normalize):
    """The old finalize concatenated every shard, dropped the skipped rows, normalised, cast and np.save'd: the
    same computed here from the shards it kept, independently of the code under test."""
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)  # several shards per tower
    dataset = ({"kind": "synthetic", "synthetic": {"train_images": 20, "val_images": 4, "test_images": 4,
                                                   "image_size": 32, "captions_per_image": 2}} if kind == "synthetic"
               else {"kind": "imagefolder", "path": str(_image_folder(tmp_path / "images"))})
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    cfg = EmbedConfig.model_validate({"dataset": dataset, "splits": ["train"], "image_encoder": encoder,
                                      "text_encoder": encoder, "batch_size": 4, "shard_size": 4, "device": "cpu",
                                      "storage_dtype": storage, "normalize": normalize,
                                      "cache_root": str(tmp_path / "cache")})
    kept = tmp_path / "shards"
    monkeypatch.setattr(WorkFolder, "remove", lambda self: shutil.move(self.path, kept))
    folder = embed_split(cfg, "train", progress=False, log=lambda m: None)
    manifest = json.loads((folder / "manifest.json").read_text())

    def shards(tower: str) -> np.ndarray:
        files = sorted(kept.glob(f"{tower}-*.npy"))
        assert len(files) >= 2
        return np.concatenate([np.load(f) for f in files])

    def stored(rows: np.ndarray) -> np.ndarray:
        if normalize:
            rows = rows / np.maximum(np.sqrt((rows * rows).sum(axis=1, keepdims=True)), 1e-12)
        return rows.astype(storage)

    n_img = len(shards("image"))
    skipped = sorted(d["index"] for d in manifest["skipped"])
    assert skipped == ([2] if kind == "imagefolder" else [])
    keep_img = np.ones(n_img, bool)
    keep_img[skipped] = False
    c2i = np.repeat(np.arange(n_img), 2)  # two captions per image, in image order, in both sets
    keep_cap = keep_img[c2i]
    expected = {"image.npy": stored(shards("image")[keep_img]), "text.npy": stored(shards("text")[keep_cap]),
                "caption_to_image.npy": (np.cumsum(keep_img) - 1)[c2i[keep_cap]].astype(np.int64),
                "image_rows.npy": np.flatnonzero(keep_img).astype(np.int64),
                "caption_rows.npy": np.flatnonzero(keep_cap).astype(np.int64)}
    for name in ARRAYS:
        raw = saved(expected[name])
        assert (folder / name).read_bytes() == raw, name
        assert manifest["files"][name] == {"shape": list(expected[name].shape), "dtype": str(expected[name].dtype),
                                           "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    if normalize:  # not vacuous: normalised rows really differ from the raw ones
        assert not np.allclose(expected["image.npy"], shards("image")[keep_img].astype(storage))


def _finalize_job(tmp_path: Path, images: int, captions_per_image: int, dim: int) -> EmbedJob:
    """An EmbedJob whose shards are written straight into work/ (no encoder), ready to finalize."""
    cfg = EmbedConfig.model_validate({"dataset": {"kind": "synthetic"}, "splits": ["train"],
                                      "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
                                      "text_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
                                      "shard_size": 512, "cache_root": str(tmp_path / "cache")})
    job = EmbedJob(cfg, "train", progress=False, log=lambda m: None)
    captions = images * captions_per_image
    job.data = SimpleNamespace(name="synthetic", image_ids=[str(i) for i in range(images)],
                               captions=["x"] * captions, labels=None,
                               caption_to_image=np.repeat(np.arange(images), captions_per_image))
    job.work = WorkFolder.freeze(job.folder / "work", job.key, images, captions, cfg.shard_size, lambda m: None)
    rng = np.random.default_rng(0)
    for kind, shards in (("image", job.work.image_shards), ("text", job.work.text_shards)):
        for s, rows in enumerate(shards):
            meta = {"start": rows.start, "stop": rows.stop, "skipped": [], "seconds": 0.0, "encoded": len(rows)}
            job.work.save_shard(kind, s, rng.standard_normal((len(rows), dim)).astype(np.float32), meta)
    job.todo, job.device = job.work.todo(labelled=False), "cpu"
    return job


def test_embed_finalize_holds_one_shard_not_the_split_in_memory(tmp_path):
    """16,384 images and 32,768 captions of 256 floats (16 + 32 MiB of shards): the old finalize held them all
    (and their stored copies); the streamed one holds a shard or two."""
    job = _finalize_job(tmp_path, images=16384, captions_per_image=2, dim=256)
    tracemalloc.start()
    try:
        job.writer.finalize(job)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    shard = 512 * 256 * 4
    assert peak < 8 * shard + 32768 * 8 * 6, peak  # a few shards and the int64 index arrays, not 48 MiB
    assert np.load(job.folder / "text.npy", mmap_mode="r").shape == (32768, 256)


def test_a_shard_of_another_width_is_one_line_naming_the_work_folder(tmp_path):
    job = _finalize_job(tmp_path, images=600, captions_per_image=1, dim=8)
    np.save(job.work.shard_file("text", 1, "npy"), np.zeros((88, 9), np.float32))
    with pytest.raises(AlignError, match=r"text-00001.npy holds \[88, 9\], expected \[88, 8\]: delete .*work and run"):
        job.writer.finalize(job)
    assert [p.name for p in job.folder.glob(".*.tmp")] == []
