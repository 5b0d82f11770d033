"""Packaged configs: `--config NAME` resolution (a path always wins) and `align configs`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli.main import app
from align.common.config_files import list_configs, resolve_config
from align.common.errors import AlignError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
runner = CliRunner()


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """An empty working directory, so relative paths like configs/... do not exist."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("value, kinds, expected", [
    ("default", ("compare",), "compare/default.yaml"),
    ("flickr30k_vitb32", ("compare",), "compare/flickr30k_vitb32.yaml"),
    ("default.yaml", ("compare",), "compare/default.yaml"),
    ("compare/default", ("compare",), "compare/default.yaml"),
    ("configs/compare/coco_vitb32.yaml", ("compare",), "compare/coco_vitb32.yaml"),  # the path a header names
    ("synthetic_offline", ("embed", "train", "compare"), "embed/synthetic_offline.yaml"),
    ("flickr30k_vitb32", ("embed", "train", "compare"), "embed/flickr30k_vitb32.yaml"),  # own kind first
    ("synthetic_msam", ("embed", "train", "compare"), "train/synthetic_msam.yaml"),
    ("compare/flickr30k_vitb32", ("embed", "train", "compare"), "compare/flickr30k_vitb32.yaml"),
    ("synthetic_msam", ("train",), "train/synthetic_msam.yaml"),
])
def test_names_resolve_to_the_packaged_file(elsewhere, value, kinds, expected):
    assert resolve_config(value, kinds).resolve() == (CONFIGS / expected).resolve()


def test_an_existing_path_wins_over_a_name(elsewhere):
    (elsewhere / "default").write_text("name: mine\n")
    assert resolve_config("default", ("compare",)) == Path("default")
    (elsewhere / "compare").mkdir()
    (elsewhere / "compare" / "default").write_text("name: mine\n")
    assert resolve_config("compare/default", ("compare",)) == Path("compare/default")


def test_unknown_names_and_directories_are_one_line_errors(elsewhere):
    with pytest.raises(AlignError) as info:
        resolve_config("nope", ("compare",))
    message = str(info.value)
    assert "\n" not in message and "nope" in message
    for path in (CONFIGS / "compare").glob("*.yaml"):
        assert path.stem in message
    assert "synthetic_offline" not in message  # only the command's own kinds are offered
    with pytest.raises(AlignError, match="is a directory"):
        resolve_config(str(elsewhere), ("compare",))
    with pytest.raises(AlignError, match="no such file"):
        resolve_config("embed/default", ("compare",))  # kind/name must exist as such
    with pytest.raises(AlignError, match="no such file"):
        resolve_config("../compare/default", ("compare",))


def test_list_configs_is_every_yaml_with_its_first_descriptive_line():
    found = {(c.kind, c.name): c for c in list_configs()}
    assert set(found) == {(p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml")}
    assert found["compare", "default"].summary == ("The offline optimizer study: the built-in synthetic image–caption"
                                                   " set encoded by EfficientNet-Lite0 (160 px) and")
    assert found["datasets", "synthetic"].summary.startswith("A `dataset:` section (align.data.datasets.DatasetSpec).")


def test_align_configs_lists_every_packaged_config():
    result = runner.invoke(app, ["configs"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    listed = {(row[0], row[1]) for row in rows if len(row) > 2 and row[0] in ("compare", "embed", "train", "datasets")}
    assert listed == {(p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml")}


def test_commands_take_a_config_name(elsewhere):
    result = runner.invoke(app, ["compare", "--config", "flickr30k_vitb32", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["runs"] > 0
    result = runner.invoke(app, ["compare", "--dry-run"])  # the embedded default, found from any folder
    assert result.exit_code == 0 and json.loads(result.output)["study_dir"].endswith("default")
    for command in ("compare", "embed", "train"):
        result = runner.invoke(app, [command, "--config", "nope"], env={"COLUMNS": "400"})
        assert result.exit_code == 2 and "no packaged config" in result.output
        assert len(result.output.strip().splitlines()) == 1
        result = runner.invoke(app, [command, "--config", str(elsewhere)], env={"COLUMNS": "400"})
        assert result.exit_code == 2 and "is a directory" in result.output
