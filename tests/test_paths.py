"""One data root: $ALIGN_HOME (else ./data) moves every default folder; no other code spells a data/ path."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.common import paths
from align.cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in [*REPO.glob("align/**/*.py"),
                                                                              *REPO.glob("cli/**/*.py")]))
def test_no_data_path_literal_outside_paths_py(path):
    if path == "align/common/paths.py":
        return
    source = (REPO / path).read_text()
    found = re.findall(r"""(?:["']data/|Path\(\s*["']data["']\s*\))""", source)
    assert not found, f"{path} spells a default data path {found}: use align.common.paths"


def test_data_root_is_align_home_else_data(monkeypatch):
    monkeypatch.delenv("ALIGN_HOME", raising=False)
    assert paths.data_root() == Path("data")
    assert [paths.cache_dir(), paths.runs_dir(), paths.studies_dir(), paths.toy_dir()] == [
        Path("data/cache"), Path("data/runs"), Path("data/studies"), Path("data/toy")]
    monkeypatch.setenv("ALIGN_HOME", "")
    assert paths.data_root() == Path("data")
    monkeypatch.setenv("ALIGN_HOME", "/srv/align")
    assert [paths.cache_dir(), paths.runs_dir(), paths.studies_dir(), paths.toy_dir()] == [
        Path("/srv/align/cache"), Path("/srv/align/runs"), Path("/srv/align/studies"), Path("/srv/align/toy")]
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("ALIGN_HOME", "~/align")
    assert paths.data_root() == Path("/home/someone/align")


def _fake_cache(root: Path, key: str) -> None:
    """An unfinished cache folder (no manifest): enough for `align cache ls` to list it."""
    (root / key / "work").mkdir(parents=True)
    (root / key / "work" / "plan.json").write_text(json.dumps({"key": key, "images": 4, "captions": 8,
                                                               "encode_rows": 64, "shard_size": 512}))


def test_align_home_moves_the_cache_root_of_cache_ls_and_eval(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    elsewhere.mkdir()
    _fake_cache(home / "cache", "synthetic-test-0123456789abcdef")
    _fake_cache(elsewhere / "data" / "cache", "synthetic-train-fedcba9876543210")
    monkeypatch.chdir(elsewhere)
    env = {"COLUMNS": "200"}

    monkeypatch.setenv("ALIGN_HOME", str(home))
    result = runner.invoke(app, ["cache", "ls"], env=env)
    assert result.exit_code == 0, result.output
    assert "synthetic-test-0123456789abcdef" in result.output and "synthetic-train" not in result.output
    result = runner.invoke(app, ["eval", "--cache", "synthetic-nope"], env=env)
    assert result.exit_code == 2 and f"under {home / 'cache'}" in result.output

    monkeypatch.delenv("ALIGN_HOME")
    result = runner.invoke(app, ["cache", "ls"], env=env)
    assert "synthetic-train-fedcba9876543210" in result.output and "synthetic-test" not in result.output
    result = runner.invoke(app, ["cache", "ls", "--root", str(home / "cache")], env=env)  # an option still wins
    assert "synthetic-test-0123456789abcdef" in result.output


def test_align_home_moves_study_cache_and_run_defaults(tmp_path, monkeypatch):
    from align.cache.key import load_embed_config
    from align.train.run_dir import default_run_dir

    monkeypatch.setenv("ALIGN_HOME", str(tmp_path))
    result = runner.invoke(app, ["compare", "--config", "default", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["study_dir"] == str(tmp_path / "studies" / "default")
    result = runner.invoke(app, ["compare", "--dry-run", "--out", str(tmp_path / "mine")])
    assert json.loads(result.output)["study_dir"] == str(tmp_path / "mine")
    cfg = load_embed_config(REPO / "configs" / "embed" / "synthetic_offline.yaml")
    assert cfg.cache_root == str(tmp_path / "cache")
    assert default_run_dir(Path("somewhere/synthetic_msam.yaml")) == tmp_path / "runs" / "synthetic_msam"


def test_the_cache_key_does_not_depend_on_the_cache_root(tmp_path, monkeypatch):
    from align.cache.key import cache_key, load_embed_config

    config = REPO / "configs" / "embed" / "synthetic_offline.yaml"
    monkeypatch.delenv("ALIGN_HOME", raising=False)
    keys = [cache_key(load_embed_config(config), split) for split in ("train", "test")]
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path))
    assert [cache_key(load_embed_config(config), split) for split in ("train", "test")] == keys
    assert cache_key(load_embed_config(config, [f"cache_root={tmp_path}/x"]), "train") == keys[0]


def test_a_folder_a_config_names_is_under_the_data_root_never_the_working_folder(tmp_path, monkeypatch):
    """out_dir / study_dir in a config (issue 21): relative ones live under $ALIGN_HOME (else ./data), and the
    way a saved config names a folder reads back to that folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", "/srv/align")
    assert paths.in_data_root("runs/x") == Path("/srv/align/runs/x")
    assert paths.in_data_root("runs/../mine") == Path("/srv/align/mine")
    assert paths.in_data_root("/abs/y") == Path("/abs/y")
    assert paths.relative_to_data_root(Path("/srv/align/runs/x")) == "runs/x"
    assert paths.relative_to_data_root(Path("/elsewhere/x")) == "/elsewhere/x"
    monkeypatch.setenv("HOME", "/home/someone")
    assert paths.in_data_root("~/r") == Path("/home/someone/r")
    monkeypatch.delenv("ALIGN_HOME")
    assert paths.in_data_root("runs/x") == tmp_path / "data" / "runs" / "x"
    assert paths.relative_to_data_root("data/runs/x") == "runs/x"  # typed relative to here: inside ./data


def test_only_a_config_yaml_beside_its_folders_own_files_names_that_folder(tmp_path):
    user = tmp_path / "configs"
    user.mkdir()
    (user / "config.yaml").write_text("x: 1\n")
    assert paths.saved_config_folder(user / "config.yaml", ("checkpoints", ".lock")) is None
    (user / ".lock").write_text("")
    assert paths.saved_config_folder(user / "config.yaml", ("checkpoints", ".lock")) == user
    (user / "other.yaml").write_text("x: 1\n")
    assert paths.saved_config_folder(user / "other.yaml", ("checkpoints", ".lock")) is None
