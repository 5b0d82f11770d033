"""`dataset.kind: webdataset`: tar shards as img2dataset writes them, streamed into the cache by `align embed`.

The tests write their own shards (PNG images of the synthetic set, captions in KEY.json or KEY.txt) and the same
images as an image folder: the two caches must hold the same bytes. Then the cache key (name, size, mtime of each
shard), the subset rule, bad data (skipped and listed, or refused with --strict), pattern problems (one line,
exit 2), and (slow) kill -9 in the middle of a tar and torchrun with 2 ranks, each against an uninterrupted
single process.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from align.cache.key import EmbedConfig, cache_key
from align.cache.tar_work import TarWorkFolder
from align.cache.work import is_own_plan
from align.cache.write import embed_split
from align.cli.main import app
from align.common.errors import AlignError
from align.data import synthetic as synth
from align.data.datasets import DatasetSpec
from align.data.synthetic import SyntheticConfig
from test_faults_kill import run_driver

ARRAYS = ("image.npy", "text.npy", "caption_to_image.npy", "image_rows.npy", "caption_rows.npy")
REPO = Path(__file__).resolve().parents[1]
N_IMAGES, PER_TAR = 130, 64  # tars of 64, 64 and 2 samples: whole 64-row micro-batches, as an image folder cuts them


def quiet(*_args) -> None:
    pass


def synthetic_pngs(n: int) -> list[tuple[bytes, list[str]]]:
    """``n`` synthetic images as PNG bytes, each with its 2 captions."""
    cfg = SyntheticConfig(train_images=n, image_size=32, captions_per_image=2)
    plan = synth.plan_split(cfg, "train", None)
    out = []
    for i, attributes in enumerate(plan.attributes):
        buf = io.BytesIO()
        synth.draw(cfg, "train", i, attributes).save(buf, "PNG")
        out.append((buf.getvalue(), list(plan.captions[i])))
    return out


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(root: Path, samples: list[tuple[str, dict[str, bytes]]], per_tar: int) -> list[Path]:
    """(key, {extension: bytes}) samples written in order into tars of ``per_tar`` samples: root/00000.tar, ..."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, len(samples), per_tar):
        paths.append(root / f"{k // per_tar:05d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for key, members in samples[k:k + per_tar]:
                for ext, data in members.items():
                    add_member(tar, f"{key}.{ext}", data)
    return paths


def write_folder(root: Path, images: list[tuple[bytes, list[str]]]) -> Path:
    """The same images as an imagefolder (metadata.jsonl with captions lists)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (png, captions) in enumerate(images):
        (root / f"{i:06d}.png").write_bytes(png)
        rows.append({"file_name": f"{i:06d}.png", "captions": captions})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def embed_config(tiny_dir: Path, dataset: dict, cache_root: Path, **run) -> dict:
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    return {"dataset": dataset, "splits": ["train"], "image_encoder": encoder, "text_encoder": encoder,
            "batch_size": 32, "shard_size": 64, "device": "cpu", "cache_root": str(cache_root), **run}


def wds(pattern: Path | str, **fields) -> dict:
    return {"kind": "webdataset", "shards": str(pattern), "image_key": "png", "caption_key": "json:captions",
            **fields}


@pytest.fixture(scope="module")
def same_images(tmp_path_factory, tiny_dir) -> dict:
    """130 synthetic images written as 3 tar shards and as an image folder, each embedded once in this process."""
    root = tmp_path_factory.mktemp("wds")
    images = synthetic_pngs(N_IMAGES)
    samples = [(f"{i:06d}", {"png": png, "json": json.dumps({"captions": caps}).encode()})
               for i, (png, caps) in enumerate(images)]
    tars = write_tars(root / "shards", samples, PER_TAR)
    folder = write_folder(root / "folder", images)
    configs = {"folder": embed_config(tiny_dir, {"kind": "imagefolder", "path": str(folder)}, root / "cache-folder"),
               "wds": embed_config(tiny_dir, wds(root / "shards" / "{00000..00002}.tar"), root / "cache-wds")}
    paths = {}
    for name, cfg in configs.items():
        paths[name] = embed_split(EmbedConfig.model_validate(cfg), "train", progress=False, log=quiet)
    return {"root": root, "tars": tars, "images": images, "configs": configs, **paths}


def test_webdataset_and_imagefolder_of_the_same_images_give_byte_identical_arrays(same_images):
    for name in ARRAYS:
        assert (same_images["wds"] / name).read_bytes() == (same_images["folder"] / name).read_bytes(), name
    manifest = json.loads((same_images["wds"] / "manifest.json").read_text())
    assert manifest["counts"] == {"images": 130, "captions": 260, "skipped_images": 0, "dropped_captions": 0}
    assert manifest["dataset"]["tar_shards"] == 3 and manifest["skipped"] == []
    assert not (same_images["wds"] / "work").exists()


def test_dataloader_workers_reading_whole_tars_write_the_same_bytes(same_images, tmp_path):
    """Two DataLoader workers, each reading its own tars, interleave their blocks: the bytes stay the same."""
    cfg = EmbedConfig.model_validate({**same_images["configs"]["wds"], "num_workers": 2, "batch_size": 8,
                                      "cache_root": str(tmp_path / "cache")})
    path = embed_split(cfg, "train", progress=False, log=quiet)
    assert path.name == same_images["wds"].name
    for name in ARRAYS:
        assert (path / name).read_bytes() == (same_images["wds"] / name).read_bytes(), name


def test_the_cached_rows_are_the_models_own_embeddings_of_the_tar_images(same_images, tiny_dir):
    """Independent of the imagefolder path: open_clip run by hand on the first 64 images (one micro-batch)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_dir}")
    model.eval()
    with torch.no_grad():
        direct = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(png)).convert("RGB"))
                                                 for png, _ in same_images["images"][:64]]))
    cached = np.load(same_images["wds"] / "image.npy")[:64]
    np.testing.assert_allclose(cached, direct.numpy(), rtol=1e-5, atol=1e-5)


def test_the_key_follows_each_shards_name_size_and_mtime_or_its_content(same_images, tiny_dir, tmp_path):
    src = same_images["tars"]
    shards = tmp_path / "shards"
    shards.mkdir()
    for p in src[:2]:
        (shards / p.name).write_bytes(p.read_bytes())
    cfg = EmbedConfig.model_validate(embed_config(tiny_dir, wds(shards / "*.tar"), tmp_path / "cache"))
    hashed = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"content_hash": True})})
    key, key_hashed = cache_key(cfg, "train"), cache_key(hashed, "train")
    assert cache_key(cfg, "train") == key  # touching nothing keeps it
    st = (shards / "00000.tar").stat()
    os.utime(shards / "00000.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(cfg, "train") != key  # mtime
    assert cache_key(hashed, "train") == key_hashed  # the content did not change
    (shards / "00002.tar").write_bytes(src[2].read_bytes())
    assert cache_key(hashed, "train") != key_hashed  # a shard added
    (shards / "00002.tar").unlink()
    with open(shards / "00001.tar", "ab") as fh:
        fh.write(b"\0" * 512)
    assert cache_key(hashed, "train") != key_hashed  # content


def test_subset_sends_each_key_to_one_split_by_its_fractions_and_seed():
    spec = DatasetSpec.model_validate(wds("/nowhere/{0..9}.tar", subset={"train": 0.8, "val": 0.1, "test": 0.1}))
    source = spec.webdataset_source()
    keys = [f"{i:06d}" for i in range(5000)]
    member = {split: {k for k in keys if source.in_split(k, split)} for split in ("train", "val", "test")}
    assert sum(len(m) for m in member.values()) == len(keys) and set().union(*member.values()) == set(keys)
    for split, fraction in (("train", 0.8), ("val", 0.1), ("test", 0.1)):  # binomial: 4 standard deviations
        assert abs(len(member[split]) - fraction * 5000) < 4 * (5000 * fraction * (1 - fraction)) ** 0.5
    again = DatasetSpec.model_validate(wds("/x.tar", subset={"train": 0.8, "val": 0.1, "test": 0.1})).webdataset_source()
    assert {k for k in keys if again.in_split(k, "val")} == member["val"]
    other = DatasetSpec.model_validate(wds("/x.tar", subset={"train": 0.8, "val": 0.1, "test": 0.1},
                                           subset_seed=1)).webdataset_source()
    assert {k for k in keys if other.in_split(k, "val")} != member["val"]


def test_webdataset_fields_stay_out_of_other_kinds_dumps_and_misfits_are_refused():
    assert not {"shards", "image_key", "caption_key", "subset", "subset_seed", "content_hash"} \
        & set(DatasetSpec().model_dump())
    for bad, words in [({"max_images": 5}, "max_images"), ({"subset": {"train": 0.7, "test": 0.6}}, "sum"),
                       ({"shards": {"train": "/a.tar"}, "subset": {"train": 1.0}}, "one pattern")]:
        with pytest.raises(ValueError, match=words):
            DatasetSpec.model_validate({**wds("/a.tar"), **bad})
    with pytest.raises(ValueError, match="not used by kind"):
        DatasetSpec.model_validate({"kind": "imagefolder", "path": "/x", "shards": "/a.tar"})


def test_an_unfinished_webdataset_embed_is_recognised_as_its_keys_work(tmp_path):
    """`align cache rm`/`ls` know an embed's work/ by its plan; a tar plan must count as one."""
    key = "webdataset-train-0123456789abcdef"
    TarWorkFolder.freeze(tmp_path / key / "work", key, ["00000.tar", "00001.tar"], quiet)
    assert is_own_plan(tmp_path / key / "work", key)
    assert not is_own_plan(tmp_path / key / "work", "webdataset-train-fedcba9876543210")


# -- bad data ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory, same_images) -> dict:
    """Tar 0: 8 samples, of which #2's PNG does not decode, #4 has no caption, #6 repeats #1's key. Tar 1: 6
    samples truncated in the middle of its 5th sample's image."""
    root = tmp_path_factory.mktemp("bad-wds")
    images = same_images["images"]

    def sample(i: int, key: str | None = None, **members) -> tuple[str, dict]:
        png, caps = images[i]
        return key or f"s{i:03d}", members or {"png": png, "json": json.dumps({"captions": caps}).encode()}

    tar0 = [sample(0), sample(1), sample(2, png=b"\x89PNG\r\n\x1a\n not an image", json=b'{"captions": ["x"]}'),
            sample(3), sample(4, png=images[4][0]), sample(5), sample(6, key="s001"), sample(7)]
    (path0,) = write_tars(root / "shards", tar0, 8)
    (path1,) = write_tars(root / "t1", [sample(i) for i in range(10, 16)], 6)
    data = path1.read_bytes()
    cut = data.index(b"\x89PNG", data.index(b"s014.png"))  # inside s014's image data
    (root / "shards" / "00001.tar").write_bytes(data[:cut + 100])
    return {"root": root, "pattern": root / "shards" / "{00000..00001}.tar", "tar0": tar0}


def test_bad_samples_are_skipped_listed_in_the_manifest_and_counted_in_the_summary(bad_shards, tiny_dir, tmp_path):
    import open_clip

    lines: list[str] = []
    cfg = EmbedConfig.model_validate(embed_config(tiny_dir, wds(bad_shards["pattern"]), tmp_path / "cache"))
    path = embed_split(cfg, "train", progress=False, log=lines.append)
    manifest = json.loads((path / "manifest.json").read_text())
    skipped = {(d["index"], d["image_id"], d["kind"]) for d in manifest["skipped"]}
    # tar 0 rows 0..7; tar 1: s010..s012 (rows 8..10), then s013, the sample being read when the tar broke (it
    # may lack members), and the rest of the tar: one skipped row
    assert skipped == {(2, "s002", "image"), (4, "s004", "caption"), (6, "s001", "duplicate"),
                       (11, "s013", "damaged")}
    assert all(d["reason"] for d in manifest["skipped"])
    kept = [0, 1, 3, 5, 7, 8, 9, 10]
    assert np.load(path / "image_rows.npy").tolist() == kept
    assert manifest["counts"] == {"images": 8, "captions": 16, "skipped_images": 4, "dropped_captions": 1}
    assert np.load(path / "caption_to_image.npy").tolist() == [i // 2 for i in range(16)]
    assert np.load(path / "caption_rows.npy").tolist() == [r for r in range(17) if r not in (4,)]  # s002's one
    summary = [line for line in lines if "samples skipped" in line]
    assert summary and ("8 images, 16 captions, 4 samples skipped (1 without a readable image, 1 without a caption, "
                        "1 duplicate key, 1 damaged tar)") in summary[0]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_dir}")
    model.eval()
    pngs = [bad_shards["tar0"][i][1]["png"] for i in (0, 1, 3, 5, 7)]
    with torch.no_grad():
        direct = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]))
    np.testing.assert_allclose(np.load(path / "image.npy")[:5], direct.numpy(), rtol=1e-5, atol=1e-5)

    strict = cfg.model_copy(update={"strict": True, "cache_root": str(tmp_path / "strict")})
    with pytest.raises(AlignError, match=r"sample s002 of 00000.tar.*cannot decode.*drop --strict"):
        embed_split(strict, "train", progress=False, log=quiet)


def run_embed(tmp_path: Path, cfg: dict) -> tuple[int, list[str]]:
    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["embed", "--config", str(config), "--no-progress"], env={"COLUMNS": "300"})
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("case, expected", [
    ("missing shard", "webdataset shard {root}/shards/00002.tar not found"),
    ("empty glob", "webdataset shard pattern {root}/shards/*.tgz matches no file"),
    ("split without samples", "split 'train' has no samples in its 1 tar shard(s)"),
    ("split without a pattern", "webdataset shards have no pattern for split 'train'"),
])
def test_shard_pattern_problems_are_one_line_and_exit_2(bad_shards, tiny_dir, tmp_path, case, expected):
    root = bad_shards["root"]
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    shards = {"missing shard": root / "shards" / "{00000..00009}.tar", "empty glob": root / "shards" / "*.tgz",
              "split without samples": tmp_path / "empty.tar"}.get(case)
    dataset = wds(shards) if shards else {**wds("x"), "shards": {"test": str(root / "shards" / "00000.tar")}}
    code, lines = run_embed(tmp_path, embed_config(tiny_dir, dataset, tmp_path / "cache"))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and expected.format(root=root) in lines[0] and len(lines[0]) <= 307


# -- kill -9 and torchrun (slow) -------------------------------------------------------------------------------

WDS_KILLS = {
    "in the middle of tar 1 (its first micro-batch being encoded)": {"call": "align.data.encoders:ImageEncoder.encode",
                                                                     "nth": 2},
    "between tar 1's arrays and its record": {"replace": "tar-00001.json"},
    "during the final arrays": {"replace": "image.npy", "when": "after"},
}


@pytest.mark.slow
def test_a_webdataset_embed_killed_mid_tar_then_rerun_is_byte_identical(same_images, tmp_path):
    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump(same_images["configs"]["wds"]))

    def embed(cache: str, kill: dict | None = None) -> dict:
        return {"argv": ["embed", "--config", str(config), "--set", f"cache_root={tmp_path / cache}", "--no-progress"],
                "kill": kill}

    steps = [step for i, kill in enumerate(WDS_KILLS.values()) for step in (embed(f"kill{i}", kill), embed(f"kill{i}"))]
    outcomes = run_driver(tmp_path / "driver", steps, preload=["open_clip", "align.data.encoders", "webdataset"])
    ref = same_images["wds"]
    for i, name in enumerate(WDS_KILLS):
        killed, rerun = outcomes[2 * i], outcomes[2 * i + 1]
        assert killed["killed"], (name, killed["log"][-2000:])
        assert rerun["code"] == 0 and not rerun["killed"], (name, rerun["log"][-2000:])
        (got,) = (tmp_path / f"kill{i}").iterdir()
        assert got.name == ref.name and sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())
        for array in ARRAYS:
            assert (got / array).read_bytes() == (ref / array).read_bytes(), (name, array)
        if i < 2:  # tar 0 was finished before the kill and is not encoded again
            assert "resuming: 1/3 tar shards already done" in rerun["log"], rerun["log"][-2000:]


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_bytes_of_one_process(same_images, tmp_path):
    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump({**same_images["configs"]["wds"], "cache_root": str(tmp_path / "cache")}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--no-python", "align", "embed", "--config", str(config), "--no-progress"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (got,) = (tmp_path / "cache").iterdir()
    assert got.name == same_images["wds"].name
    for array in ARRAYS:
        assert (got / array).read_bytes() == (same_images["wds"] / array).read_bytes(), array
    manifest = json.loads((got / "manifest.json").read_text())
    assert manifest["run"]["ranks"] == 2 and "rank 1 of 2" in proc.stdout + proc.stderr


def test_reading_ahead_keeps_the_order_raises_a_read_error_in_its_place_and_stops_when_closed():
    """The tar reader's background thread (used without DataLoader workers) hands over every item in order, raises a
    read error after the items read before it, and ends its thread when the consumer stops early."""
    import threading

    from align.cache.tar_encode import read_ahead

    assert list(read_ahead(iter(range(1000)), 2)) == list(range(1000))

    def broken():
        yield from range(5)
        raise OSError("tar truncated")

    got = []
    with pytest.raises(OSError, match="tar truncated"):
        for item in read_ahead(broken(), 2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]

    before = {t.ident for t in threading.enumerate() if t.name == "tar-read-ahead"}
    stream = read_ahead(iter(range(10 ** 6)), 2)
    assert next(stream) == 0
    stream.close()  # the consumer stops (an error while encoding, --strict)
    for t in threading.enumerate():
        if t.name == "tar-read-ahead" and t.ident not in before:
            t.join(timeout=5)
            assert not t.is_alive()
