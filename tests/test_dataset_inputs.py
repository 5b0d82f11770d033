"""Local dataset inputs a user can get wrong: metadata that is not UTF-8, and image paths that leave the folder.

Each is one line naming the file (and the byte offset and line, or the row), through the loader and through
`align embed`; ``allow_outside_root: true`` reads outside paths on purpose, with the same values as a copy inside.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from align.cli.main import app
from align.common.config import validate
from align.data.datasets import DatasetSpec, load_image_caption_split
from align.common.errors import AlignError


def _png(path: Path, colour: tuple[int, int, int]) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((6, 9, 3), dtype=np.uint8)
    pixels[:] = colour
    pixels[0, 0] = (7, 7, 7)
    Image.fromarray(pixels).save(path)
    return pixels


def _spec(**kw) -> DatasetSpec:
    return validate(DatasetSpec, kw)


# ---------------------------------------------------------------- encodings

def _latin1_jsonl(root: Path) -> tuple[Path, int]:
    """metadata.jsonl whose third line holds 'café' in Latin-1 (byte 0xE9); returns the file and that byte's offset."""
    _png(root / "a.png", (200, 0, 0))
    lines = [json.dumps({"file_name": "a.png", "caption": "red"}).encode(),
             json.dumps({"file_name": "a.png", "caption": "dark red"}).encode(),
             b'{"file_name": "a.png", "caption": "caf\xe9 red"}']
    data = b"\n".join(lines) + b"\n"
    (root / "metadata.jsonl").write_bytes(data)
    return root / "metadata.jsonl", data.index(b"\xe9")


def test_non_utf8_metadata_jsonl_names_file_byte_and_line(tmp_path):
    path, offset = _latin1_jsonl(tmp_path)
    assert offset == len(b'{"file_name": "a.png", "caption": "red"}\n{"file_name": "a.png", "caption": "dark red"}\n'
                         b'{"file_name": "a.png", "caption": "caf')  # counted independently: 0-based byte index
    with pytest.raises(AlignError) as info:
        load_image_caption_split(_spec(kind="imagefolder", path=str(tmp_path)), "train")
    assert str(info.value) == (f"{path} is not UTF-8: byte {offset} (line 3) is b'\\xe9'; save the file as UTF-8")


def test_non_utf8_csv_names_file_byte_and_line_and_a_bom_is_fine(tmp_path):
    _png(tmp_path / "a.png", (0, 200, 0))
    good = "image,caption\na.png,green\na.png,grün\n".encode()
    (tmp_path / "rows.csv").write_bytes(b"\xef\xbb\xbf" + good)  # spreadsheet exports start with a BOM
    data = load_image_caption_split(_spec(kind="csv", path=str(tmp_path / "rows.csv")), "train")
    assert data.captions == ["green", "grün"]
    bad = b"\xef\xbb\xbfimage,caption\na.png,green\na.png,gr\xfcn\n"  # Latin-1 ü after the BOM
    (tmp_path / "rows.csv").write_bytes(bad)
    offset = len(b"\xef\xbb\xbfimage,caption\na.png,green\na.png,gr")  # the BOM counts: offsets are of the file
    with pytest.raises(AlignError) as info:
        load_image_caption_split(_spec(kind="csv", path=str(tmp_path / "rows.csv")), "train")
    assert str(info.value) == (f"{tmp_path / 'rows.csv'} is not UTF-8: byte {offset} (line 3) is b'\\xfc'; save the "
                               f"file as UTF-8")


# ---------------------------------------------------------------- paths outside the dataset folder

@pytest.fixture()
def outside(tmp_path: Path) -> dict:
    """root/ holds metadata; one image sits beside root/ (reached by ../ or an absolute path), one inside."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)  # so that sub/../../ resolves when it is allowed
    return {"root": root, "inside": _png(root / "in.png", (0, 0, 200)),
            "outside": _png(tmp_path / "secret.png", (9, 99, 199)), "abs": str(tmp_path / "secret.png")}


@pytest.mark.parametrize("kind", ["imagefolder", "csv"])
@pytest.mark.parametrize("where", ["../secret.png", "sub/../../secret.png", "ABSOLUTE"])
def test_image_paths_outside_the_folder_are_refused_unless_allowed(outside, kind, where):
    root = outside["root"]
    image = outside["abs"] if where == "ABSOLUTE" else where
    if kind == "imagefolder":
        (root / "metadata.jsonl").write_text(json.dumps({"file_name": "in.png", "caption": "blue"}) + "\n"
                                             + json.dumps({"file_name": image, "caption": "hidden"}) + "\n")
        spec, source, line = dict(kind="imagefolder", path=str(root)), root / "metadata.jsonl", 2
    else:
        (root / "rows.csv").write_text(f"image,caption\nin.png,blue\n{image},hidden\n")  # line 1 is the header
        spec, source, line = dict(kind="csv", path=str(root / "rows.csv")), root / "rows.csv", 3
    for call in (lambda: load_image_caption_split(_spec(**spec), "train"), lambda: _spec(**spec).identity("train")):
        with pytest.raises(AlignError) as info:
            call()
        assert str(info.value) == (f"{source} line {line}: image path {image!r} is outside the dataset folder: "
                                   f"move the image inside it, or set allow_outside_root: true in the dataset spec")
    data = load_image_caption_split(_spec(**spec, allow_outside_root=True), "train")
    assert data.captions == ["blue", "hidden"]
    assert np.array_equal(np.asarray(data.load_image(1)), outside["outside"])  # the file it names, read as is
    assert np.array_equal(np.asarray(data.load_image(0)), outside["inside"])


def test_inside_paths_load_alike_with_either_setting_and_keep_their_key(outside):
    root = outside["root"]
    _png(root / "sub" / "deep.png", (1, 2, 3))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "in.png", "caption": "blue"}) + "\n"
                                         + json.dumps({"file_name": "sub/./deep.png", "caption": "deep"}) + "\n"
                                         + json.dumps({"file_name": "sub/../in.png", "caption": "again"}) + "\n")
    plain = _spec(kind="imagefolder", path=str(root))
    allowed = _spec(kind="imagefolder", path=str(root), allow_outside_root=True)
    a, b = load_image_caption_split(plain, "train"), load_image_caption_split(allowed, "train")
    assert a.image_ids == b.image_ids == ["in.png", "sub/./deep.png", "sub/../in.png"]
    assert plain.identity("train") == allowed.identity("train")  # the option refuses or reads; it changes no value


def test_allow_outside_root_belongs_to_local_kinds_only():
    with pytest.raises(AlignError, match="'allow_outside_root' is not used by kind 'synthetic'"):
        _spec(kind="synthetic", allow_outside_root=True)
    assert _spec(kind="synthetic", allow_outside_root=False).kind == "synthetic"


# ---------------------------------------------------------------- through `align embed`: one line, exit 2

@pytest.mark.parametrize("case", ["latin1", "outside"])
def test_align_embed_reports_them_in_one_line(outside, tmp_path, case):
    root = outside["root"]
    if case == "latin1":
        source, _ = _latin1_jsonl(root)
        expected = f"{source} is not UTF-8"
    else:
        (root / "metadata.jsonl").write_text(json.dumps({"file_name": "../secret.png", "caption": "x"}) + "\n")
        expected = "line 1: image path '../secret.png' is outside the dataset folder"
    config = tmp_path / "embed.yaml"
    encoder = {"backend": "open_clip", "model": "ViT-S-32"}  # never built: the dataset is read first
    config.write_text(yaml.safe_dump({"dataset": {"kind": "imagefolder", "path": str(root)}, "splits": ["train"],
                                      "image_encoder": encoder, "text_encoder": encoder, "device": "cpu",
                                      "cache_root": str(tmp_path / "cache")}))
    result = CliRunner().invoke(app, ["embed", "--config", str(config), "--no-progress"], env={"COLUMNS": "300"})
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: ") and expected in lines[0] and len(lines[0]) <= 300 + len("error: ")
    assert not (tmp_path / "cache").exists()  # refused before anything was written
