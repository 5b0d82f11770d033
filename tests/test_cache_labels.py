"""Labelled caches (mnist): labels and per-template prompt embeddings stored at embed time and checked like the rest;
caches without them (every cache made before) still load; `align eval --cache` reports raw zero-shot and draws the
confusion matrix and the retrieval gallery. A tiny random open_clip model encodes (equal widths: a shared space)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from align.cache import key as cache_keys, read as cache_read, store as cache_store, write as cache_write
from align.cli.main import app
from align.common.errors import AlignError

pytest.importorskip("mlxtend")
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_dir) -> tuple[Path, cache_keys.EmbedConfig]:
    root = tmp_path_factory.mktemp("labelled")
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    cfg = cache_keys.EmbedConfig.model_validate({
        "dataset": {"kind": "mnist", "mnist": {"train_per_class": 1, "val_per_class": 1, "test_per_class": 3,
                                               "captions_per_image": 2}},
        "splits": ["test"], "image_encoder": encoder, "text_encoder": encoder, "device": "cpu",
        "cache_root": str(root / "cache")})
    return cache_write.embed_split(cfg, "test", progress=False, log=lambda m: None), cfg


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_labels_and_prompt_embeddings_are_the_datasets_and_the_text_towers(labelled):
    from align.data.datasets import load_image_caption_split
    from align.data.encoders import build_text_encoder

    folder, cfg = labelled
    data = load_image_caption_split(cfg.dataset, "test")
    paired = cache_read.load_cache_dir(folder)
    assert paired.labelled and paired.labels.tolist() == data.labels.tolist()
    assert paired.class_names == list(data.class_names) and paired.class_text.shape == (10, 5, 16)
    prompts = [p for per_class in data.prompts for p in per_class]
    direct = build_text_encoder(cfg.text_encoder, "cpu").encode(prompts)  # one batch of 50, as the cache's
    assert torch.equal(paired.class_text.reshape(50, 16), direct)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["classes"]["templates"] == cfg.dataset.mnist.prompt_templates
    assert cache_store.verify_cache(folder) == []


def _bad_label(folder: Path) -> None:
    labels = np.load(folder / "labels.npy")
    labels[2] = 10
    np.save(folder / "labels.npy", labels)  # same size and header: only a value is wrong


def _nan_prompt(folder: Path) -> None:
    prompts = np.load(folder / "class_text.npy")
    prompts[7, 0] = np.nan
    np.save(folder / "class_text.npy", prompts)


def _edit(change):
    def run(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.mark.parametrize("damage, phrase", [
    (_bad_label, "labels.npy row 2 is class 10, outside the 10 classes"),
    (_nan_prompt, "class_text.npy has 1 row(s) with NaN"),
    (_edit(lambda m: m.pop("classes")), "a labelled cache needs 'classes'"),
    (_edit(lambda m: m["classes"].update(templates=m["classes"]["templates"][:4])), "expected [40, 16]"),
    (lambda f: (f / "labels.npy").unlink(), "labels.npy is missing"),
    (_edit(lambda m: m["files"].pop("class_text.npy")), "'files' is not a cache's set of arrays"),
])
def test_damaged_label_arrays_are_one_line(labelled, tmp_path, damage, phrase):
    folder = _copy(labelled[0], tmp_path)
    damage(folder)
    with pytest.raises(AlignError) as info:
        cache_read.load_cache_dir(folder)
    assert phrase in str(info.value) and "\n" not in str(info.value) and "damaged cache" in str(info.value)
    result = runner.invoke(app, ["cache", "verify", folder.name, "--root", str(folder.parent)])
    assert result.exit_code == 2 and phrase in " ".join(result.output.split()), result.output


def test_a_cache_without_labels_loads_as_before(labelled, tmp_path):
    folder = _copy(labelled[0], tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in cache_keys.LABEL_ARRAYS:
        (folder / name).unlink()
        manifest["files"].pop(name)
    manifest.pop("classes")
    (folder / "manifest.json").write_text(json.dumps(manifest))  # exactly the layout caches had before labels
    paired = cache_read.load_cache_dir(folder)
    assert not paired.labelled and paired.num_images == 30
    result = runner.invoke(app, ["eval", "--cache", str(folder), "--knn-k", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "zeroshot" not in result.output, result.output


def test_eval_cache_reports_raw_zero_shot_and_draws_confusion_and_gallery(labelled, tmp_path):
    folder, _ = labelled
    out, gallery = tmp_path / "raw.json", tmp_path / "figs" / "gallery.png"
    result = runner.invoke(app, ["eval", "--cache", str(folder), "--knn-k", "2", "--out", str(out),
                                 "--gallery", str(gallery)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    paired = cache_read.load_cache_dir(folder)
    sims = torch.nn.functional.normalize(paired.image.to_tensor(), dim=1) @ torch.nn.functional.normalize(
        torch.nn.functional.normalize(paired.class_text, dim=-1).mean(1), dim=1).T
    assert record["metrics"]["zeroshot_top1"] == pytest.approx(float((sims.argmax(1) == paired.labels).double().mean()))
    assert np.array(record["zeroshot"]["confusion"]).sum() == 30 and "zeroshot_top5" in result.output
    for png in (gallery, tmp_path / "raw-confusion.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 200
