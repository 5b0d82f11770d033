"""`align train` from the command line: bad input is one line, exit 2, nothing written; divergence exits 0;
every YAML under configs/train/ validates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from align.common.config import load_config
from align.cli.main import app
from helpers import data_section, synthetic_split, train_config, write_cache

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show that a failed command changed nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture()
def config_file(cache_data, tmp_path) -> Path:
    return write_yaml(tmp_path / "small.yaml",
                      train_config(cache_data, schedule={"steps": 20}, eval={"every": 10, "sharpness": False}))


def test_train_writes_a_run_directory_that_reruns_from_its_own_config(config_file, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config_file), "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "mean_R@1" in result.output and "status done" in result.output
    assert {"config.yaml", "metrics.jsonl", "results.json"} <= {p.name for p in run.iterdir()}
    assert (run / "config.yaml").read_text().startswith("# align train --config RUN/config.yaml --resume")
    # The resolved config re-runs as is (to another folder: its own folder already holds this run).
    again = runner.invoke(app, ["train", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "again"),
                                "--no-progress"])
    assert again.exit_code == 0, again.output
    a, b = (json.loads((d / "results.json").read_text()) for d in (run, tmp_path / "again"))
    assert a["best_test"] == b["best_test"] and a["final_loss"] == b["final_loss"]


def test_out_dir_defaults_to_the_config_field_then_data_runs(config_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGN_HOME", raising=False)
    result = runner.invoke(app, ["train", "--config", str(config_file),  # with the progress bar
                                 "--set", "schedule.steps=10", "--set", "eval.test_split=null"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "runs" / "small" / "results.json").is_file()
    result = runner.invoke(app, ["train", "--config", str(config_file), "--no-progress", "--set", "out_dir=elsewhere",
                                 "--set", "schedule.steps=10", "--set", "eval.test_split=null"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "elsewhere" / "results.json").is_file()  # a config's out_dir: under the data root


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr' (did you mean 'lr'?); valid keys here:"),
    ("schedul.steps=5", "unknown key 'schedul'"),
    ("schedule.steps=many", "schedule.steps"),
    ("optim.name=adamax", "unknown optimizer 'adamax'"),
    ("eval.select=median", "eval.select"),
])
def test_bad_config_values_are_one_line_and_write_nothing(override, expected, config_file, tmp_path):
    run = tmp_path / "run"
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config_file), "--out", str(run), "--set", override]))
    assert expected in line
    if "valid keys" in expected:
        assert "weight_decay" in line and "rho" in line  # the valid keys of the optim section are listed
    assert not run.exists()


def test_missing_cache_is_one_line_and_writes_nothing(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", train_config(data_section(tmp_path / "empty-cache")))
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run")]))
    assert "no cached embeddings for split 'train'" in line and "align embed" in line
    assert not (tmp_path / "run").exists()


def test_head_dims_that_do_not_match_the_cache_are_one_line_and_write_nothing(config_file, tmp_path):
    run = tmp_path / "run"
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config_file), "--out", str(run),
                                              "--set", "image_dim=512"]))
    assert "image_dim=512" in line and "dimension 32" in line
    # A locked identity head needs out_dim = the embedding's own dimension.
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config_file), "--out", str(run),
                                              "--set", "head.lock=image", "--set", "head.out_dim=16"]))
    assert "head.out_dim=32" in line
    assert not run.exists()


def test_a_split_whose_dims_differ_from_train_is_caught(tmp_path):
    data = data_section(tmp_path / "cache")
    write_cache(data, "train", *synthetic_split("train", 256))
    write_cache(data, "val", *synthetic_split("val", 64, image_dim=40))
    write_cache(data, "test", *synthetic_split("test", 64))
    config = write_yaml(tmp_path / "c.yaml", train_config(data))
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run")]))
    assert "image_dim=32" in line and "dimension 40" in line
    assert not (tmp_path / "run").exists()


def test_existing_run_needs_resume_and_resume_refuses_another_configuration(config_file, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--config", str(config_file), "--out", str(run), "--no-progress",
                               "--set", "schedule.steps=20"]).exit_code == 0
    before = snapshot(run)
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config_file), "--out", str(run)]))
    assert "already holds a run" in line and "--resume" in line
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config_file), "--out", str(run), "--resume",
                                              "--set", "optim.lr=0.5"]))
    assert "another configuration" in line and "optim.lr" in line
    assert snapshot(run) == before


def test_resume_refuses_a_checkpoint_from_another_configuration(config_file, tmp_path):
    """config.yaml may be edited by hand; the checkpoint's own config hash still guards the resume."""
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--config", str(config_file), "--out", str(run), "--no-progress",
                               "--set", "schedule.steps=20", "--set", "checkpoint_every=10"]).exit_code == 0
    (run / "results.json").unlink()  # as if the run had been interrupted
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["schedule"]["batch_size"] = 32
    write_yaml(run / "config.yaml", edited)
    before = snapshot(run)
    line = one_error_line(runner.invoke(app, ["train", "--config", str(run / "config.yaml"), "--resume"]))
    assert "checkpoint step" in line and "another configuration" in line and "schedule.batch_size" in line
    assert snapshot(run) == before


def test_diverging_run_exits_0_and_says_diverged(cache_data, tmp_path):
    config = write_yaml(tmp_path / "boom.yaml", train_config(
        cache_data, optim={"name": "sam", "base": "sgd", "lr": 0.5, "rho": 5.0}, loss={"clamp": "upper"},
        schedule={"warmup_steps": 0}, eval={"sharpness": False}))
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "diverged" in result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "diverged" and results["diverged_at"] is not None


def _leaves(tree: object, keys: tuple[str, ...] = ()):
    """(path of keys, value) for every non-mapping value of a YAML tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*keys, key))
    else:
        yield keys, tree


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_train_config_validates_and_names_its_command(path):
    from align.train.config import TrainConfig

    first = path.read_text().splitlines()[0]
    assert first.startswith("# align ") and f"configs/train/{path.name}" in first
    cfg = load_config(TrainConfig, path)
    # Every value the file sets is the loaded config's value at the same place (none dropped, renamed or altered).
    loaded = cfg.model_dump(mode="json")
    raw = yaml.safe_load(path.read_text())
    if "data_from" in raw:  # a packaged embed config's settings are the data section
        raw["data"] = yaml.safe_load((REPO / "configs" / f"{raw.pop('data_from')}.yaml").read_text())
    for keys, value in _leaves(raw):
        got = loaded
        for key in keys:
            got = got[key]
        assert got == value, (".".join(keys), got, value)


def test_synthetic_default_uses_the_offline_embed_config_data_section_verbatim():
    from align.cache.key import cache_key, load_embed_config

    train = load_embed_config(REPO / "configs" / "train" / "synthetic_msam.yaml")
    embed = load_embed_config(REPO / "configs" / "embed" / "synthetic_offline.yaml")
    assert train == embed
    assert all(cache_key(train, s) == cache_key(embed, s) for s in ("train", "val", "test"))


def test_the_results_table_lists_the_registrys_metrics_the_run_measured():
    """Rows in the registry's order (``metric_names``: recall at each k, mean R@1, alignment, zero-shot), only those
    some column has, no rank statistics; a missing value is a dash."""
    from align.cli.common import console
    from align.cli.train import print_results

    val = {"i2t_R@1": 0.5, "i2t_R@5": 0.75, "t2i_R@1": 0.25, "t2i_R@5": 0.5, "mean_R@1": 0.375, "i2t_mean_rank": 3.0,
           "mutual_knn": 0.125, "cka": 0.0625}
    results = {"best_val": val, "best_test": dict(val, zeroshot_top1=0.875), "final_test": None,
               "sharpness": {"best": None}, "final_loss": None, "status": "done", "steps_done": 20,
               "best_step": 10, "wall_time_s": 1.5}
    with console.capture() as captured:
        print_results(results, "RUN", ks=[1, 5])
    rows = [line.split("│")[1:-1] for line in captured.get().splitlines() if line.startswith("│")]
    assert [[cell.strip() for cell in row] for row in rows] == [
        ["i2t_R@1", "0.5000", "0.5000", "—"], ["i2t_R@5", "0.7500", "0.7500", "—"],
        ["t2i_R@1", "0.2500", "0.2500", "—"], ["t2i_R@5", "0.5000", "0.5000", "—"],
        ["mean_R@1", "0.3750", "0.3750", "—"], ["mutual_knn", "0.1250", "0.1250", "—"],
        ["cka", "0.0625", "0.0625", "—"], ["zeroshot_top1", "—", "0.8750", "—"]]
    assert "status done, steps 20, best step 10, final loss —, 1.5 s" in captured.get()


def test_results_json_keeps_its_keys_in_their_order(cache_data, tmp_path):
    """results.json as ``align compare`` and earlier versions read it: these keys, in this order."""
    from align.train.config import TrainConfig
    from align.train.loop import train

    cfg = TrainConfig.model_validate(train_config(cache_data, schedule={"steps": 10},
                                                  eval={"every": 10, "sharpness": False}))
    train(cfg, tmp_path / "run", progress=False)
    assert list(json.loads((tmp_path / "run" / "results.json").read_text())) == [
        "status", "diverged_at", "diverge_reason", "steps_done", "best_step", "select", "best_val", "final_val",
        "best_test", "final_test", "max_val", "loss_at_step", "loss_at_step_T", "final_loss", "sharpness",
        "optimizer", "two_pass", "skipped_perturbations", "config_hash", "device", "precision", "wall_time_s",
        "zeroshot", "uniform_plateau_steps", "collapsed"]
