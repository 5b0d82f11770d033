"""Faults while `align embed` writes a cache: a second concurrent embed of the same key, a full disk, and
`align cache rm` pointed at something that is not a cache. Each is one line and exit 2, and leaves what was
there intact (the full disk: a partial run that resumes to bytes identical to an uninterrupted run)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from align.cache import key as cache_keys, read as cache_read, store as cache_store, work as cache_work
from align.cache.key import cache_key
from align.cache.write import embed_split
from align.cli.main import app
from align.common.locks import exclusive
from helpers import data_section, synthetic_split, write_cache

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def embed_section(tiny_dir: Path, root: Path) -> dict:
    """20 images, 40 captions; with ENCODE_ROWS = 4 and shard_size 8: 3 image shards and 5 caption shards."""
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    return {"dataset": {"kind": "synthetic", "synthetic": {"train_images": 20, "val_images": 4, "test_images": 4,
                                                           "image_size": 32, "captions_per_image": 2}},
            "splits": ["train"], "image_encoder": encoder, "text_encoder": encoder, "batch_size": 4,
            "shard_size": 8, "device": "cpu", "cache_root": str(root)}


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: ") and len(lines[0]) <= 300 + len("error: "), lines[0]
    return lines[0].removeprefix("error: ")


# ---------------------------------------------------------------------------------------- two writers

HOLDER = textwrap.dedent("""
    import sys, time
    from align.cache import work as cache_work
    from align.data import encoders
    from align.cache.key import EmbedConfig
    from align.cache.write import embed_split

    cache_work.ENCODE_ROWS = 4
    real = encoders.build_image_encoder
    class Slow:
        def __init__(self, inner):
            self.inner, self.preprocess, self.device, self.dim = inner, inner.preprocess, inner.device, inner.dim
        def encode(self, x):
            time.sleep(0.6)  # long enough for the second embed to find the first one at work
            return self.inner.encode(x)
    encoders.build_image_encoder = lambda spec, device: Slow(real(spec, device))
    embed_split(EmbedConfig.model_validate_json(sys.argv[1]), "train", progress=False, log=print)
    print("FIRST DONE", flush=True)
""")


def test_an_embed_finds_its_key_locked_and_is_refused_in_one_line(tiny_dir, tmp_path, monkeypatch):
    """Fast: the lock held in this process, as a running `align embed` holds it (the subprocess case: slow)."""
    section = embed_section(tiny_dir, tmp_path / "cache")
    (tmp_path / "embed.yaml").write_text(yaml.safe_dump(section))
    folder = tmp_path / "cache" / cache_key(cache_keys.EmbedConfig.model_validate(section), "train")
    with exclusive(folder, "cache"):
        line = one_line(runner.invoke(app, ["embed", "--config", str(tmp_path / "embed.yaml"), "--no-progress"]))
    assert line == (f"cache {folder} is in use by process {os.getpid()}: another `align embed` is writing it; "
                    f"wait for it to finish")
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written by the refused embed
    result = runner.invoke(app, ["embed", "--config", str(tmp_path / "embed.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output  # the lock is free again: it embeds


@pytest.mark.slow
def test_a_second_concurrent_embed_is_refused_naming_the_first_ones_pid(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)
    section = embed_section(tiny_dir, tmp_path / "cache")
    cfg = cache_keys.EmbedConfig.model_validate(section)
    folder = tmp_path / "cache" / cache_key(cfg, "train")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-c", HOLDER, cfg.model_dump_json()], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (folder / "work" / "plan.json").is_file():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.05)
    (tmp_path / "embed.yaml").write_text(yaml.safe_dump(section))
    line = one_line(runner.invoke(app, ["embed", "--config", str(tmp_path / "embed.yaml"), "--no-progress"]))
    assert line == (f"cache {folder} is in use by process {first.pid}: another `align embed` is writing it; wait "
                    f"for it to finish")
    assert first.poll() is None  # the refused embed touched nothing of the running one
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "FIRST DONE" in out, out
    cache_read.check_cache(folder, rehash=True)
    assert not (folder / "work").exists() and (folder / "manifest.json").is_file()
    # A finished cache is only read: readers never need the lock, so a held lock does not stop them.
    with exclusive(folder, "cache"):
        assert embed_split(cfg, "train", progress=False, log=lambda m: None) == folder
        assert cache_read.load_cached_split(cfg, "train").num_images == 20


# ---------------------------------------------------------------------------------------- disk full

@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory) -> Path:
    """An uninterrupted embed (ENCODE_ROWS = 4) to compare resumed runs with."""
    root = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    mp.setattr(cache_work, "ENCODE_ROWS", 4)
    try:
        return embed_split(cache_keys.EmbedConfig.model_validate(embed_section(tiny_dir, root)), "train",
                           progress=False, log=lambda m: None)
    finally:
        mp.undo()


# _write_npy calls: image shards 1-3, caption shards 4-8; the final arrays are streamed (_write_block: a header,
# then one block per shard), and the disk fills up at the first rows of text.npy, after its header
@pytest.mark.parametrize("nth, what", [(2, "work/image-00001.npy"), (6, "work/text-00002.npy"),
                                       (None, "text.npy")])
def test_disk_full_is_one_line_leaves_no_temp_file_and_resumes_byte_identical(tiny_dir, tmp_path, monkeypatch,
                                                                              reference, nth, what):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)
    section = embed_section(tiny_dir, tmp_path / "cache")
    (tmp_path / "embed.yaml").write_text(yaml.safe_dump(section))
    folder = tmp_path / "cache" / reference.name
    calls = []
    seam = "_write_npy" if nth is not None else "_write_block"
    real = getattr(cache_work, seam)

    def fills_up_here() -> bool:
        if nth is not None:
            return len(calls) == nth
        return calls[-1].startswith(".text.npy.") and calls.count(calls[-1]) == 2  # text.npy's first rows

    def full_disk(fh, data):
        calls.append(os.path.basename(fh.name))
        if fills_up_here():
            fh.write(b"\x93NUMPY partial")  # some bytes reach the disk before it fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(cache_work, seam, full_disk)
    line = one_line(runner.invoke(app, ["embed", "--config", str(tmp_path / "embed.yaml"), "--no-progress"]))
    assert line == (f"no space left on the device writing {folder / what}: free some space, then run the same "
                    f"`align embed` again (finished shards are kept and it resumes)")
    assert [p.name for p in folder.rglob("*.tmp")] == []  # the temporary file of the failed write is gone
    assert not (folder / "manifest.json").exists()
    done = sorted(p.name for p in (folder / "work").glob("*.json") if p.name != "plan.json")
    assert len(done) == (nth - 1 if nth is not None else 8)  # every shard finished before the failure is kept

    monkeypatch.setattr(cache_work, seam, real)
    result = runner.invoke(app, ["embed", "--config", str(tmp_path / "embed.yaml"), "--no-progress"])
    assert result.exit_code == 0 and "resuming" in result.output, result.output
    for name in cache_keys.ARRAYS:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((folder / "manifest.json").read_text())["files"] == \
        json.loads((reference / "manifest.json").read_text())["files"]


def test_other_write_errors_are_one_line_too(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_work, "ENCODE_ROWS", 4)
    (tmp_path / "embed.yaml").write_text(yaml.safe_dump(embed_section(tiny_dir, tmp_path / "cache")))

    def read_only(path, text):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(cache_work, "atomic_write_text", read_only)
    line = one_line(runner.invoke(app, ["embed", "--config", str(tmp_path / "embed.yaml"), "--no-progress"]))
    assert line.startswith("cannot write ") and "plan.json: permission denied: choose a folder you may write to, " \
        "then run the same command again" in line


# ---------------------------------------------------------------------------------------- cache rm

@pytest.fixture()
def cache_root(tmp_path) -> dict[str, Path]:
    """A finished cache, an interrupted embed, and folders that are no caches: a lock-only leftover (an embed
    killed before its plan), user folders."""
    root = tmp_path / "cache"
    data = data_section(root)
    finished = write_cache(data, "val", *synthetic_split("val", 16))
    interrupted = root / "synthetic-train-0123456789abcdef"
    (interrupted / "work").mkdir(parents=True)
    (interrupted / "work" / "plan.json").write_text(json.dumps({"key": interrupted.name, "images": 8, "captions": 16,
                                                                "encode_rows": 64, "shard_size": 512}))
    np.save(interrupted / "work" / "image-00000.npy", np.zeros((4, 2), np.float32))
    (interrupted / "work" / "image-00000.json").write_text("{}")
    (interrupted / "work" / ".image-00001.npy.999.tmp").write_bytes(b"torn")
    (interrupted / ".lock").write_text("999\n")
    lock_only = root / "synthetic-test-fedcba9876543210"
    lock_only.mkdir()
    (lock_only / ".lock").write_text("")
    thesis = root / "my_thesis_results"
    thesis.mkdir()
    (thesis / "thesis.pdf").write_bytes(b"%PDF years of work")
    lookalike = root / "synthetic-notes"
    lookalike.mkdir()
    (lookalike / "manifest.json").write_text("{}")
    (lookalike / "notes.txt").write_text("mine")
    (root / "empty").mkdir()
    return {"root": root, "finished": finished, "interrupted": interrupted, "lock_only": lock_only,
            "thesis": thesis, "lookalike": lookalike, "empty": root / "empty"}


def _rm(root: Path, key: str):
    return runner.invoke(app, ["cache", "rm", key, "--root", str(root)], env={"COLUMNS": "500"})


def test_cache_rm_removes_only_real_caches(cache_root):
    root = cache_root["root"]
    assert one_line(_rm(root, "my")) == f"no cache 'my' under {root}: see `align cache ls --root {root}`"
    assert one_line(_rm(root, "my_thesis_results")) == (
        f"{cache_root['thesis']} is not an embedding cache (it holds thesis.pdf, which `align embed` never writes): "
        f"refusing to delete it")
    assert "it holds notes.txt" in one_line(_rm(root, "synthetic-notes"))  # a manifest alone does not make a cache
    nothing = "no manifest.json and no work/plan.json: no embed wrote it"
    assert nothing in one_line(_rm(root, "empty"))
    assert nothing in one_line(_rm(root, cache_root["lock_only"].name))  # a lock is no cache (issue 21)
    assert (cache_root["thesis"] / "thesis.pdf").read_bytes() == b"%PDF years of work"
    assert (cache_root["lookalike"] / "notes.txt").is_file() and cache_root["empty"].is_dir()
    assert (cache_root["lock_only"] / ".lock").is_file()
    listed = {e["key"]: e["status"] for e in cache_store.list_caches(root)}
    assert listed == {cache_root["finished"].name: "ok", cache_root["interrupted"].name: "incomplete"}

    for name in ("finished", "interrupted"):
        result = _rm(root, cache_root[name].name[:18])  # a unique prefix of a real cache is enough
        assert result.exit_code == 0 and f"removed {cache_root[name]}" in result.output, result.output
        assert not cache_root[name].exists()
    assert sorted(p.name for p in root.iterdir()) == ["empty", "my_thesis_results", "synthetic-notes",
                                                      "synthetic-test-fedcba9876543210"]


def test_cache_rm_refuses_while_an_embed_writes_the_cache(cache_root):
    with exclusive(cache_root["interrupted"], "cache"):  # what `align embed` holds while it writes
        line = one_line(_rm(cache_root["root"], cache_root["interrupted"].name))
    assert line == (f"cache {cache_root['interrupted']} is in use by process {os.getpid()}: an `align embed` is "
                    f"writing it; wait for it to finish or stop it")
    assert (cache_root["interrupted"] / "work" / "image-00000.npy").is_file()
