"""`align cache rm` deletes only what `align embed` provably wrote, matches keys only of real caches, an embed that
writes nothing leaves nothing, and a damaged cache's hint names the root it refers to (issue 21).

A cache is a folder named like a key whose manifest names that key, or whose work/plan.json is the shard plan of
that key, holding nothing an embed never writes. The folders below are built by hand from that definition, not by
align.cache, except where a real embed is the point.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from align.cache import key as cache_keys, store as cache_store, work as cache_work, write as cache_write
from align.cli.main import app
from align.common import locks
from align.common.errors import AlignError
from align.common.locks import exclusive
from align.data import datasets
from helpers import data_section, synthetic_split, write_cache

runner = CliRunner()
KEY = "synthetic-train-0123456789abcdef"  # the shape cache_key gives: kind-split-16 hex digits
PLAN = {"key": KEY, "images": 8, "captions": 16, "encode_rows": 64, "shard_size": 512}


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: ") and len(lines[0]) <= 300 + len("error: "), lines[0]
    return lines[0].removeprefix("error: ")


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with its bytes (None for a folder): what must be left exactly as it was."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def _rm(root: Path, key: str):
    return runner.invoke(app, ["cache", "rm", key, "--root", str(root)], env={"COLUMNS": "500"})


def _ls(root: Path):
    return runner.invoke(app, ["cache", "ls", "--root", str(root)], env={"COLUMNS": "500"})


def _write(folder: Path, files: dict[str, str | bytes | None]) -> None:
    for name, content in files.items():
        path = folder / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


# name → the folder's files (None: an empty folder), the phrase of rm's refusal
LOOKALIKES = {
    "only a lock": ({".lock": "4242\n"}, "no manifest.json and no work/plan.json"),
    "only an empty work/": ({"work": None}, "no manifest.json and no work/plan.json"),
    "a lock and an empty work/": ({".lock": "", "work": None}, "no manifest.json and no work/plan.json"),
    "a manifest of any content": ({"manifest.json": '{"hello": "world"}'}, "its manifest.json is not the manifest"),
    "a manifest that is a list": ({"manifest.json": "[1, 2]"}, "its manifest.json is not the manifest"),
    "a manifest of another key": ({"manifest.json": json.dumps({"format": 1, "key": "synthetic-val-0123456789abcdef"})},
                                  "its manifest.json is not the manifest"),
    "a manifest without a format": ({"manifest.json": json.dumps({"key": KEY})}, "its manifest.json is not the manifest"),
    "a plan of any content": ({"work/plan.json": "{}"}, "its work/plan.json is not the shard plan"),
    "a plan of another key": ({"work/plan.json": json.dumps({**PLAN, "key": "synthetic-val-0123456789abcdef"})},
                              "its work/plan.json is not the shard plan"),
    "a plan without counts": ({"work/plan.json": json.dumps({"key": KEY})}, "its work/plan.json is not the shard plan"),
}


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_cache_rm_refuses_a_folder_that_only_looks_like_a_cache(tmp_path, name):
    files, phrase = LOOKALIKES[name]
    root = tmp_path / "cache"
    folder = root / KEY
    _write(folder, files)
    before = tree(folder)
    line = one_line(_rm(root, KEY))
    assert line.startswith(f"{folder} is not an embedding cache (") and phrase in line, line
    assert line.endswith("): refusing to delete it")
    assert tree(folder) == before
    listing = _ls(root)
    assert listing.exit_code == 0 and KEY not in listing.output, listing.output  # not listed as "incomplete"


@pytest.mark.parametrize("files", [{"manifest.json": json.dumps({"format": 1, "key": KEY})},
                                   {"work/plan.json": json.dumps(PLAN)},
                                   {"work/plan.json": json.dumps(PLAN), "work/image-00000.npy": b"x",
                                    "work/image-00000.json": "{}", ".lock": "", "work/.text-00000.npy.9.tmp": b"t"}],
                         ids=["a manifest naming the folder", "an embed's shard plan", "an interrupted embed"])
def test_cache_rm_removes_a_folder_the_embed_provably_wrote(tmp_path, files):
    root = tmp_path / "cache"
    _write(root / KEY, files)
    result = _rm(root, KEY)
    assert result.exit_code == 0 and f"removed {root / KEY}" in result.output, result.output
    assert list(root.iterdir()) == []


def test_cache_rm_by_prefix_never_reaches_a_folder_that_is_no_cache(tmp_path):
    """The audit's `cache rm webapp` removed webapp_assets/ (a manifest.json of any content made it a "cache")."""
    root = tmp_path / "cache"
    real = write_cache(data_section(root), "val", *synthetic_split("val", 8))
    assets = root / "webapp_assets"
    for content in ('{"format": 1, "key": "webapp_assets"}', "{}"):  # even a manifest naming the folder
        _write(assets, {"manifest.json": content, ".lock": ""})
        assert one_line(_rm(root, "webapp")) == (f"no cache 'webapp' under {root}: see `align cache ls --root "
                                                 f"{root}`")
        assert "is not an embedding cache" in one_line(_rm(root, "webapp_assets"))  # exact name: refused too
        assert (assets / "manifest.json").read_text() == content
    # a key-shaped folder that is no cache does not make a prefix ambiguous, nor is it matched by one
    _write(root / KEY, {".lock": ""})
    result = _rm(root, "synthetic-")
    assert result.exit_code == 0 and f"removed {real}" in result.output, result.output
    assert sorted(p.name for p in root.iterdir()) == [KEY, "webapp_assets"]
    assert one_line(_rm(root, "synthetic-")) == (f"no cache 'synthetic-' under {root}: see `align cache ls --root "
                                                 f"{root}`")


def _embed_yaml(tiny_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """An embed config of a tiny split whose cache root does not exist yet → (config file, cache root)."""
    root = tmp_path / "no" / "such" / "cache"
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    section = {"dataset": {"kind": "synthetic", "synthetic": {"train_images": 8, "val_images": 4, "test_images": 4,
                                                              "image_size": 32, "captions_per_image": 2}},
               "splits": ["train"], "image_encoder": encoder, "text_encoder": encoder, "batch_size": 4,
               "device": "cpu", "cache_root": str(root)}
    (tmp_path / "embed.yaml").write_text(yaml.safe_dump(section))
    return tmp_path / "embed.yaml", root


@pytest.mark.parametrize("failure", ["bad data", "Ctrl-C", "read-only plan"])
def test_an_embed_that_fails_before_its_first_shard_leaves_nothing(tiny_dir, tmp_path, monkeypatch, failure):
    """The audit: such an embed left <root>/<key>/.lock, which `cache ls` listed as "incomplete"."""
    config, _ = _embed_yaml(tiny_dir, tmp_path)
    real = datasets.load_image_caption_split

    def broken(spec, split):
        if failure == "Ctrl-C":
            raise KeyboardInterrupt
        data = real(spec, split)
        data.captions[3] = " "
        return data

    def read_only(path, text):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    if failure == "read-only plan":  # work/ made, its plan.json refused
        monkeypatch.setattr(cache_work, "atomic_write_text", read_only)
    else:
        monkeypatch.setattr(datasets, "load_image_caption_split", broken)
    result = runner.invoke(app, ["embed", "--config", str(config), "--no-progress"])
    if failure == "Ctrl-C":
        assert result.exit_code == 130 and "interrupted" in result.output, result.output
    else:
        one_line(result)
    assert not (tmp_path / "no").exists()  # not the key's folder, its lock, nor the folders made for it


def test_a_refused_second_embed_leaves_nothing_and_neither_does_a_first_that_wrote_nothing(tiny_dir, tmp_path):
    config, _ = _embed_yaml(tiny_dir, tmp_path)
    cfg = cache_keys.load_embed_config(config)
    folder = cache_keys.cache_path(cfg, "train")
    with cache_write.CacheWriter(folder) as first:  # what a running `align embed` holds before its plan
        assert first.claim() is False
        line = one_line(runner.invoke(app, ["embed", "--config", str(config), "--no-progress"]))
        assert line.startswith(f"cache {folder} is in use by process {os.getpid()}")
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]
    assert not (tmp_path / "no").exists()
    # the same embed, not refused, writes its cache; closing its writer keeps it
    result = runner.invoke(app, ["embed", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (folder / "manifest.json").is_file() and not (folder / "work").exists()


def test_a_killed_embeds_lock_is_no_cache_and_the_next_embed_uses_its_folder(tiny_dir, tmp_path):
    config, root = _embed_yaml(tiny_dir, tmp_path)
    folder = cache_keys.cache_path(cache_keys.load_embed_config(config), "train")
    _write(folder, {".lock": "999\n"})  # kill -9 between the lock and the plan: what no `finally` can clean
    assert "no caches under" in _ls(root).output
    assert "no manifest.json and no work/plan.json" in one_line(_rm(root, folder.name))
    result = runner.invoke(app, ["embed", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert cache_store.verify_cache(folder) == []


def test_a_damaged_cache_hint_names_its_own_root_not_the_default_one(tmp_path, monkeypatch):
    """The hint `align cache rm KEY` without --root pointed at the default root, which may hold a sound cache of the
    same key: following it deleted the sound one and kept the damaged one."""
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGN_HOME", str(home))
    split = synthetic_split("val", 8)
    sound = write_cache(data_section(home / "cache"), "val", *split)
    damaged = write_cache(data_section(tmp_path / "elsewhere"), "val", *split)
    assert sound.name == damaged.name  # the key does not depend on the root
    text = np.load(damaged / "text.npy")
    text[2, 0] += 1.0
    np.save(damaged / "text.npy", text)
    line = one_line(runner.invoke(app, ["cache", "verify", damaged.name, "--root", str(damaged.parent)],
                                  env={"COLUMNS": "500"}))
    fix = f"`align cache rm {damaged.name} --root {damaged.parent}`"
    assert line == (f"damaged cache {damaged.name}: text.npy differs from its sha256 in the manifest (changed after "
                    f"the embed wrote it); fix: {fix}, then `align embed`")
    command = shlex.split(fix.strip("`"))
    assert command[:3] == ["align", "cache", "rm"]
    result = runner.invoke(app, command[1:], env={"COLUMNS": "500"})  # the hint, followed to the letter
    assert result.exit_code == 0, result.output
    assert not damaged.exists() and cache_store.verify_cache(sound) == []


def test_a_damaged_cache_whose_manifest_is_unreadable_is_listed_but_its_hint_is_not_rm(tmp_path):
    root = tmp_path / "cache"
    folder = write_cache(data_section(root), "val", *synthetic_split("val", 8))
    (folder / "manifest.json").write_bytes(b'{"format": 1, "key": \xff')
    line = one_line(runner.invoke(app, ["cache", "verify", folder.name, "--root", str(root)], env={"COLUMNS": "500"}))
    assert line.startswith(f"damaged cache {folder}: manifest.json is not valid JSON")
    assert line.endswith("fix: delete this folder (manifest.json does not name it, so `align cache rm` keeps it), "
                         "then `align embed`")
    listing = _ls(root)
    assert listing.exit_code == 0 and folder.name in listing.output and "damaged" in listing.output
    before = tree(folder)
    assert "its manifest.json is not the manifest" in one_line(_rm(root, folder.name))
    assert tree(folder) == before


def test_a_lock_taken_on_a_lock_file_its_holder_removed_is_taken_again(tmp_path, monkeypatch):
    """`cache rm` (or an embed that wrote nothing) deletes a folder with its lock file while holding the lock. A
    process that opened that file just before must not believe it holds the folder's lock."""
    folder = tmp_path / KEY
    real = fcntl.flock
    calls = []

    def removed_meanwhile(fd, op):
        calls.append(op)
        if len(calls) == 1:  # between our open and our lock, the holder deletes the folder and lets go
            shutil.rmtree(folder)
        return real(fd, op)

    monkeypatch.setattr(locks.fcntl, "flock", removed_meanwhile)
    with exclusive(folder, "cache"):
        monkeypatch.setattr(locks.fcntl, "flock", real)
        assert len(calls) == 2  # locked the stale file, noticed, locked the one that is there
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(AlignError, match=f"in use by process {os.getpid()}"):
            with exclusive(folder, "cache"):  # the live lock file is the one held
                pass


def test_the_wrong_split_hint_of_eval_names_the_root_it_looked_in(tmp_path):
    root = tmp_path / "elsewhere"
    folder = write_cache(data_section(root), "val", *synthetic_split("val", 8))
    line = one_line(runner.invoke(app, ["eval", "--cache", folder.name, "--cache-root", str(root), "--split", "test"],
                                  env={"COLUMNS": "500"}))
    assert line == (f"cache {folder.name} holds split 'val', not 'test': give the key of that split "
                    f"(`align cache ls --root {root}`)")
