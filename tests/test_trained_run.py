"""The Python API (`align.load_run`, `align.load_cache`) and `align search`, on a run trained offline: drawn shapes
with their captions in an image folder, embedded by a tiny random open_clip model, a linear head trained on them.

What `align eval` computes for the cached images and captions is the reference the API's embeddings of the same
files and captions must equal; `align search` is checked against a brute force over those features."""
from __future__ import annotations

import doctest
import json
import shutil
import subprocess
import sys
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
REPO = Path(__file__).resolve().parents[1]
SHAPES = [(colour, shape) for shape in ("circle", "square", "triangle") for colour in ("red", "blue", "green", "black")]


def draw(colour: str, shape: str, shift: int) -> Image.Image:
    image = Image.new("RGB", (48, 48), "white")
    pen = ImageDraw.Draw(image)
    box = (8 + shift, 8, 40, 40 - shift)
    if shape == "circle":
        pen.ellipse(box, colour)
    elif shape == "square":
        pen.rectangle(box, colour)
    else:
        pen.polygon([(24, 6 + shift), (6, 42), (42, 42)], colour)
    return image


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir) -> dict:
    """The photo folder, its cache (tiny open_clip, a copy of the weights this module may delete) and a run."""
    root = tmp_path_factory.mktemp("trained-run")
    folder = root / "shapes"
    folder.mkdir()
    captions = []
    for i, (colour, shape) in enumerate(SHAPES):
        draw(colour, shape, i % 3).save(folder / f"img{i:02d}.png")
        captions.append(f"a {colour} {shape} on white")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i:02d}.png", "caption": c}) + "\n"
                                                   for i, c in enumerate(captions)))
    weights = shutil.copytree(tiny_dir, root / "tiny-clip")
    encoder = {"backend": "open_clip", "model": f"local-dir:{weights}"}
    embed = {"dataset": {"kind": "imagefolder", "path": str(folder)}, "splits": ["train"], "image_encoder": encoder,
             "text_encoder": encoder, "device": "cpu", "cache_root": str(root / "cache")}
    train = {"data": embed, "device": "cpu", "head": {"out_dim": 8}, "optim": {"name": "adamw", "lr": 1e-2},
             "schedule": {"steps": 6, "batch_size": 4, "warmup_steps": 1}, "checkpoint_every": 3, "loss_at_step": 2,
             "eval": {"every": 3, "holdout_images": 4, "test_split": None, "knn_k": 2, "ks": [1],
                      "sharpness": False, "backend": "torch"}}
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    result = runner.invoke(app, ["embed", "--config", str(root / "train.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--config", str(root / "train.yaml"), "--out", str(root / "run"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    return {"root": root, "folder": folder, "captions": captions, "run": root / "run", "weights": weights,
            "cache": next((root / "cache").iterdir())}


def eval_features(run: Path, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The head features `align eval RUN --split train --gallery` computes for the cached images and captions."""
    from align.eval import evaluate

    seen = []
    real = evaluate._head_features
    monkeypatch.setattr(evaluate, "_head_features", lambda *a: seen.append(real(*a)) or seen[-1])
    result = runner.invoke(app, ["eval", str(run), "--split", "train", "--backend", "torch",
                                 "--gallery", str(run.parent / "eval-gallery.png")])
    assert result.exit_code == 0, result.output
    (features,) = seen
    return features


def test_load_run_embeds_images_and_captions_as_align_eval_does(trained, monkeypatch):
    """The API embeds the folder's files and captions from scratch (encoders, cache's micro-batches, head); `align
    eval` reads the cached embeddings: the features agree to 1e-6, row by row in the cache's order."""
    import align
    from align.cache.read import source_rows

    image_ref, text_ref = eval_features(trained["run"], monkeypatch)
    image_rows, caption_rows = source_rows(trained["cache"])
    files = [trained["folder"] / f"img{int(r):02d}.png" for r in image_rows]
    run = align.load_run(trained["run"])
    images = run.encode_images(files)
    texts = run.encode_texts([trained["captions"][int(r)] for r in caption_rows])
    assert images.shape == image_ref.shape == (len(SHAPES), 8) and texts.shape == text_ref.shape
    assert torch.allclose(images, image_ref, rtol=0, atol=1e-6)
    assert torch.allclose(texts, text_ref, rtol=0, atol=1e-6)
    assert torch.allclose(images.norm(dim=1), torch.ones(len(files)), atol=1e-5)  # L2-normalised
    pil = run.encode_images([Image.open(f) for f in files[:2]])  # PIL images give the same rows as their files
    assert torch.allclose(pil, images[:2], rtol=0, atol=1e-6)
    assert run.checkpoint["checkpoint"] == "best" and run.checkpoint["step"] in (3, 6)


def test_the_docstring_example_runs(trained):
    from align.eval import trained as api

    finder, runner_ = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    globs = {"run_dir": trained["run"], "photo_paths": sorted(trained["folder"].glob("*.png"))}
    (test,) = [t for t in finder.find(api.load_run, "load_run", globs=globs) if t.examples]
    result = runner_.run(test)
    assert result.failed == 0 and result.attempted == 6


def test_load_cache_gives_the_verified_arrays_by_key_or_folder(trained):
    import align

    by_folder = align.load_cache(trained["cache"])
    by_key = align.load_cache(trained["cache"].name[:12], root=trained["root"] / "cache")
    stored = np.load(trained["cache"] / "image.npy")
    assert by_folder.image.mapped and by_key.text.mapped  # memory-mapped, not copied
    assert np.array_equal(by_folder.image.to_tensor().numpy(), stored)
    assert np.array_equal(by_key.text.to_tensor().numpy(), np.load(trained["cache"] / "text.npy"))
    assert by_key.meta["key"] == trained["cache"].name


def test_import_align_loads_no_torch_until_the_api_is_used():
    code = ("import sys, align; light = 'torch' not in sys.modules; f = align.load_run; "
            "import align.eval.trained as t; print(light, f is t.load_run, 'torch' in sys.modules, "
            "align.AlignError.__module__, sorted(align.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(None, 4)[:4] == ["True", "True", "True", "align.common.errors"]
    import align

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        align.no_such_name  # noqa: B018


def test_raw_embeddings_of_the_wrong_width_are_one_alignerror_line(trained):
    import align

    run = align.load_run(trained["run"])
    dim = run.config.text_dim
    with pytest.raises(align.AlignError, match=rf"the text head takes \(N, {dim}\) embeddings, got \(3, {dim + 1}\)"):
        run.project_texts(torch.zeros(3, dim + 1))
    with pytest.raises(align.AlignError, match="2-D"):
        run.project_texts(torch.zeros(dim))


def test_a_run_without_a_checkpoint_is_the_clis_one_line(tmp_path, trained):
    import align
    from align.common.errors import AlignError

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained["run"] / "config.yaml", bare / "config.yaml")  # a run that never validated
    with pytest.raises(AlignError) as info:
        align.load_run(bare)
    message = str(info.value)
    assert "has no best checkpoint" in message and "\n" not in message
    result = runner.invoke(app, ["eval", str(bare)])  # the command line says the same
    assert result.exit_code == 2 and "has no best checkpoint" in result.output
    with pytest.raises(AlignError, match="is not a run directory"):
        align.load_run(tmp_path)


def test_encoder_weights_not_on_this_machine_are_one_alignerror_line(trained, tmp_path):
    import align
    from align.common.errors import AlignError

    run = tmp_path / "moved"
    shutil.copytree(trained["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["image_encoder"]["model"] = config["data"]["text_encoder"]["model"] = \
        f"local-dir:{tmp_path / 'gone'}"  # weights that are not on this machine
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = align.load_run(run)  # the head alone loads; the encoders are built on first use
    with pytest.raises(AlignError) as info:
        loaded.encode_texts(["a red circle"])
    assert "has no open_clip_config.json" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AlignError, match="list of strings"):
        loaded.encode_texts(["a red circle", 3])


def brute_force(features: torch.Tensor, query: torch.Tensor, k: int) -> list[tuple[int, float]]:
    cosine = (query.double() @ features.double().T).tolist()
    order = sorted(range(len(cosine)), key=lambda j: (-cosine[j], j))[:k]
    return [(j, cosine[j]) for j in order]


def test_search_a_folder_prints_the_top_k_by_cosine_and_draws_them(trained, monkeypatch, tmp_path):
    import align
    from align.eval import search as search_module

    drawn = []
    real = search_module.gallery_figure
    monkeypatch.setattr(search_module, "gallery_figure", lambda p, rows, title: drawn.append(rows) or real(p, rows,
                                                                                                        title))
    out = tmp_path / "search.png"
    result = runner.invoke(app, ["search", str(trained["run"]), "--text", "a red circle", "--text", "a blue square",
                                 "--images", str(trained["folder"]), "-k", "3", "--gallery", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    run = align.load_run(trained["run"])
    files = sorted(trained["folder"].glob("*.png"))
    features = run.encode_images(files)
    for q, text in enumerate(["a red circle", "a blue square"]):
        expected = brute_force(features, run.encode_texts([text])[0], 3)
        hits = drawn[0][q]["hits"]
        assert [h["score"] for h in hits] == pytest.approx([s for _, s in expected], abs=1e-5)
        for hit, (j, score) in zip(hits, expected):
            assert np.array_equal(np.asarray(hit["image"]), np.asarray(Image.open(files[j]).convert("RGB")))
            assert f"{score:.4f}" in result.output and files[j].name in result.output
    with Image.open(out) as png:
        assert png.format == "PNG"


def test_search_a_cache_ranks_its_rows_through_the_head(trained, monkeypatch):
    from align.eval.search import search

    image_ref, _ = eval_features(trained["run"], monkeypatch)
    rows = search(trained["run"], ["a green triangle"], cache=trained["cache"], k=4)
    import align

    query = align.load_run(trained["run"]).encode_texts(["a green triangle"])[0]
    expected = brute_force(image_ref, query, 4)
    assert [(h["row"], round(h["score"], 5)) for h in rows[0]["hits"]] == [(j, round(s, 5)) for j, s in expected]
    assert all(h["image"].startswith("img") for h in rows[0]["hits"])  # the source's image ids


@pytest.mark.parametrize("args, says", [
    ([], "give either --images FOLDER"),
    (["--images", "IMAGES", "--cache", "CACHE"], "give either --images FOLDER"),
    (["--images", "IMAGES", "-k", "0"], "-k must be a whole number >= 1"),
    (["--images", "NOWHERE"], "is not a folder of images"),
    (["--images", "EMPTY"], "holds no image files"),
    (["--cache", "no-such-key"], "no-such-key"),
])
def test_bad_search_input_is_one_line_and_exit_2(trained, tmp_path, args, says):
    (tmp_path / "empty").mkdir()
    fill = {"IMAGES": str(trained["folder"]), "CACHE": str(trained["cache"]), "NOWHERE": str(tmp_path / "none"),
            "EMPTY": str(tmp_path / "empty")}
    argv = ["search", str(trained["run"]), "--text", "a red circle", *[fill.get(a, a) for a in args]]
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], result.output


@pytest.mark.slow
def test_search_works_on_the_offline_default_run(tmp_path, monkeypatch):
    """The README's offline default (`align embed` + `align train` of train/synthetic_msam), then `align search`
    over its test cache: the top 5 equal a brute force through `align.load_run`, and captions of test images
    find their own image about as often as the run's own test R@5 says."""
    pytest.importorskip("efficientnet_lite_pytorch")
    import align
    from align.cache.read import source_rows
    from align.data.datasets import load_image_caption_split

    monkeypatch.setenv("ALIGN_HOME", str(tmp_path))
    for command in ("embed", "train"):
        result = runner.invoke(app, [command, "--config", "train/synthetic_msam", "--no-progress"])
        assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "synthetic_msam"
    out = tmp_path / "search.png"
    result = runner.invoke(app, ["search", str(run_dir), "--text", "a red circle", "--cache", "synthetic-test",
                                 "-k", "5", "--gallery", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    with Image.open(out) as png:
        assert png.format == "PNG"
    run = align.load_run(run_dir)
    cache = next((tmp_path / "cache").glob("synthetic-test-*"))
    images = run.project_images(align.load_cache(cache).image)
    expected = brute_force(images, run.encode_texts(["a red circle"])[0], 5)
    for _, score in expected:
        assert f"{score:.4f}" in result.output
    from align.eval.search import search

    data = load_image_caption_split(run.config.data.dataset, "test")
    image_rows, _ = source_rows(cache)
    picks = list(range(0, len(image_rows), 15))
    texts = [data.captions_of(int(image_rows[i]))[0] for i in picks]
    rows = search(run_dir, texts, cache=cache, k=5)
    found = np.mean([i in [h["row"] for h in row["hits"]] for i, row in zip(picks, rows)])
    r5 = json.loads((run_dir / "results.json").read_text())["best_test"]["t2i_R@5"]
    print(f"own image in the top 5: {found:.2f} of {len(picks)} captions; test t2i R@5 {r5:.2f}")
    assert found >= min(0.5, r5 - 0.25)
