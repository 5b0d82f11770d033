"""`align eval --gallery` on real photos: scikit-image's bundled photos with their docstring captions, written to an
image folder at test time (never committed; drawn images stand in when scikit-image is not installed), embedded by
a tiny random open_clip model, then the gallery of raw-encoder similarities. Its rows are checked against a brute
force over the cached embeddings and the image files themselves."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from align.cli.main import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text", "horse", "cell")


def _as_rgb(array: np.ndarray) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(np.ptp(array)), 1e-9)).astype(np.uint8)
    image = Image.fromarray(array)
    return image.convert("RGB")


def photos() -> list[tuple[Image.Image, str]]:
    """(photo, caption): scikit-image's bundled photos and the first line of their docstrings, else drawn shapes."""
    try:
        import skimage.data
    except ImportError:
        drawn = []
        for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle"),
                                             ("orange", "square"), ("purple", "circle"), ("black", "square")]):
            image = Image.new("RGB", (64, 64), "white")
            box = (12 + i, 12, 52, 52 - i)
            (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, colour)
            drawn.append((image, f"a {colour} {shape} on white"))
        return drawn
    out = []
    for name in PHOTOS:
        load = getattr(skimage.data, name)
        out.append((_as_rgb(load()), load.__doc__.strip().splitlines()[0].rstrip(".")))
    return out


@pytest.fixture(scope="module")
def photo_cache(tmp_path_factory, tiny_dir) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    folder = root / "photos"
    folder.mkdir()
    rows = []
    for i, (image, caption) in enumerate(photos()):
        image.thumbnail((96, 96))  # small files: the encoder resizes anyway
        image.save(folder / f"photo{i:02d}.png")
        rows.append(json.dumps({"file_name": f"photo{i:02d}.png", "caption": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    config = root / "embed.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"kind": "imagefolder", "path": str(folder)}, "splits": ["train"],
                                      "image_encoder": encoder, "text_encoder": encoder, "device": "cpu",
                                      "cache_root": str(root / "cache")}))
    result = runner.invoke(app, ["embed", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    return next((root / "cache").iterdir())


def test_gallery_rows_are_the_top_images_by_cosine_and_the_png_is_written(photo_cache, tmp_path, monkeypatch):
    from align.cache.read import load_cache_dir
    from align.eval import evaluate

    seen: list = []
    real = evaluate.gallery_figure
    monkeypatch.setattr(evaluate, "gallery_figure", lambda path, rows, title: seen.append(rows) or real(path, rows,
                                                                                                           title))
    out = tmp_path / "gallery.png"
    result = runner.invoke(app, ["eval", "--cache", str(photo_cache), "--knn-k", "2", "--gallery", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 500 and png.size[1] > 400

    paired = load_cache_dir(photo_cache)
    captions = [json.loads(line)["caption"] for line in (photo_cache.parent.parent / "photos" / "metadata.jsonl")
                .read_text().splitlines()]
    img = torch.nn.functional.normalize(paired.image.to_tensor().double(), dim=1)
    txt = torch.nn.functional.normalize(paired.text.to_tensor().double(), dim=1)
    (rows,) = seen
    assert len(rows) == 4
    for row in rows:
        query = captions.index(row["text"])  # one caption per photo: caption k describes photo k
        cosine = (txt[query] @ img.T).numpy()
        ranked = sorted(range(len(cosine)), key=lambda j: (-cosine[j], j))[:5]
        assert [h["score"] for h in row["hits"]] == pytest.approx([cosine[j] for j in ranked], abs=1e-5)
        assert [h["own"] for h in row["hits"]] == [j == query for j in ranked]
        for hit, j in zip(row["hits"], ranked):
            with Image.open(photo_cache.parent.parent / "photos" / f"photo{j:02d}.png") as source:
                assert np.array_equal(np.asarray(hit["image"]), np.asarray(source.convert("RGB")))


def test_a_raw_gallery_needs_a_shared_space(tmp_path):
    from align.common.errors import AlignError
    from align.eval.evaluate import evaluate_cache
    from helpers import make_cache

    make_cache(tmp_path)  # image and text embeddings of different widths, no encoder needed
    folder = next(p for p in tmp_path.iterdir() if p.name.startswith("synthetic-val"))
    with pytest.raises(AlignError, match="no common space without a head") as info:
        evaluate_cache(folder, gallery=tmp_path / "g.png", knn_k=2)
    assert "\n" not in str(info.value) and not (tmp_path / "g.png").exists()


def test_a_runs_heads_on_another_cache_of_its_encoders(photo_cache, tmp_path):
    """A head trained elsewhere (here on random 16-d pairs) applied to the photos: its gallery and its record."""
    from align.cache.embeddings import PairedEmbeddings
    from align.train.run_data import RunData
    from align.train.loop import train_pack
    from align.train.config import TrainConfig

    embed = yaml.safe_load((photo_cache.parent.parent / "embed.yaml").read_text())
    cfg = TrainConfig.model_validate({
        "data": embed, "device": "cpu", "head": {"out_dim": 8}, "schedule": {"steps": 4, "batch_size": 8,
                                                                             "warmup_steps": 1},
        "eval": {"every": 4, "knn_k": 2, "ks": [1], "test_split": None, "sharpness": False, "backend": "torch"},
        "loss_at_step": 2, "checkpoint_every": 4})
    rng = torch.Generator().manual_seed(0)
    pairs = PairedEmbeddings(torch.randn(24, 16, generator=rng), torch.randn(24, 16, generator=rng), torch.arange(24))
    train_pack([cfg], [tmp_path / "run"], data=RunData(train=pairs, val=pairs, test=None), progress=False)
    out = tmp_path / "after.png"
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--cache", str(photo_cache), "--knn-k", "2",
                                 "--gallery", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "eval" / f"cache-{photo_cache.name}-best.json").read_text())
    assert record["num_images"] == len(photos()) and "i2t_R@1" in record["metrics"]
    with Image.open(out) as png:
        assert png.format == "PNG"

    other = dict(embed, image_encoder={"backend": "open_clip", "model": "ViT-S-32"})
    cfg2 = cfg.model_copy(update={"data": cfg.data.model_validate(other)})
    train_pack([cfg2], [tmp_path / "run2"], data=RunData(train=pairs, val=pairs, test=None), progress=False)
    result = runner.invoke(app, ["eval", str(tmp_path / "run2"), "--cache", str(photo_cache)])
    assert result.exit_code == 2 and "embed that set with the run's encoders" in result.output, result.output
