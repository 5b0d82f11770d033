"""Where a run or a study lives never depends on the working folder of a later command (issue 21).

- A run's own RUN/config.yaml continues RUN itself, from any working folder, wherever RUN was copied or moved.
- A config's ``out_dir`` (``study_dir``) is kept as given and read under $ALIGN_HOME (else ./data), never under the
  working folder; ``--out`` is the folder typed, relative to where it was typed.
- ``--resume`` with nothing to resume is one line, exit 2, and writes nothing.

The checks compare against files the tests wrote or an uninterrupted run produced (the bytes of its checkpoints).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from align.cli.main import app
from helpers import train_config

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
FINAL = "checkpoints/step-0000020.safetensors"  # the last checkpoint of the 20-step runs below


def one_error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and len(lines[0]) <= 300 + len("error: ")
    return lines[0].removeprefix("error: ")


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def places(tmp_path, monkeypatch, cache_data) -> dict[str, Path]:
    """$ALIGN_HOME, two unrelated working folders, and a 20-step config (checkpoints every 10) naming no out_dir."""
    home, first, second = tmp_path / "home", tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(train_config(cache_data, schedule={"steps": 20, "warmup_steps": 2},
                                                  eval={"every": 10, "sharpness": False}, checkpoint_every=10,
                                                  loss_at_step=10)))
    monkeypatch.setenv("ALIGN_HOME", str(home))
    monkeypatch.chdir(first)
    return {"home": home, "first": first, "second": second, "config": config}


def train(*args: str):
    return runner.invoke(app, ["train", *args, "--no-progress"], env={"COLUMNS": "500"})


def interrupt_after_step_10(run: Path) -> None:
    """What a kill between the checkpoints of steps 10 and 20 leaves: no results, no step-20 checkpoint."""
    (run / "results.json").unlink()
    for half in ("safetensors", "json"):
        (run / f"checkpoints/step-0000020.{half}").unlink()


def test_a_runs_own_config_resumes_that_run_from_any_working_folder(places, monkeypatch):
    """The audit: config.yaml's relative out_dir made --resume from another folder start a fresh run there."""
    result = train("--config", str(places["config"]))
    assert result.exit_code == 0, result.output
    run = places["home"] / "runs" / "small"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["out_dir"] == "runs/small"  # named under $ALIGN_HOME, not as a path of the first working folder
    finished = (run / FINAL).read_bytes()
    interrupt_after_step_10(run)

    monkeypatch.chdir(places["second"])
    monkeypatch.delenv("ALIGN_HOME")  # neither the working folder nor the data root matters to a run's own config
    result = train("--config", str(run / "config.yaml"), "--resume")
    assert result.exit_code == 0, result.output
    assert f"resuming {run} from step 10" in result.output
    assert (run / FINAL).read_bytes() == finished  # continued to the bits an uninterrupted run reached
    assert json.loads((run / "results.json").read_text())["steps_done"] == 20
    assert list(places["second"].iterdir()) == []  # no fresh run started where the command ran


def test_a_copied_run_folder_resumes_in_place_and_leaves_the_original_alone(places, tmp_path):
    original = tmp_path / "original"
    assert train("--config", str(places["config"]), "--out", str(original)).exit_code == 0
    finished = (original / FINAL).read_bytes()
    copy = tmp_path / "copies" / "copy"
    shutil.copytree(original, copy)
    interrupt_after_step_10(copy)
    before = tree(original)

    # the command the copy's header gives, with RUN: the copy
    header = (copy / "config.yaml").read_text().splitlines()[0]
    assert header.startswith("# align train --config RUN/config.yaml --resume")
    result = train("--config", str(copy / "config.yaml"), "--resume")
    assert result.exit_code == 0, result.output
    assert f"resuming {copy} from step 10" in result.output
    assert tree(original) == before  # the audit: the copy resumed into the original
    assert (copy / FINAL).read_bytes() == finished
    assert yaml.safe_load((copy / "config.yaml").read_text())["out_dir"] == str(copy)  # it names where it is now

    result = train("--config", str(copy / "config.yaml"))  # in place: it already holds this run
    assert one_error_line(result) == f"{copy} already holds a run: add --resume to continue it, or use --out NEW_DIR"


def test_resume_with_nothing_to_resume_is_one_line_and_writes_nothing(places, tmp_path):
    """The audit: --resume with nothing to resume said nothing and trained a fresh run."""
    for args, where in ((["--out", str(tmp_path / "none")], tmp_path / "none"),
                        ([], places["home"] / "runs" / "small")):
        line = one_error_line(train("--config", str(places["config"]), "--resume", *args))
        assert line == (f"--resume: no run to continue in {where}: leave out --resume to start one there, or give "
                        "the run's own --config RUN/config.yaml")
        assert not where.exists()
    assert not places["home"].exists() and list(places["first"].iterdir()) == []


def test_a_configs_out_dir_is_under_align_home_from_every_working_folder(places, monkeypatch):
    config = places["config"]
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "out_dir": "mine/r1"}))
    assert train("--config", str(config)).exit_code == 0
    run = places["home"] / "mine" / "r1"
    assert yaml.safe_load((run / "config.yaml").read_text())["out_dir"] == "mine/r1"  # stored as given
    assert list(places["first"].iterdir()) == []
    interrupt_after_step_10(run)
    monkeypatch.chdir(places["second"])
    result = train("--config", str(config), "--resume")  # the user's config, from elsewhere: the same run
    assert result.exit_code == 0 and f"resuming {run} from step 10" in result.output, result.output
    assert list(places["second"].iterdir()) == []
    # an out_dir set on the command line wins over a run's own folder (it is the user's explicit choice)
    result = train("--config", str(run / "config.yaml"), "--set", "out_dir=mine/r2")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((places["home"] / "mine" / "r2" / "config.yaml").read_text())["out_dir"] == "mine/r2"


def test_out_on_the_command_line_is_the_folder_typed_and_stays_there(places, monkeypatch):
    assert train("--config", str(places["config"]), "--out", "typed").exit_code == 0
    run = places["first"] / "typed"  # relative to where it was typed, as every path option
    assert yaml.safe_load((run / "config.yaml").read_text())["out_dir"] == str(run)  # outside $ALIGN_HOME: absolute
    interrupt_after_step_10(run)
    monkeypatch.chdir(places["second"])
    result = train("--config", str(run / "config.yaml"), "--resume")
    assert result.exit_code == 0 and f"resuming {run} from step 10" in result.output, result.output
    assert list(places["second"].iterdir()) == []


# ---------------------------------------------------------------------------------------------- studies

def test_a_copied_study_folder_continues_in_place_and_a_relative_study_dir_is_under_align_home(places, tmp_path,
                                                                                            monkeypatch):
    study = {key: value for key, value in yaml.safe_load(places["config"].read_text()).items() if key != "optim"}
    study.update(name="where", study_dir="studies/rel", workers=1, reference="adamw",
                 grid={"optimizers": ["adamw"], "lrs": [0.01], "rhos": [0.05], "seeds": [0, 1]})
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    dry = runner.invoke(app, ["compare", "--config", str(config), "--dry-run"])
    assert json.loads(dry.output)["study_dir"] == str(places["home"] / "studies" / "rel")
    result = runner.invoke(app, ["compare", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    original = places["home"] / "studies" / "rel"
    assert list(places["first"].iterdir()) == []
    cell = sorted((original / "runs").iterdir())[0].name
    finished = (original / "runs" / cell / FINAL).read_bytes()

    copy = tmp_path / "copied-study"
    shutil.copytree(original, copy)
    interrupt_after_step_10(copy / "runs" / cell)
    before = tree(original)
    monkeypatch.chdir(places["second"])
    assert (copy / "config.yaml").read_text().startswith("# align compare --config STUDY/config.yaml")
    result = runner.invoke(app, ["compare", "--config", str(copy / "config.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 already finished" in result.output
    assert tree(original) == before
    assert (copy / "runs" / cell / FINAL).read_bytes() == finished
    assert (copy / "results.csv").read_bytes() == (original / "results.csv").read_bytes()
    assert yaml.safe_load((copy / "config.yaml").read_text())["study_dir"] == str(copy)
    assert list(places["second"].iterdir()) == []
