"""`--report-to tensorboard,wandb,mlflow` on `align train` and `align compare`: what each tracker wrote is read back
with the tracker's own reader, no network, and checked against metrics.jsonl, config.yaml and summary.csv.

- TensorBoard: its event files (``EventAccumulator``, and the raw events for duplicates); the config as HParams.
- MLflow: its local ``file:`` store under $ALIGN_HOME (``MlflowClient``): metrics, params, one run per run folder.
- wandb: its offline run folders, read here from the transaction log with wandb's own protobuf ``Record``.
- A run killed with SIGKILL (its trackers may lag its log) or stopped by an error (its trackers hold steps past
  its newest checkpoint), then resumed: every step exactly once in each of them, in one tracker run.

The trackers are optional (``pip install 'align[track]'``): each test that reads one skips when it is missing. The
parsing, the hash and the "not installed" refusal need none.
"""
from __future__ import annotations

import csv
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from align.cli.main import app
from helpers import data_section, make_cache, train_config
from test_faults_kill import run_driver

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
TRACKERS = ("tensorboard", "wandb", "mlflow")
STEPS = 30


def tracker_env(root: Path) -> dict[str, str]:
    """Offline by default, and nothing outside ``root``: no WANDB_MODE or MLFLOW_TRACKING_URI from the shell, the
    data root (and so the MLflow store) and wandb's own folders in the test's folder."""
    return {"ALIGN_HOME": str(root / "home"), "WANDB_CONFIG_DIR": str(root / "wandb-config"),
            "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data")}


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in tracker_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    return tmp_path


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def flat(config: dict, prefix: str = "") -> dict:
    """config.yaml as dotted keys → values, written independently of align.train.tracking.flat_params."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- without any tracker ------------------------------------------------------------------------------------

def test_report_to_takes_a_comma_list_a_list_or_none():
    from align.train.config import TrainConfig

    base = train_config(data_section(Path("/nowhere")))
    assert TrainConfig.model_validate(base).report_to == []
    assert TrainConfig.model_validate(dict(base, report_to="tensorboard, MLflow")).report_to == ["tensorboard",
                                                                                                 "mlflow"]
    assert TrainConfig.model_validate(dict(base, report_to=["wandb", "wandb"])).report_to == ["wandb"]
    assert TrainConfig.model_validate(dict(base, report_to="none")).report_to == []


@pytest.mark.parametrize("value, says", [("tensorbord", "unknown tracker 'tensorbord'"),
                                         ("none,wandb", "none cannot be combined")])
def test_an_unknown_tracker_is_one_line_and_exit_2_before_any_write(tmp_path, value, says):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(make_cache(tmp_path / "cache"))))
    for argv in (["train", "--config", str(config), "--out", str(tmp_path / "run")],
                 ["compare", "--config", str(config), "--out", str(tmp_path / "study")]):
        result = runner.invoke(app, [*argv, "--report-to", value, "--no-progress"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0], result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists()


@pytest.mark.parametrize("tracker, package", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                              ("mlflow", "mlflow-skinny")])
def test_a_tracker_that_is_not_installed_is_one_line_and_exit_2(tmp_path, monkeypatch, tracker, package):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` now fails, as when it is not installed
    data = make_cache(tmp_path / "cache")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(data)))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(dict(train_config(data), name="s", workers=1,
                                         grid={"optimizers": ["sgd", "adamw"], "seeds": [0]}, reference="sgd")))
    for argv in (["train", "--config", str(config), "--out", str(tmp_path / "run")],
                 ["compare", "--config", str(study), "--out", str(tmp_path / "study")]):
        result = runner.invoke(app, [*argv, "--report-to", tracker, "--no-progress"])  # alone: CI has no tracker
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and f"{package} is not installed" in lines[0] and "align[track]" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists()


@pytest.mark.parametrize("command", ["train", "compare"])
def test_report_to_help_names_the_track_extra_that_rich_markup_would_eat(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "pip install 'align[track]'" in " ".join(result.output.replace("│", " ").split()), result.output


def test_report_to_stays_out_of_the_config_hash(tmp_path):
    """Where a run reports is not what it computes: a run resumes with another --report-to, and old runs keep
    their config_hash."""
    from align.train.config import TrainConfig, hashed_config, pack_key
    from align.train.identity import config_hash

    base = TrainConfig.model_validate(train_config(data_section(tmp_path)))
    tracked = base.model_copy(update={"report_to": ["tensorboard", "wandb"], "report_group": "study"})
    assert config_hash(hashed_config(tracked)) == config_hash(hashed_config(base))
    assert "report_to" not in hashed_config(base) and pack_key(tracked) == pack_key(base)


def test_ranks_other_than_0_report_nothing(tmp_path):
    from align.common.distributed import Rank
    from align.train.run_dir import RunDir

    twin = RunDir.for_rank(tmp_path / "run", Rank(rank=1, world_size=2))
    with twin.reporting(list(TRACKERS), None, {"seed": 0}):
        twin.append_metrics({"kind": "train", "step": 1, "loss": 1.0})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow"])
def test_a_tracker_holding_part_of_a_steps_tags_gets_the_rest_and_nothing_twice(offline_env, tracker):
    """A killed writer can leave step 5's loss written and its lr not: the resume gives that tracker step 5's lr
    and nothing it holds."""
    pytest.importorskip(tracker)
    from align.train.tracking import RunTracking

    run = offline_env / "run"
    run.mkdir()
    logged = [{"kind": "train", "step": s, "loss": 1.0 / s, "lr": 0.1 * s} for s in range(1, 7)]
    first = RunTracking.open([tracker], run, None, {"seed": 0}, logged[:4])
    first.trackers[0].log({"train/loss": logged[4]["loss"]}, 5)  # step 5 cut short: its loss only
    first.close(failed=True)
    second = RunTracking.open([tracker], run, None, {"seed": 0}, logged[:5])  # the log as the resume keeps it
    second.record(logged[5])
    second.close()
    for tag in ("loss", "lr"):
        assert tracker_series(tracker, run, f"train/{tag}") == [(r["step"], r[tag]) for r in logged]


def tracker_series(tracker: str, run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` in what ``tracker`` wrote for ``run``, every entry (duplicates kept), by step."""
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        return sorted((e.step, pytest.approx(v.tensor.float_val[0], rel=1e-6))
                      for p in sorted((run / "tensorboard").glob("events.*")) for e in EventFileLoader(str(p)).Load()
                      for v in e.summary.value if v.tag == tag)
    from mlflow.tracking import MlflowClient

    ids = json.loads((run / "tracking.json").read_text())["mlflow"]
    history = MlflowClient(tracking_uri=ids["tracking_uri"]).get_metric_history(ids["run_id"], tag)
    return sorted((m.step, m.value) for m in history)


# -- one run, killed and resumed, read back from every tracker ------------------------------------------------

@pytest.fixture(scope="module")
def tracked_runs(tmp_path_factory) -> dict:
    """In one driver: an uninterrupted run, and one killed with SIGKILL mid-step at step 23 (its newest checkpoint:
    step 20; its trackers may hold more, or less) and resumed; both reporting to all three trackers."""
    for module in TRACKERS:
        pytest.importorskip(module)
    root = tmp_path_factory.mktemp("tracked")
    cfg = train_config(make_cache(root / "cache"), optim={"name": "msam", "lr": 1e-2, "rho": 0.05},
                       schedule={"steps": STEPS, "batch_size": 64, "warmup_steps": 3},
                       eval={"every": 10, "sharpness_batches": 1, "hessian_iters": 2, "hutchinson_samples": 2,
                             "sharpness_ascent_steps": 1}, checkpoint_every=10, loss_at_step=20)
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    report = ["--report-to", ",".join(TRACKERS), "--no-progress"]
    steps = [{"argv": ["train", "--config", str(config), "--out", str(root / "whole"), *report], "kill": None},
             {"argv": ["train", "--config", str(config), "--out", str(root / "killed"), *report],
              "kill": {"call": "align.train.pack:HeadPack._grads", "nth": 45}},
             {"argv": ["train", "--config", str(root / "killed" / "config.yaml"), "--resume", *report], "kill": None}]
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        for name, value in tracker_env(root).items():
            mp.setenv(name, value)
        outcomes = run_driver(root / "driver", steps, preload=["faiss", "safetensors.torch"])
        _fail_then_resume(mp, config, root / "failed", report)
    whole, killed, resumed = outcomes
    assert whole["code"] == 0, whole["log"][-3000:]
    assert killed["killed"], killed["log"][-3000:]
    assert resumed["code"] == 0 and "resuming" in resumed["log"], resumed["log"][-3000:]
    return {"root": root, "home": root / "home"}


def _fail_then_resume(mp, config: Path, run: Path, report: list[str]) -> None:
    """A run stopped by an error in its 23rd step, then resumed. Unlike a kill, the error closes the trackers, so
    they hold steps 1-22 beyond its newest checkpoint (20): the resume must not log 21 and 22 again."""
    from align.train.pack import HeadPack

    real, calls = HeadPack._grads, [0]

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 45:  # two passes per M-SAM step: the first of step 23
            raise RuntimeError("simulated failure")
        return real(self, *args, **kwargs)

    mp.setattr(HeadPack, "_grads", failing)
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(run), *report])
    assert isinstance(result.exception, RuntimeError) and (run / "tracking.json").is_file(), result.output
    mp.setattr(HeadPack, "_grads", real)
    result = runner.invoke(app, ["train", "--config", str(run / "config.yaml"), "--resume", *report])
    assert result.exit_code == 0, result.output


RUNS = ["whole", "killed", "failed"]


@pytest.mark.parametrize("name", RUNS)
def test_tensorboard_holds_every_record_once_at_its_step(tracked_runs, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tracked_runs["root"] / name
    folder = run / "tensorboard"
    seen, hparams = [], {}
    for path in sorted(folder.glob("events.out.tfevents.*")):  # the raw events, every session's file
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    seen.append((value.tag, event.step))
                elif value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    hparams = {k: v for k, v in data.session_start_info.hparams.items()}
    assert len(seen) == len(set(seen)), "a step was written twice"
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    train = records(run, "train")
    steps = [s.step for s in accumulator.Scalars("train/loss")]
    assert steps == [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "log_scale", "effective_radius"):
        assert [s.value for s in accumulator.Scalars(f"train/{key}")] == [float(np.float32(r[key])) for r in train]
    val = records(run, "val")
    assert [(s.step, s.value) for s in accumulator.Scalars("val/mean_R@1")] == [
        (r["step"], float(np.float32(r["mean_R@1"]))) for r in val]
    results = json.loads((run / "results.json").read_text())
    (test,) = accumulator.Scalars("test/best/mean_R@1")
    assert (test.step, test.value) == (STEPS, float(np.float32(results["best_test"]["mean_R@1"])))
    config = flat(yaml.safe_load((run / "config.yaml").read_text()))
    config.pop("out_dir")  # the run's folder: its TensorBoard run name already (see the study's test below)
    assert set(hparams) == {k for k, v in config.items() if v is not None}  # unset: left out, numbers stay numbers
    for key, value in config.items():
        if value is None:
            continue
        got = hparams[key]
        if isinstance(value, bool):
            assert got.bool_value is value, key
        elif isinstance(value, (int, float)):
            assert got.number_value == value, key
        else:
            assert got.string_value == (value if isinstance(value, str) else json.dumps(value)), key


@pytest.mark.parametrize("name", RUNS)
def test_mlflow_holds_every_metric_once_and_the_config_as_params(tracked_runs, name):
    from mlflow.tracking import MlflowClient

    run = tracked_runs["root"] / name
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    client = MlflowClient(tracking_uri=(tracked_runs["home"] / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("align")
    (found,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert found.info.status == "FINISHED"
    for key in ("loss", "lr", "grad_norm", "perturbation_norm"):
        history = sorted(client.get_metric_history(found.info.run_id, f"train/{key}"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["step"], r[key]) for r in records(run, "train")]
    history = client.get_metric_history(found.info.run_id, "val/mean_R_at_1")  # MLflow takes no @ in a name
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["mean_R@1"]) for r in records(run, "val")]
    config = flat(yaml.safe_load((run / "config.yaml").read_text()))
    assert found.data.params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}


def wandb_rows(log: Path) -> list[tuple[str, object]]:
    """(record type, record) of a wandb transaction log: a LevelDB-style log of 32 KiB blocks after a 7-byte
    header, each chunk a crc32, a length and a type (full, first, middle, last) before its bytes."""
    from wandb.proto import wandb_internal_pb2

    data, pos, out, pending = log.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending = (b"" if kind in (1, 2) else pending) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            out.append((record.WhichOneof("record_type"), record))
    return out


@pytest.mark.parametrize("name", RUNS)
def test_wandb_offline_history_holds_every_step_once_in_one_run(tracked_runs, name):
    run = tracked_runs["root"] / name
    run_id = json.loads((run / "tracking.json").read_text())["wandb"]["id"]
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    assert sessions and all(s.name.endswith(f"-{run_id}") for s in sessions)  # every session continues one run
    assert len(sessions) == (1 if name == "whole" else 2)
    history = {}
    for session in sessions:
        for kind, record in wandb_rows(session / f"run-{run_id}.wandb"):
            if kind == "run":
                assert (record.run.run_id, record.run.display_name, record.run.project) == (run_id, name, "align")
            if kind != "history":
                continue
            values = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            for tag, value in values.items():
                if not tag.startswith("_"):
                    assert (tag, record.history.step.num) not in history, "a step was written twice"
                    history[tag, record.history.step.num] = value
    train = records(run, "train")
    assert sorted(s for t, s in history if t == "train/loss") == list(range(1, STEPS + 1))
    assert all(history["train/loss", r["step"]] == r["loss"] for r in train)
    assert sorted((s, history[t, s]) for t, s in history if t == "val/mean_R@1") == [
        (r["step"], r["mean_R@1"]) for r in records(run, "val")]


def test_the_resumed_runs_kept_one_tracker_run_and_their_logs_equal_the_uninterrupted_one(tracked_runs):
    from mlflow.tracking import MlflowClient

    root = tracked_runs["root"]
    for name in ("killed", "failed"):
        assert (root / "whole" / "metrics.jsonl").read_bytes() == (root / name / "metrics.jsonl").read_bytes()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tracked_runs["home"] / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("align")
    names = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
    assert names == ["failed", "killed", "whole"]  # each resume continued its MLflow run, no second one


# -- a study: each cell its own tracker run, grouped by the study; the summary in TensorBoard's HParams view ----

@pytest.fixture(scope="module")
def tracked_study(tmp_path_factory) -> dict:
    for module in TRACKERS:
        pytest.importorskip(module)
    root = tmp_path_factory.mktemp("tracked-study")
    config = dict(train_config(make_cache(root / "cache"), schedule={"steps": 12, "batch_size": 64,
                                                                     "warmup_steps": 2},
                               eval={"every": 6, "sharpness": False}, checkpoint_every=6, loss_at_step=6),
                  name="tracked", workers=1, reference="sam",
                  grid={"optimizers": ["sam", "msam"], "lrs": [0.01], "rhos": [0.05], "seeds": [0, 1],
                        "method_axes": {"msam": {"alpha": [0.5, 1.0]}}})
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        for name, value in tracker_env(root).items():
            mp.setenv(name, value)
        result = runner.invoke(app, ["compare", "--config", str(path), "--out", str(root / "study"),
                                     "--report-to", ",".join(TRACKERS), "--no-progress"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return {"root": root, "study": root / "study", "home": root / "home"}


CELLS = ["sam_lr0.01_rho0.05_s0", "sam_lr0.01_rho0.05_s1", "msam_lr0.01_rho0.05_alpha0.5_s0",
         "msam_lr0.01_rho0.05_alpha0.5_s1", "msam_lr0.01_rho0.05_alpha1_s0", "msam_lr0.01_rho0.05_alpha1_s1"]


def test_each_cell_of_a_packed_study_is_its_own_tracker_run_grouped_by_the_study(tracked_study):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study = tracked_study["study"]
    assert sorted(p.name for p in (study / "runs").iterdir()) == sorted(CELLS)
    layout = json.loads((study / "packs.json").read_text())
    assert max(len(p) for p in layout["packs"]) > 1  # heads trained as one pack, logged as separate runs
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tracked_study["home"] / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracked")  # the study is the cells' experiment
    by_name = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(by_name) == sorted(CELLS)
    for cell in CELLS:
        run = study / "runs" / cell
        losses = [r["loss"] for r in records(run, "train")]
        accumulator = EventAccumulator(str(run / "tensorboard"))
        accumulator.Reload()
        assert [s.value for s in accumulator.Scalars("train/loss")] == [float(np.float32(x)) for x in losses]
        history = client.get_metric_history(by_name[cell].info.run_id, "train/loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == losses
        assert by_name[cell].data.params["optim.name"] == cell.split("_")[0]
        run_id = json.loads((run / "tracking.json").read_text())["wandb"]["id"]
        (session,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
        (meta,) = [r for kind, r in wandb_rows(session / f"run-{run_id}.wandb") if kind == "run"]
        assert (meta.run.display_name, meta.run.run_group) == (cell, "tracked")
    assert len({json.loads((study / "runs" / c / "tracking.json").read_text())["wandb"]["id"] for c in CELLS}) == 6


def test_compare_writes_the_summary_table_for_tensorboards_hparams_view(tracked_study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    study = tracked_study["study"]
    with open(study / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert sorted(p.name for p in (study / "hparams").iterdir()) == sorted(r["optimizer"] for r in summary)
    for row in summary:
        folder = study / "hparams" / row["optimizer"]
        (events,) = folder.glob("events.out.tfevents.*")
        starts = [plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content).session_start_info
                  for e in EventFileLoader(str(events)).Load() for v in e.summary.value
                  if v.metadata.plugin_data.plugin_name == "hparams"]
        (start,) = starts
        assert start.hparams["optim.name"].string_value == row["optimizer"]
        assert start.hparams["optim.lr"].number_value == float(row["lr"])
        assert start.hparams["optim.rho"].number_value == float(row["rho"])
        if row["optimizer"] == "msam":
            assert start.hparams["optim.alpha"].number_value == float(row["alpha"])
        else:  # SAM has no α: left out, so that α stays a number in the view
            assert "optim.alpha" not in start.hparams
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        (value,) = accumulator.Scalars("summary/mean_R@1_mean")
        assert value.value == pytest.approx(float(row["mean_R@1_mean"]), rel=1e-6)


def test_the_hparams_that_differ_between_cells_are_the_grids_axes_not_their_folders(tracked_study):
    """TensorBoard's HParams view shows at first the first five hyper-parameters (by name) whose values differ
    between its runs: a per-cell value that is not an axis of the grid (the cell's out_dir) would take a column
    and push the seed out of view."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    values: dict[str, set] = {}
    for cell in CELLS:
        (events,) = (tracked_study["study"] / "runs" / cell / "tensorboard").glob("events.out.tfevents.*")
        (start,) = [plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content).session_start_info
                    for e in EventFileLoader(str(events)).Load() for v in e.summary.value
                    if v.metadata.plugin_data.plugin_name == "hparams"]
        for key, value in start.hparams.items():
            values.setdefault(key, set()).add(value.SerializeToString())
    differ = {key for key, seen in values.items() if len(seen) > 1}
    # the grid: optimizers sam and msam, one lr, one ρ, msam's α ∈ {0.5, 1}, seeds 0 and 1
    assert differ == {"optim.name", "optim.alpha", "seed"}
