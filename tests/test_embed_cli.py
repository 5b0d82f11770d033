"""`align embed` and `align cache ls|info|verify|rm` through the real typer app; every embed YAML validates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from align.cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _embed_section(tiny_dir: Path, root: Path) -> dict:
    return {"dataset": {"kind": "synthetic",
                        "synthetic": {"train_images": 6, "val_images": 4, "test_images": 4, "image_size": 32,
                                      "captions_per_image": 2}},
            "splits": ["train", "val"],
            "image_encoder": {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"},
            "text_encoder": {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"},
            "batch_size": 4, "shard_size": 4, "device": "cpu", "cache_root": str(root)}


def _run(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_embed_then_cache_ls_info_verify_rm(tiny_dir, tmp_path):
    root = tmp_path / "cache"
    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump(_embed_section(tiny_dir, root)))
    code, out = _run("embed", "--config", str(config), "--no-progress", "--set", "storage_dtype=float16")
    assert code == 0, out
    assert "throughput" in out and "embedding cache" in out
    keys = sorted(p.name for p in root.iterdir())
    assert len(keys) == 2 and {k.split("-")[1] for k in keys} == {"train", "val"}
    assert json.loads((root / keys[0] / "manifest.json").read_text())["storage_dtype"] == "float16"

    code, out = _run("cache", "ls", "--root", str(root))
    assert code == 0, out
    for text in ("key", "size", "6 images", "12 captions", "0 skipped", "encoders", "dataset", keys[0], keys[1],
                 "float16", f"open_clip:local-dir:{tiny_dir}", "synthetic"):
        assert text in out, text
    code, out = _run("cache", "info", keys[0][:20], "--root", str(root))  # a unique prefix is enough
    assert code == 0 and "6 images, 12 captions" in out and "float16" in out, out
    manifest = json.loads((root / keys[0] / "manifest.json").read_text())
    assert manifest["files"]["image.npy"]["sha256"] in out

    code, out = _run("cache", "verify", keys[0], "--root", str(root))
    assert code == 0 and "ok:" in out, out
    text = root / keys[0] / "text.npy"
    data = bytearray(text.read_bytes())
    data[-1] ^= 0x40
    text.write_bytes(bytes(data))
    code, out = _run("cache", "verify", keys[0], "--root", str(root))
    assert code == 2 and "text.npy differs from its sha256" in out and f"damaged cache {keys[0]}:" in out, out
    assert f"`align cache rm {keys[0]} --root {root}`" in out, out

    code, out = _run("cache", "rm", keys[0], "--root", str(root))
    assert code == 0 and not (root / keys[0]).exists(), out
    code, out = _run("cache", "info", keys[0], "--root", str(root))
    assert code == 2 and "no cache" in out


def test_embed_reads_a_data_section_and_one_split(tiny_dir, tmp_path):
    root = tmp_path / "cache"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": _embed_section(tiny_dir, root), "train": {"steps": 3}}))
    code, out = _run("embed", "-c", str(config), "--split", "val", "--no-progress", "--set", "data.batch_size=2")
    assert code == 0, out
    assert [p.name.split("-")[1] for p in root.iterdir()] == ["val"]
    code, out = _run("embed", "-c", str(config), "--split", "val", "--no-progress")
    assert code == 0 and "cached" in out  # the same key: batch size is not part of it
    code, out = _run("embed", "-c", str(config), "--set", "batch_size=2")
    assert code == 2 and "use --set data.batch_size=2" in out, out


def test_embed_strict_fails_on_a_corrupt_image_with_exit_2(tiny_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png at all")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "good.png", "caption": "a red square"}) + "\n"
                                           + json.dumps({"file_name": "bad.png", "caption": "broken"}) + "\n")
    section = _embed_section(tiny_dir, tmp_path / "cache")
    section.update(dataset={"kind": "imagefolder", "path": str(folder)}, splits=["train"])
    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump(section))
    code, out = _run("embed", "--config", str(config), "--strict", "--no-progress")
    assert code == 2 and "bad.png" in out and "unreadable" in out, out
    assert "Traceback" not in out
    code, out = _run("embed", "--config", str(config), "--no-progress")
    assert code == 0 and "1 unreadable images skipped" in out, out


def test_bad_config_is_one_line(tmp_path):
    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"kind": "synthetic"}, "image_encoder": {"backend": "open_clip",
                                      "model": "ViT-S-32"}, "text_encoder": {"backend": "open_clip",
                                      "model": "ViT-S-32"}, "batchsize": 3}))
    code, out = _run("embed", "--config", str(config))
    assert code == 2 and "unknown key 'batchsize'" in out and "batch_size" in out, out


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "embed").glob("*.yaml")), ids=lambda p: p.name)
def test_every_embed_config_validates_and_names_its_command(path, monkeypatch):
    from align.cache.key import load_embed_config

    first = path.read_text().splitlines()[0]
    assert first == f"# align embed --config configs/embed/{path.name}"
    monkeypatch.delenv("ALIGN_HOME", raising=False)
    assert load_embed_config(path).cache_root == "data/cache"  # no config pins it: the data root decides
    monkeypatch.setenv("ALIGN_HOME", "/somewhere/else")
    cfg = load_embed_config(path)
    assert cfg.splits and cfg.cache_root == "/somewhere/else/cache"


def test_the_offline_default_is_the_documented_pair():
    from align.cache.key import load_embed_config

    cfg = load_embed_config(REPO / "configs" / "embed" / "synthetic_offline.yaml")
    assert (cfg.image_encoder.backend, cfg.image_encoder.image_size, cfg.text_encoder.backend) == \
        ("efficientnet_lite", 160, "minilm")
    assert cfg.dataset.kind == "synthetic" and cfg.dataset.synthetic.test_images >= 300
