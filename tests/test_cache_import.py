"""`align cache import`: a verified cache from embeddings made elsewhere (a plain pair of .npy files, or a
clip-retrieval output folder), streamed in bounded memory, keyed by what determines its bytes; bad input is one
line and exit 2 leaving nothing behind. Expected bytes come from numpy in the test, hashes from hashlib."""
from __future__ import annotations

import hashlib
import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from align.cache import work as cache_work
from align.cache.importing import import_cache, open_source
from align.cache.read import check_cache, load_cache_dir
from align.cache.store import list_caches, remove_cache
from align.cli.main import app
from faults import one_error_line
from helpers import data_section, synthetic_split, write_cache

runner = CliRunner()
ENCODERS = ["--image-encoder", "vit-b-32 (elsewhere)", "--text-encoder", "vit-b-32 text"]


def saved(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_key(name: str, split: str, image: bytes, text: bytes, c2i: bytes, encoders: tuple[str, str]) -> str:
    """The key, computed here: what determines the bytes (the three files' sha256, the encoders, the split)."""
    identity = {"format": 1, "kind": "imported", "split": split,
                "encoders": {"image": encoders[0], "text": encoders[1]},
                "sha256": {"image.npy": sha(image), "text.npy": sha(text), "caption_to_image.npy": sha(c2i)}}
    payload = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return f"{name}-{split}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def import_pair(root: Path, image: Path, text: Path, *extra: str, name: str = "mine"):
    return runner.invoke(app, ["cache", "import", "--image", str(image), "--text", str(text), "--name", name,
                               "--root", str(root), "--no-progress", *ENCODERS, *extra])


# -- round trips and keys ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_importing_a_caches_own_arrays_gives_identical_bytes_and_the_hashed_key(tmp_path, dtype):
    image, text, c2i = synthetic_split("train", 300)
    own = write_cache(data_section(tmp_path / "own"), "train", image.astype(dtype), text.astype(dtype), c2i)
    root = tmp_path / "cache"
    result = import_pair(root, own / "image.npy", own / "text.npy", "--pairs", str(own / "caption_to_image.npy"))
    assert result.exit_code == 0, result.output
    raw = {name: (own / name).read_bytes() for name in ("image.npy", "text.npy", "caption_to_image.npy")}
    key = expected_key("mine", "train", raw["image.npy"], raw["text.npy"], raw["caption_to_image.npy"],
                       ("vit-b-32 (elsewhere)", "vit-b-32 text"))
    (folder,) = root.iterdir()
    assert folder.name == key
    for name, data in raw.items():
        assert (folder / name).read_bytes() == data, name
    assert (folder / "image_rows.npy").read_bytes() == saved(np.arange(300, dtype=np.int64))
    assert (folder / "caption_rows.npy").read_bytes() == saved(np.arange(len(c2i), dtype=np.int64))
    manifest = check_cache(folder, rehash=True)  # everything a load checks, every file re-hashed
    assert manifest["files"]["text.npy"]["sha256"] == sha(raw["text.npy"])
    assert manifest["counts"] == {"images": 300, "captions": len(c2i), "skipped_images": 0, "dropped_captions": 0}
    assert manifest["encoders"] == {"image": "vit-b-32 (elsewhere)", "text": "vit-b-32 text"}
    assert manifest["storage_dtype"] == dtype and manifest["dataset"]["kind"] == "imported"
    paired = load_cache_dir(folder)
    assert np.array_equal(paired.image.to_tensor().numpy(), image.astype(dtype).astype(np.float32))
    assert paired.caption_to_image.tolist() == c2i.tolist()


def test_equal_inputs_give_an_equal_key_and_a_changed_value_another(tmp_path):
    image, text, _ = synthetic_split("val", 50, captions=1)
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "t.npy", text[:50])
    first = import_pair(tmp_path / "a", tmp_path / "i.npy", tmp_path / "t.npy")
    second = import_pair(tmp_path / "b", tmp_path / "i.npy", tmp_path / "t.npy")
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    (a,), (b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert a.name == b.name
    again = import_pair(tmp_path / "a", tmp_path / "i.npy", tmp_path / "t.npy")  # the same cache: kept as it is
    assert again.exit_code == 0 and "already imported" in again.output, again.output
    image[7, 3] += 1.0
    np.save(tmp_path / "i.npy", image)
    other = import_pair(tmp_path / "c", tmp_path / "i.npy", tmp_path / "t.npy")
    assert other.exit_code == 0 and next((tmp_path / "c").iterdir()).name != a.name
    # another cache under a name that exists: refused, the first one left as it was
    line = one_error_line(import_pair(tmp_path / "a", tmp_path / "i.npy", tmp_path / "t.npy"))
    assert f"a different cache named mine for split train is under {tmp_path / 'a'} ({a.name})" in line
    assert [p.name for p in (tmp_path / "a").iterdir()] == [a.name]
    check_cache(a, rehash=True)


def test_an_imported_cache_is_listed_verified_and_removed_like_any_cache(tmp_path):
    image, text, _ = synthetic_split("test", 40, captions=1)
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "t.npy", text[:40])
    assert import_pair(tmp_path / "cache", tmp_path / "i.npy", tmp_path / "t.npy", "--split", "test").exit_code == 0
    (entry,) = list_caches(tmp_path / "cache")
    assert entry["status"] == "ok" and entry["images"] == 40 and entry["split"] == "test"
    assert entry["key"].startswith("mine-test-")
    verified = runner.invoke(app, ["cache", "verify", "mine-test", "--root", str(tmp_path / "cache")])
    assert verified.exit_code == 0 and "matches its manifest" in verified.output
    remove_cache(tmp_path / "cache", "mine-test")
    assert list(Path(tmp_path / "cache").iterdir()) == []


# -- a clip-retrieval output folder ---------------------------------------------------------------------------------

def clip_folder(root: Path, parts: dict[int, int], dim: int = 8, metadata: bool = True) -> dict[str, np.ndarray]:
    """img_emb/, text_emb/ (and metadata/) parts numbered as given ({number: rows}), float16, as clip-retrieval
    writes them → the arrays concatenated in numeric order, computed here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    images, texts, captions = [], [], []
    for number in sorted(parts):
        img = rng.standard_normal((parts[number], dim)).astype(np.float16)
        txt = rng.standard_normal((parts[number], dim)).astype(np.float16)
        np.save(root / "img_emb" / f"img_emb_{number}.npy", img)
        np.save(root / "text_emb" / f"text_emb_{number}.npy", txt)
        caps = [f"caption {number}.{i}" for i in range(parts[number])]
        if metadata:
            pq.write_table(pa.table({"image_path": [f"{c}.jpg" for c in caps], "caption": caps}),
                           root / "metadata" / f"metadata_{number}.parquet")
        images.append(img), texts.append(txt), captions.extend(caps)
    return {"image": np.concatenate(images), "text": np.concatenate(texts)}


def test_a_clip_retrieval_folder_is_its_parts_in_numeric_order(tmp_path):
    arrays = clip_folder(tmp_path / "out", {0: 30, 1: 25, 2: 20, 10: 15})  # 10 after 2, not after 1
    result = runner.invoke(app, ["cache", "import", str(tmp_path / "out"), "--name", "laion_sample", "--root",
                                 str(tmp_path / "cache"), "--no-progress", *ENCODERS])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "cache").iterdir()
    assert (folder / "image.npy").read_bytes() == saved(arrays["image"])
    assert (folder / "text.npy").read_bytes() == saved(arrays["text"])
    assert (folder / "caption_to_image.npy").read_bytes() == saved(np.arange(90, dtype=np.int64))
    manifest = check_cache(folder, rehash=True)
    assert manifest["source"]["parts"] == [0, 1, 2, 10]
    assert manifest["source"]["metadata"] == {"files": 4, "rows": 90, "columns": ["image_path", "caption"]}
    assert manifest["dims"] == {"image": 8, "text": 8} and manifest["storage_dtype"] == "float16"


def test_an_import_holds_a_block_not_the_inputs_in_memory(tmp_path, monkeypatch):
    """Two 24 MiB inputs imported with 1 MiB blocks: the old way (np.load + concatenate) holds them all."""
    monkeypatch.setattr(cache_work, "BLOCK_BYTES", 1 << 20)
    rows, dim = 12288, 512
    rng = np.random.default_rng(0)
    for name in ("i", "t"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((rows, dim), dtype=np.float32))
    source = open_source(None, tmp_path / "i.npy", tmp_path / "t.npy", None)
    tracemalloc.start()
    try:
        folder, written = import_cache(source, "big", "train", {"image": "a", "text": "b"}, tmp_path / "cache",
                                       progress=False, log=lambda m: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written and peak < 6 << 20, peak
    assert (folder / "text.npy").read_bytes() == (tmp_path / "t.npy").read_bytes()


# -- bad input: one line, exit 2, nothing written --------------------------------------------------------------------

def _pair_files(tmp_path: Path, n_img: int = 20, n_txt: int = 20, dim: int = 6, dtype=np.float32) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    np.save(tmp_path / "i.npy", rng.standard_normal((n_img, dim)).astype(dtype))
    np.save(tmp_path / "t.npy", rng.standard_normal((n_txt, dim)).astype(dtype))
    return tmp_path / "i.npy", tmp_path / "t.npy"


def _bad_pairs(tmp_path: Path, values) -> list[str]:
    image, text = _pair_files(tmp_path, n_img=10, n_txt=len(values))
    np.save(tmp_path / "p.npy", np.asarray(values))
    return ["--image", str(image), "--text", str(text), "--pairs", str(tmp_path / "p.npy")]


def _with_bad_row(tmp_path: Path, value: float) -> list[str]:
    image, text = _pair_files(tmp_path)
    array = np.load(text)
    array[13, 2] = value
    np.save(text, array)
    return ["--image", str(image), "--text", str(text)]


def _object_array(tmp_path: Path) -> list[str]:
    image, text = _pair_files(tmp_path)
    np.save(image, np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
    return ["--image", str(image), "--text", str(text)]


def _with_image(tmp_path: Path, array: np.ndarray) -> list[str]:
    _, text = _pair_files(tmp_path)
    np.save(tmp_path / "x.npy", array)
    return ["--image", str(tmp_path / "x.npy"), "--text", str(text)]


def _text_in_float16(tmp_path: Path) -> list[str]:
    image, text = _pair_files(tmp_path)
    np.save(text, np.load(text).astype(np.float16))
    return ["--image", str(image), "--text", str(text)]


def _not_npy(tmp_path: Path) -> list[str]:
    _, text = _pair_files(tmp_path)
    (tmp_path / "x.npy").write_text("hello")
    return ["--image", str(tmp_path / "x.npy"), "--text", str(text)]


def _short_pairs(tmp_path: Path) -> list[str]:
    args = _bad_pairs(tmp_path, range(10))
    np.save(tmp_path / "p.npy", np.arange(3))
    return args


def _ragged_parts(tmp_path: Path) -> list[str]:
    clip_folder(tmp_path / "out", {0: 5, 1: 5})
    np.save(tmp_path / "out" / "img_emb" / "img_emb_1.npy", np.zeros((5, 9), np.float16))
    return [str(tmp_path / "out")]


def _nan_in_a_part(tmp_path: Path) -> list[str]:
    clip_folder(tmp_path / "out", {0: 5, 1: 6})
    part = np.load(tmp_path / "out" / "img_emb" / "img_emb_1.npy")
    part[3, 0] = np.inf
    np.save(tmp_path / "out" / "img_emb" / "img_emb_1.npy", part)
    return [str(tmp_path / "out")]


def _missing_text_part(tmp_path: Path) -> list[str]:
    clip_folder(tmp_path / "out", {0: 5, 1: 6})
    (tmp_path / "out" / "text_emb" / "text_emb_1.npy").unlink()
    return [str(tmp_path / "out")]


def _metadata_rows_disagree(tmp_path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    clip_folder(tmp_path / "out", {0: 5, 1: 6})
    pq.write_table(pa.table({"caption": ["a"] * 4}), tmp_path / "out" / "metadata" / "metadata_1.parquet")
    return [str(tmp_path / "out")]


BAD = {  # case → (arguments made in tmp_path, what the line must say)
    "row counts disagree": (lambda p: ["--image", str(_pair_files(p, 20, 30)[0]), "--text", str(p / "t.npy")],
                            "--image has 20 rows and --text 30: without --pairs row i of each is one pair"),
    "a NaN row": (lambda p: _with_bad_row(p, np.nan), "--text row 13 (t.npy) holds NaN or inf"),
    "an inf row": (lambda p: _with_bad_row(p, -np.inf), "--text row 13 (t.npy) holds NaN or inf"),
    "an inf row in a part": (_nan_in_a_part, "img_emb row 8 (img_emb_1.npy row 3) holds NaN or inf"),
    "ragged dims across parts": (_ragged_parts, "img_emb_1.npy has 9 columns but img_emb_0.npy has 8"),
    "image and text dtypes differ": (_text_in_float16, "the image embeddings are float32 but the text embeddings "
                                                       "float16"),
    "a float64 input": (lambda p: _with_image(p, np.zeros((20, 6))), "--image holds float64: a cache stores float16 "
                                                                     "or float32 embeddings"),
    "a 3-D input": (lambda p: _with_image(p, np.zeros((2, 3, 4), np.float32)), "is 3-D [2, 3, 4], expected 2-D"),
    "no columns": (lambda p: _with_image(p, np.zeros((20, 0), np.float32)), "--image holds 20 rows of 0 values"),
    "a missing file": (lambda p: ["--image", str(p / "nope.npy"), "--text", str(_pair_files(p)[1])],
                       "--image {p}/nope.npy not found"),
    "a missing folder": (lambda p: [str(p / "no-such-folder")], "SOURCE {p}/no-such-folder is not a folder"),
    "a folder without img_emb": (lambda p: [str(p)], "no img_emb/img_emb_N.npy under {p}"),
    "a part without its text": (_missing_text_part, "img_emb_1.npy has no part 1 in {p}/out/text_emb"),
    "metadata rows disagree": (_metadata_rows_disagree, "metadata_1.parquet has 4 rows but img_emb_1.npy 6"),
    "an object array": (_object_array, "holds Python objects (dtype object)"),
    "not a .npy file": (_not_npy, "--image {p}/x.npy is not a .npy file"),
    "pairs that are not integers": (lambda p: _bad_pairs(p, np.arange(10) * 1.0),
                                    "--pairs {p}/p.npy holds float64, not integers"),
    "a pair past the images": (lambda p: _bad_pairs(p, [*range(10), 10]),
                               "--pairs row 10 is image 10, outside the 10 image rows (0 to 9)"),
    "a negative pair": (lambda p: _bad_pairs(p, [*range(10), -1]), "--pairs row 10 is image -1, outside"),
    "an image without a caption": (lambda p: _bad_pairs(p, [*range(9), 0]),
                                   "image row 9 has no caption in --pairs (1 images have none)"),
    "pairs of another length": (_short_pairs, "--pairs has 3 entries but --text 10 rows"),
    "both forms": (lambda p: [str(p), "--image", str(_pair_files(p)[0])], "give either SOURCE"),
    "neither form": (lambda p: ["--image", str(_pair_files(p)[0])], "give SOURCE (a clip-retrieval output folder"),
    "a name with a dash": (lambda p: ["--image", str(_pair_files(p)[0]), "--text", str(p / "t.npy"), "--name",
                                      "cc3m-vitb32"], "--name 'cc3m-vitb32' must be 1 to 64 letters, digits"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, case):
    make, says = BAD[case]
    work = tmp_path / "in"
    work.mkdir()
    args = make(work)
    if "--name" not in args:
        args += ["--name", "mine"]
    root = tmp_path / "cache"
    line = one_error_line(runner.invoke(app, ["cache", "import", *args, "--root", str(root), "--no-progress",
                                              *ENCODERS]))
    assert says.format(p=work) in line, line
    assert not root.exists() or list(root.iterdir()) == []


def test_a_disk_full_while_writing_is_one_line_leaves_nothing_and_reruns(tmp_path, monkeypatch):
    import errno

    image, text = _pair_files(tmp_path)
    real = cache_work._write_block

    def full(fh, data):
        if Path(fh.name).name.startswith(".text.npy."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(cache_work, "_write_block", full)
    line = one_error_line(import_pair(tmp_path / "cache", image, text))
    assert "no space left on the device writing" in line and "run the same `align cache import` again" in line
    assert not (tmp_path / "cache").exists()  # nor the root it made
    monkeypatch.setattr(cache_work, "_write_block", real)
    assert import_pair(tmp_path / "cache", image, text).exit_code == 0
