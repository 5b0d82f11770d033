"""Verified cache loads: every corruption of a cache is one line naming the folder and the problem, exit 2, in
`align train`, `align eval RUN`, `align eval --cache KEY`, `align compare` and `align cache verify`; and the
sha256 fast path (verified.json) is skipped only while a file is provably unchanged.

The caches are written by test_train's ``write_cache`` (arrays + manifest with hashlib sha256s, no encoder), so
the expectations come from the bytes the test itself wrote, not from align.cache.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from align.cache import key as cache_keys, read as cache_read, store as cache_store, write as cache_write
from align.cli.main import app
from align.common.errors import AlignError
from helpers import make_cache, train_config

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def _edit_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _flip_bit(folder: Path) -> None:
    data = bytearray((folder / "text.npy").read_bytes())
    data[-7] ^= 0x01  # a low mantissa bit of the second-to-last float: still finite, same size, valid header
    (folder / "text.npy").write_bytes(bytes(data))


def _fortran(folder: Path) -> None:
    data = (folder / "text.npy").read_bytes()
    assert data.count(b"'fortran_order': False") == 1
    (folder / "text.npy").write_bytes(data.replace(b"'fortran_order': False", b"'fortran_order': True "))


def _rows(name: str, rows: list[int], value: float) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        array = np.load(folder / name)
        array[rows, 1] = value
        np.save(folder / name, array)  # same size and header: only the values are bad
    return corrupt


class _Planted:
    """Unpickling this creates a marker file: proof that a load never unpickles."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickled(folder: Path) -> None:
    rows = np.load(folder / "text.npy").shape[0]
    objects = np.empty((rows, 1), dtype=object)
    objects[:, 0] = [_Planted(str(folder.parent / "UNPICKLED")) for _ in range(rows)]
    np.save(folder / "text.npy", objects, allow_pickle=True)


def _garbage_header(folder: Path) -> None:
    data = bytearray((folder / "text.npy").read_bytes())
    data[10:60] = b"#" * 50  # the header dict, after magic and length: not a literal any more
    (folder / "text.npy").write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    (folder / "text.npy").write_bytes((folder / "text.npy").read_bytes()[:-40])


def _bad_index(folder: Path) -> None:
    c2i = np.load(folder / "caption_to_image.npy")
    c2i[4] = 10 ** 6
    np.save(folder / "caption_to_image.npy", c2i)


def _counts(m: dict) -> None:
    m["counts"]["captions"] += 1


def _dims(m: dict) -> None:
    m["dims"]["text"] += 1


def _files_list(m: dict) -> None:
    m["files"] = list(m["files"].values())


# name → (corrupt the test split's folder, the phrase its line must contain)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped bytes in text.npy": (_flip_bit, "text.npy differs from its sha256 in the manifest"),
    "manifest counts edited": (lambda f: _edit_manifest(f, _counts), "counts.captions is"),
    "fortran_order flipped": (_fortran, "text.npy is stored in Fortran (column) order"),
    "NaN rows": (_rows("text.npy", [3, 7], float("nan")),
                 "text.npy has 2 row(s) with NaN or inf (first: row 3): the cached embeddings are bad data"),
    "inf rows": (_rows("image.npy", [5], float("inf")),
                 "image.npy has 1 row(s) with NaN or inf (first: row 5): the cached embeddings are bad data"),
    "pickled object array": (_pickled, "text.npy holds Python objects (dtype object), which are never unpickled"),
    "garbage npy header": (_garbage_header, "text.npy has no valid .npy header"),
    "manifest files as a list": (lambda f: _edit_manifest(f, _files_list),
                                 "manifest.json: 'files' must be a mapping, found list"),
    "dims mismatch": (lambda f: _edit_manifest(f, _dims), "the manifest's dims.text is 25 but text.npy has 24 columns"),
    "truncated text.npy": (_truncate, "text.npy is"),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_bytes(b'{"format": 1, "key": \xff'),
                          "manifest.json is not valid JSON"),
    "caption index outside image.npy": (_bad_index, "caption_to_image.npy row 4 points to image 1000000"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A three-split cache, one finished run on it, a study config on it, and a pristine copy of the test split."""
    root = tmp_path_factory.mktemp("integrity")
    data = make_cache(root / "cache")
    train_cfg = train_config(data, schedule={"steps": 10, "batch_size": 64, "warmup_steps": 2},
                             eval={"every": 5, "sharpness": False}, checkpoint_every=5, loss_at_step=5)
    (root / "train.yaml").write_text(yaml.safe_dump(train_cfg))
    result = runner.invoke(app, ["train", "--config", str(root / "train.yaml"), "--out", str(root / "run"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    study = {key: value for key, value in train_cfg.items() if key != "optim"}
    study.update(name="integrity", study_dir=str(root / "study"), workers=1, reference="adamw",
                 grid={"optimizers": ["adamw"], "lrs": [0.01], "rhos": [0.05], "seeds": [0]})
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    folder = cache_keys.cache_path(cache_keys.EmbedConfig.model_validate(data), "test")
    shutil.copytree(folder, root / "pristine")
    return {"root": root, "folder": folder, "key": folder.name}


def _commands(world: dict, case: int) -> dict[str, list[str]]:
    root = world["root"]
    return {
        "train": ["train", "--config", str(root / "train.yaml"), "--out", str(root / f"run-{case}"), "--no-progress"],
        "eval RUN": ["eval", str(root / "run"), "--split", "test"],
        "eval --cache": ["eval", "--cache", world["key"], "--cache-root", str(world["folder"].parent)],
        "compare": ["compare", "--config", str(root / "study.yaml"), "--no-progress"],
        "cache verify": ["cache", "verify", world["key"], "--root", str(world["folder"].parent)],
    }


def _restore(world: dict) -> None:
    shutil.rmtree(world["folder"])
    shutil.copytree(world["root"] / "pristine", world["folder"])  # new inodes: the next load re-hashes


def _head(world: dict, name: str) -> str:
    """The start of a damaged cache's line: the key when the fix names it with its root, else the folder."""
    return f"damaged cache {world['folder'] if name == 'manifest not JSON' else world['key']}: "


def _fix(world: dict, name: str) -> str:
    """The end of a damaged cache's line: `align cache rm` with the cache's own root (never the default root, which
    may hold a sound cache of the same key), or, where the manifest no longer names the folder (rm keeps such a
    folder), deleting it by hand."""
    if name == "manifest not JSON":
        return "fix: delete this folder (manifest.json does not name it, so `align cache rm` keeps it), then `align embed`"
    return f"fix: `align cache rm {world['key']} --root {world['folder'].parent}`, then `align embed`"


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_is_one_line_naming_the_cache_in_every_command(world, name):
    corrupt, phrase = CORRUPTIONS[name]
    case = list(CORRUPTIONS).index(name)
    _restore(world)
    corrupt(world["folder"])
    try:
        for command, args in _commands(world, case).items():
            result = runner.invoke(app, args, env={"COLUMNS": "500"})
            lines = [line for line in result.output.splitlines() if line.strip()]
            if command == "compare":  # it first reports the sound splits it found cached, one line each
                while lines and re.fullmatch(r"(train|val): cached \(synthetic-\w+-[0-9a-f]{16}\)", lines[0]):
                    lines.pop(0)
            assert result.exit_code == 2 and len(lines) == 1, (command, result.output)
            message = lines[0].removeprefix("error: ")
            assert lines[0].startswith("error: ") and len(message) <= 300, (command, lines[0])
            assert message.startswith(_head(world, name)) and phrase in message, (command, message)
            assert message.endswith(_fix(world, name)), (command, message)
        assert not (world["root"] / "UNPICKLED").exists()
        assert not (world["root"] / f"run-{case}").exists()  # train refused before writing a run
        assert not (world["root"] / "study" / "runs").exists()  # compare refused before training any cell
    finally:
        _restore(world)


def test_the_sound_cache_passes_every_command(world):
    """The control: the same five commands on the pristine cache succeed (the matrix above is not vacuous)."""
    _restore(world)
    args = _commands(world, 99)
    args["compare"] += ["--dry-run"]  # validation only: the study itself is test_compare's subject
    for command, argv in args.items():
        result = runner.invoke(app, argv, env={"COLUMNS": "500"})
        assert result.exit_code == 0, (command, result.output)
    shutil.rmtree(world["root"] / "run-99")


# ------------------------------------------------------------------------------- the sha256 fast path

@pytest.fixture()
def counted(monkeypatch) -> list[str]:
    """Names of the files align.cache hashes (its sha256_file, counted)."""
    seen: list[str] = []
    real = cache_read.sha256_file
    monkeypatch.setattr(cache_read, "sha256_file", lambda path: seen.append(Path(path).name) or real(path))
    return seen


@pytest.fixture()
def one_cache(tmp_path) -> Path:
    data = make_cache(tmp_path / "cache")
    folder = cache_keys.cache_path(cache_keys.EmbedConfig.model_validate(data), "val")
    time.sleep(cache_read.RACY_NS / 1e9 + 0.05)  # older than the racy window, as any cache not written just now
    return folder


def test_later_loads_skip_hashing_until_a_file_changes_even_with_its_mtime_restored(one_cache, counted):
    cache_read.load_cache_dir(one_cache)
    assert sorted(counted) == sorted(cache_keys.ARRAYS)  # first load after the files were written: every file hashed
    record = json.loads((one_cache / "verified.json").read_text())
    expected = json.loads((one_cache / "manifest.json").read_text())["files"]
    assert {n: r["sha256"] for n, r in record["files"].items()} == {n: f["sha256"] for n, f in expected.items()}
    counted.clear()
    cache_read.load_cache_dir(one_cache)
    assert counted == []  # nothing changed: no file hashed

    text = one_cache / "text.npy"
    before = text.stat()
    _flip_bit(one_cache)
    os.utime(text, ns=(before.st_atime_ns, before.st_mtime_ns))  # hide the write from size and mtime
    after = text.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns  # what the record also keeps, and utime cannot restore
    with pytest.raises(AlignError, match=r"text\.npy differs from its sha256"):
        cache_read.load_cache_dir(one_cache)
    assert counted == ["text.npy"]  # only the changed file was hashed again


def test_a_copied_cache_is_hashed_again_and_verify_always_rehashes(one_cache, counted, tmp_path):
    cache_read.load_cache_dir(one_cache)
    copy = tmp_path / "copy" / one_cache.name
    shutil.copytree(one_cache, copy)  # copy2: sizes and mtimes kept, verified.json copied too
    counted.clear()
    cache_read.load_cache_dir(copy)
    assert sorted(counted) == sorted(cache_keys.ARRAYS)  # new inodes: the copy's files are hashed on first load
    counted.clear()
    assert cache_store.verify_cache(one_cache) == []
    assert sorted(counted) == sorted(cache_keys.ARRAYS)


def test_a_file_changed_within_the_racy_window_is_hashed_again(one_cache, counted, monkeypatch):
    monkeypatch.setattr(cache_read, "RACY_NS", 10 ** 12)  # as if every file had changed just before the record
    cache_read.load_cache_dir(one_cache)
    counted.clear()
    cache_read.load_cache_dir(one_cache)
    assert sorted(counted) == sorted(cache_keys.ARRAYS)  # not trusted: a same-tick change could hide in its timestamps


def test_a_read_only_cache_loads_and_is_hashed_each_time(one_cache, counted, monkeypatch):
    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_read, "atomic_write_text", refuse)
    for _ in range(2):
        paired = cache_read.load_cache_dir(one_cache)
        assert paired.num_images == 128
    assert sorted(counted) == sorted(cache_keys.ARRAYS * 2) and not (one_cache / "verified.json").exists()


def test_embed_says_what_is_wrong_with_a_finished_cache_and_never_rebuilds_it(world):
    _restore(world)
    _rows("text.npy", [0], float("nan"))(world["folder"])
    data = yaml.safe_load((world["root"] / "train.yaml").read_text())["data"]
    before = (world["folder"] / "text.npy").read_bytes()
    try:
        with pytest.raises(AlignError, match=r"^damaged cache .*text\.npy has 1 row\(s\) with NaN"):
            cache_write.embed_split(cache_keys.EmbedConfig.model_validate(data), "test", progress=False, log=lambda m: None)
        assert (world["folder"] / "text.npy").read_bytes() == before
    finally:
        _restore(world)


@pytest.mark.parametrize("name", ["manifest files as a list", "manifest not JSON", "manifest counts edited"])
def test_cache_info_and_ls_report_a_damaged_manifest_without_a_traceback(world, name):
    _restore(world)
    CORRUPTIONS[name][0](world["folder"])
    root = str(world["folder"].parent)
    try:
        info = runner.invoke(app, ["cache", "info", world["key"], "--root", root], env={"COLUMNS": "500"})
        listing = runner.invoke(app, ["cache", "ls", "--root", root], env={"COLUMNS": "500"})
    finally:
        _restore(world)
    assert listing.exit_code == 0 and "Traceback" not in listing.output, listing.output
    if name == "manifest counts edited":  # well-formed: info shows it (loads and verify refuse it, above)
        edited = np.load(world["root"] / "pristine" / "text.npy").shape[0] + 1
        assert info.exit_code == 0 and f"{edited} captions" in info.output, info.output
        return
    lines = [line for line in info.output.splitlines() if line.strip()]
    assert info.exit_code == 2 and len(lines) == 1, info.output
    assert lines[0].startswith(f"error: {_head(world, name)}manifest.json")
    assert "damaged" in listing.output
