"""Disk full (simulated, no root needed) while `align train`, `align compare` or `align eval` writes: one line
naming the file, exit 2, no temporary file left, the last checkpoint still valid and the metrics log whole; then
the same command without the fault resumes to results byte-identical to an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from align.train import run_dir
from align.cli.main import app
from faults import FullDisk, assert_same_run, files_under, one_error_line, same_bytes, temp_files
from helpers import make_cache, train_config

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
STEPS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A cache, a train config and a study config; the uninterrupted run and study to compare with."""
    root = tmp_path_factory.mktemp("disk-full")
    data = make_cache(root / "cache")
    small_eval = {"every": 10, "sharpness_batches": 1, "hessian_iters": 2, "hutchinson_samples": 2,
                  "sharpness_ascent_steps": 1}
    cfg = train_config(data, optim={"name": "sam", "lr": 1e-2, "rho": 0.05, "base": "adamw"},
                       schedule={"steps": STEPS, "batch_size": 64, "warmup_steps": 4}, eval=small_eval,
                       checkpoint_every=10, loss_at_step=30)
    (root / "train.yaml").write_text(yaml.safe_dump(cfg))
    study = train_config(data, schedule={"steps": 20, "batch_size": 64, "warmup_steps": 2}, eval=small_eval,
                         checkpoint_every=10, loss_at_step=20)
    study.update(name="full", workers=1, reference="sam", bootstrap_samples=200,
                 grid={"optimizers": ["sgd", "sam"], "lrs": [0.01], "rhos": [0.05], "seeds": [0, 1]})
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    out = {"root": root, "train": root / "train.yaml", "study": root / "study.yaml"}
    assert train(out, root / "reference").exit_code == 0
    return out


def train(setup: dict, run, *extra: str):
    return runner.invoke(app, ["train", "--config", str(setup["train"]), "--out", str(run), "--no-progress", *extra])


def compare(setup: dict, study):
    return runner.invoke(app, ["compare", "--config", str(setup["study"]), "--out", str(study), "--no-progress"])


def assert_disk_full_line(line: str, disk: FullDisk, final_name: str) -> None:
    assert disk.failed, "the simulated disk never filled: the pattern matched no write"
    assert line.startswith("error: no space left on the device writing ") and final_name in line, line
    assert "GB free" in line and "run the same command again" in line


# -- align train ----------------------------------------------------------------------------------------------

TRAIN_CASES = {  # name → (temporary or real file name that hits the full disk, nth such file, file the line names)
    "the run's config.yaml": (".config.yaml.*.tmp", 1, "config.yaml"),
    "a checkpoint's tensor half": (".step-0000020.safetensors.*.tmp", 1, "step-0000020.safetensors"),
    "a checkpoint's JSON half": (".step-0000030.json.*.tmp", 1, "step-0000030.json"),
    "a metrics.jsonl append (torn line)": ("metrics.jsonl", 25, "metrics.jsonl"),
    "the best head": (".best.safetensors.*.tmp", 2, "best.safetensors"),
    "results.json": (".results.json.*.tmp", 1, "results.json"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_on_a_full_disk_is_one_line_then_resumes_byte_identical(case, setup, tmp_path, monkeypatch):
    pattern, nth, final_name = TRAIN_CASES[case]
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        disk = FullDisk(m, tmp_path, pattern, nth)
        result = train(setup, run)
    assert_disk_full_line(one_error_line(result), disk, final_name)
    assert temp_files(run) == []
    assert not (run / "results.json").exists()
    if (run / "metrics.jsonl").exists():  # whole lines only: the failed append was cut off again
        assert (run / "metrics.jsonl").read_bytes().endswith(b"\n")
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for step in run_dir.list_checkpoints(run):  # every checkpoint that counts is whole
        run_dir.load_checkpoint(run, step)

    again = train(setup, run, "--resume")
    assert again.exit_code == 0, again.output
    assert_same_run(setup["root"] / "reference", run, STEPS)


def test_eval_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(setup["root"] / "reference", run)
    for pattern, args, final_name in [(".test-best.json.*.tmp", [], "test-best.json"),
                                      (".out.json.*.tmp", ["--out", str(tmp_path / "out.json")], "out.json")]:
        with monkeypatch.context() as m:
            disk = FullDisk(m, tmp_path, pattern)
            result = runner.invoke(app, ["eval", str(run), "--split", "test", *args])
        assert_disk_full_line(one_error_line(result, after_progress=bool(args)), disk, final_name)
        assert temp_files(tmp_path) == []
        assert not (tmp_path / "out.json").exists()


# -- align compare ----------------------------------------------------------------------------------------------

COMPARE_CASES = {
    "the study's config.yaml": (".config.yaml.*.tmp", 1, "config.yaml"),
    "a cell's checkpoint (third cell)": (".step-0000010.json.*.tmp", 3, "step-0000010.json"),
    "results.csv": (".results.csv.*.tmp", 1, "results.csv"),
    "a plot": (".heatmap_recall.*.tmp.png", 1, "heatmap_recall.png"),
    "report.md": (".report.md.*.tmp", 1, "report.md"),
}
SLOW_COMPARE_CASES = {"the study's config.yaml", "results.csv", "report.md"}  # ≈ 10 s each: the default run keeps two
STUDY_FILES = ["results.csv", "summary.csv", "robustness.csv", "table3.csv", "report.md"]


@pytest.fixture(scope="module")
def reference_study(setup) -> object:
    mp = pytest.MonkeyPatch()  # the study's cells run in this process (workers=1)
    mp.setattr(os, "cpu_count", lambda: 1)  # one thread per cell, as in the runs it is compared with
    try:
        study = setup["root"] / "reference-study"
        assert compare(setup, study).exit_code == 0
    finally:
        mp.undo()
    return study


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_COMPARE_CASES else c
                                  for c in COMPARE_CASES])
def test_compare_on_a_full_disk_is_one_line_then_reruns_byte_identical(case, setup, reference_study, tmp_path,
                                                                       monkeypatch):
    pattern, nth, final_name = COMPARE_CASES[case]
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    study = tmp_path / "study"
    with monkeypatch.context() as m:
        disk = FullDisk(m, tmp_path, pattern, nth)
        result = compare(setup, study)
    assert_disk_full_line(one_error_line(result, after_progress=True), disk, final_name)  # after "study full: 4 runs"
    assert temp_files(study) == []
    assert not (study / "report.md").exists()

    again = compare(setup, study)
    assert again.exit_code == 0, again.output
    assert files_under(study) == files_under(reference_study)
    for name in STUDY_FILES:
        assert same_bytes(reference_study / name, study / name), name
    for cell in (p.name for p in (reference_study / "runs").iterdir()):
        assert_same_run(reference_study / "runs" / cell, study / "runs" / cell, 20)
