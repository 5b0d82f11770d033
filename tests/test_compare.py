"""`align compare` end to end through the CLI on a tiny grid, checked against the run files themselves."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from align.cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


@pytest.fixture(scope="module")
def study_config(tmp_path_factory, tiny_dir) -> Path:
    """A 2 optimizers × 2 ρ × 1 lr × 2 seeds study on a tiny synthetic set and a tiny random open_clip model."""
    root = tmp_path_factory.mktemp("study")
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    config = {  # bootstrap_samples is unused now, but configs saved by older studies have it and must load
        "name": "tiny", "study_dir": str(root / "out"), "workers": 2, "reference": "sam", "bootstrap_samples": 500,
        "data": {"dataset": {"kind": "synthetic", "synthetic": {"train_images": 24, "val_images": 8, "test_images": 8,
                                                                "image_size": 32, "captions_per_image": 2}},
                 "splits": ["train", "val", "test"], "image_encoder": encoder, "text_encoder": encoder,
                 "batch_size": 8, "device": "cpu", "cache_root": str(root / "cache")},
        "head": {"kind": "linear", "out_dim": 8},
        "optim": {"base": "adamw"},
        "schedule": {"steps": 24, "batch_size": 8, "warmup_steps": 2},
        "eval": {"every": 8, "knn_k": 2, "ks": [1, 5], "hessian_iters": 3, "hutchinson_samples": 2,
                 "sharpness_batches": 1, "sharpness_ascent_steps": 1},
        "loss_at_step": 12, "checkpoint_every": 8, "device": "cpu",
        "grid": {"optimizers": ["sam", "msam"], "lrs": [0.01], "rhos": [0.05, 0.5], "seeds": [0, 1]},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def finished_study(study_config) -> Path:
    result = runner.invoke(app, ["compare", "--config", str(study_config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Best configuration per optimizer" in result.output and "Robustness on VALIDATION" in result.output
    assert "(n = 2: no interval)" in result.output and "n < 3: no test" in result.output
    return Path(yaml.safe_load(study_config.read_text())["study_dir"])


def test_results_csv_is_one_row_per_run_equal_to_its_results_json(finished_study):
    rows = _csv(finished_study / "results.csv")
    assert len(rows) == 2 * 2 * 1 * 2
    assert {(r["optimizer"], r["rho"], r["seed"]) for r in rows} == {
        (o, rho, s) for o in ("sam", "msam") for rho in ("0.05", "0.5") for s in ("0", "1")}
    for row in rows:
        results = json.loads((finished_study / "runs" / row["run"] / "results.json").read_text())
        config = yaml.safe_load((finished_study / "runs" / row["run"] / "config.yaml").read_text())
        assert config["optim"]["name"] == row["optimizer"] and config["seed"] == int(row["seed"])
        assert config["optim"]["rho"] == float(row["rho"]) and config["optim"]["lr"] == float(row["lr"])
        assert row["status"] == ("ok" if results["status"] == "done" else "diverged")
        for metric in ("mean_R@1", "i2t_R@1", "t2i_R@5", "mutual_knn", "cknna"):
            assert float(row[f"best_test_{metric}"]) == results["best_test"][metric]
            assert float(row[f"final_test_{metric}"]) == results["final_test"][metric]
        assert float(row["loss_at_step"]) == results["loss_at_step"]
        assert float(row["final_loss"]) == results["final_loss"]
        assert float(row["sharpness_hessian_top_eigenvalue"]) == results["sharpness"]["best"]["hessian_top_eigenvalue"]
        # the uniform plateau: the longest stretch of training losses within 5% of ln 8, from its metrics log
        losses = [r["loss"] for r in map(json.loads, (finished_study / "runs" / row["run"] / "metrics.jsonl")
                                         .read_text().splitlines()) if r["kind"] == "train"]
        longest = current = 0
        for loss in losses:
            current = current + 1 if abs(loss - math.log(8)) <= 0.05 * math.log(8) else 0
            longest = max(longest, current)
        assert int(row["uniform_plateau_steps"]) == results["uniform_plateau_steps"] == longest
        assert row["collapsed"] == str(results["collapsed"]) == str(longest >= 3)  # 10% of 24 steps


def test_summary_picks_the_best_validation_config_and_averages_its_seeds(finished_study):
    runs = {}
    for run_dir in (finished_study / "runs").iterdir():
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        runs[run_dir.name] = (config, json.loads((run_dir / "results.json").read_text()))
    summary = {r["optimizer"]: r for r in _csv(finished_study / "summary.csv")}
    for name in ("sam", "msam"):
        by_rho: dict[float, list] = {}
        for config, results in runs.values():
            if config["optim"]["name"] == name:
                by_rho.setdefault(config["optim"]["rho"], []).append(results)
        best_rho = max(sorted(by_rho), key=lambda rho: np.mean([r["best_val"]["mean_R@1"] for r in by_rho[rho]]))
        assert float(summary[name]["rho"]) == best_rho
        tests = [r["best_test"]["mean_R@1"] for r in by_rho[best_rho]]
        assert float(summary[name]["mean_R@1_mean"]) == pytest.approx(np.mean(tests))
        assert float(summary[name]["mean_R@1_std"]) == pytest.approx(np.std(tests, ddof=1))
    sam_tests = {c["seed"]: r["best_test"]["mean_R@1"] for c, r in runs.values()
                 if c["optim"]["name"] == "sam" and c["optim"]["rho"] == float(summary["sam"]["rho"])}
    msam_tests = {c["seed"]: r["best_test"]["mean_R@1"] for c, r in runs.values()
                  if c["optim"]["name"] == "msam" and c["optim"]["rho"] == float(summary["msam"]["rho"])}
    diff = [msam_tests[s] - sam_tests[s] for s in (0, 1)]
    assert float(summary["msam"]["diff_vs_ref"]) == pytest.approx(np.mean(diff))
    # two seeds: no interval (blank in the CSV) and no test, rather than a "95%" interval that covers 50%
    assert summary["msam"]["pairs"] == "2" and summary["msam"]["diff_ci_low"] in ("", "nan")
    assert summary["msam"]["no_interval"] == "n = 2: no interval" and summary["sam"]["no_interval"] == ""
    assert summary["msam"]["verdict"] == "n < 3: no test" and summary["sam"]["verdict"] == "reference"


def test_table3_and_robustness_match_the_run_files(finished_study):
    table = _csv(finished_study / "table3.csv")
    assert len(table) == 4
    for cell in table:
        results = [json.loads((finished_study / "runs" / f"{cell['optimizer']}_lr0.01_rho{float(cell['rho']):g}_s{s}"
                                / "results.json").read_text()) for s in (0, 1)]
        assert float(cell["best_alignment"]) == pytest.approx(np.mean([r["max_val"]["mutual_knn"] for r in results]))
        assert float(cell["final_loss"]) == pytest.approx(np.mean([r["final_loss"] for r in results]))
    for rob in _csv(finished_study / "robustness.csv"):
        assert rob["configs"] == "2"
        val = {rho: np.mean([json.loads((finished_study / "runs" / f"{rob['optimizer']}_lr0.01_rho{rho:g}_s{s}"
                                        / "results.json").read_text())["best_val"]["mean_R@1"] for s in (0, 1)])
               for rho in (0.05, 0.5)}
        assert float(rob["best_val"]) == pytest.approx(max(val.values()))
        assert float(rob["worst_val"]) == pytest.approx(min(val.values()))
        assert 0.5 <= float(rob["within_95pct_val"]) <= 1.0


def test_report_and_plots_are_written(finished_study):
    report = (finished_study / "report.md").read_text()
    for heading in ("## Summary", "## Robustness", "## The paper's Table 3 shape", "## Plots"):
        assert heading in report
    msam_line = next(line for line in report.splitlines() if line.startswith("| msam |"))
    assert "(n = 2: no interval)" in msam_line and "[" not in msam_line  # 2 seeds: never a bracketed interval
    assert "Not tested (n = 2 paired seeds, fewer than 3): `msam`" in report and "Better than" not in report
    for png in ("heatmap_recall.png", "heatmap_mutual_knn.png", "training_curves.png", "best_per_optimizer.png",
                "sharpness_vs_recall.png"):
        assert (finished_study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    saved = yaml.safe_load((finished_study / "config.yaml").read_text())
    assert saved["grid"]["optimizers"] == ["sam", "msam"]


def test_rerun_is_cached_and_an_interrupted_study_resumes_to_the_same_results(study_config, finished_study):
    before = (finished_study / "results.csv").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in (finished_study / "runs").glob("*/results.json")}
    result = runner.invoke(app, ["compare", "--config", str(study_config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "8 already finished" in result.output
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert (finished_study / "results.csv").read_bytes() == before

    # An interruption: one run never started, one stopped after a checkpoint (its results not yet written).
    shutil.rmtree(finished_study / "runs" / "msam_lr0.01_rho0.5_s1")
    interrupted = finished_study / "runs" / "sam_lr0.01_rho0.05_s0"
    (interrupted / "results.json").unlink()
    for late in sorted((interrupted / "checkpoints").glob("step-*"))[2:]:
        late.unlink()
    result = runner.invoke(app, ["compare", "--config", str(study_config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "6 already finished" in result.output
    assert (finished_study / "results.csv").read_bytes() == before


def test_a_rerun_keeps_the_recorded_pack_layout_and_a_damaged_one_is_one_line(study_config, finished_study):
    """packs.json holds every cell once with its pack's threads; a rerun trains a lost cell in its recorded pack
    (the finished cells idle beside it), whatever --pack says now, and writes the same bytes."""
    layout = json.loads((finished_study / "packs.json").read_text())
    keys = [k for p in layout["packs"] for k in p]
    assert sorted(keys) == sorted(p.name for p in (finished_study / "runs").iterdir()) and layout["threads"] >= 1
    before = (finished_study / "results.csv").read_bytes()
    lost = layout["packs"][0][-1]
    shutil.rmtree(finished_study / "runs" / lost)
    saved = (finished_study / "packs.json").read_bytes()
    (finished_study / "packs.json").write_bytes(saved[:-9] + b"]]]]]]]]\n")  # same size, not JSON
    result = runner.invoke(app, ["compare", "--config", str(study_config), "--no-progress"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "packs.json" in errors[0], result.output
    (finished_study / "packs.json").write_bytes(saved)
    result = runner.invoke(app, ["compare", "--config", str(study_config), "--no-progress", "--pack", "1"])
    assert result.exit_code == 0, result.output
    assert f"1 runs in 1 pack(s) of up to {len(layout['packs'][0])} heads" in result.output
    assert (finished_study / "results.csv").read_bytes() == before
    assert (finished_study / "packs.json").read_bytes() == saved


def test_an_old_study_whose_results_lack_the_collapse_count_reruns_and_shows_a_dash(study_config, finished_study,
                                                                                     tmp_path):
    """Results written before collapse was counted load as they are: blank columns, '—' in the tables, no crash;
    the same study with its counts shows them in the terminal's robustness table."""
    result = runner.invoke(app, ["compare", "--config", str(study_config), "--no-progress"])
    assert result.exit_code == 0, result.output
    counts = {}
    for path in (finished_study / "runs").glob("*/results.json"):
        counts.setdefault(path.parent.name.split("_")[0], []).append(json.loads(path.read_text())["collapsed"])
    for name, flags in counts.items():
        line = [line for line in result.output.splitlines() if line.startswith(f" {name} ")][-1]  # robustness
        assert line.split()[-1] == f"{sum(flags)}/{len(flags)}", line

    old = tmp_path / "old"
    shutil.copytree(finished_study, old)
    for path in (old / "runs").glob("*/results.json"):
        record = json.loads(path.read_text())
        del record["uniform_plateau_steps"], record["collapsed"]
        path.write_text(json.dumps(record))
    config = yaml.safe_load(study_config.read_text())
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({**config, "study_dir": str(old)}))
    result = runner.invoke(app, ["compare", "--config", str(tmp_path / "old.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "8 already finished" in result.output
    assert [line.split()[-1] for line in result.output.splitlines() if line.startswith((" sam ", " msam "))][-2:] \
        == ["—", "—"]
    assert {(r["uniform_plateau_steps"], r["collapsed"]) for r in _csv(old / "results.csv")} == {("", "")}
    assert {r["collapsed_runs"] for r in _csv(old / "robustness.csv")} == {""}
    report = (old / "report.md").read_text()
    assert report.count("(collapse —)") == 4 and "| 0/4 | — |" in report


def test_bad_study_config_is_one_line_exit_2(study_config, tmp_path):
    result = runner.invoke(app, ["compare", "--config", str(study_config), "--set", "grid.optimisers=[sam]"])
    assert result.exit_code == 2
    assert "unknown key 'grid.optimisers'" in result.output and "optimizers" in result.output
    result = runner.invoke(app, ["compare", "--config", str(study_config), "--set", "grid.optimizers=[sam,adagrad]"])
    assert result.exit_code == 2 and "adagrad" in result.output
    assert len(result.output.strip().splitlines()) == 1


CONFIG_MODELS = {"compare": "align.study.config:CompareConfig", "train": "align.train.config:TrainConfig",
                 "embed": "align.cache.key:EmbedConfig"}


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/**/*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_validates_and_compare_configs_dry_run(path):
    from importlib import import_module

    from align.common.config import load_config

    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# "), "every config starts with a comment"
    folder = path.parent.name
    if folder == "datasets":
        from align.data.datasets import DatasetSpec

        data = yaml.safe_load(path.read_text())
        DatasetSpec.model_validate(data)  # a `dataset:` section on its own
        return
    module, name = CONFIG_MODELS[folder].split(":")
    load_config(getattr(import_module(module), name), path)
    if folder == "compare":
        assert first_line.startswith("# align compare")
        result = runner.invoke(app, ["compare", "--config", str(path), "--dry-run"])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.output)
        assert plan["runs"] > 0 and plan["forward_backward_passes"] > 0
        # The plan against the YAML's own grid, counted here: cells per optimizer = its lrs × its ρs (one "no ρ"
        # for single-pass methods) × its method-axis combinations × seeds × head rescalings; the SAM family takes
        # two passes a step.
        raw = yaml.safe_load(path.read_text())
        grid, steps = raw["grid"], raw["schedule"]["steps"]
        two_pass = {"sam", "msam", "asam", "fsam", "gsam", "friendly_sam"}  # two passes on every step
        cells = {name: len(grid.get("lr_overrides", {}).get(name, grid["lrs"]))
                 * (len(grid.get("rho_overrides", {}).get(name, grid["rhos"])) if name in two_pass else 1)
                 * math.prod(len(values) for values in grid.get("method_axes", {}).get(name, {}).values())
                 * len(grid["seeds"]) * len(grid.get("rescales", [1])) for name in grid["optimizers"]}
        assert plan["optimizers"] == grid["optimizers"] and plan["steps_per_run"] == steps
        assert plan["runs"] == sum(cells.values())
        assert plan["forward_backward_passes"] == steps * sum(n * (2 if name in two_pass else 1)
                                                               for name, n in cells.items())
