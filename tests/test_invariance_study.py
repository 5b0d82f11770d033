"""grid.rescales in align compare: cells at each head rescaling, the plain head's rows in the usual tables, and the
report's Invariance section, checked against the run files and an independent computation (scipy)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats as sps
from typer.testing import CliRunner

from align.cli.main import app
from align.eval.trained import load_run
from align.study.invariance import invariance_entries
from faults import one_error_line
from helpers import SIZES, synthetic_split

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

SCALES = [0.5, 1.0, 2.0]
SEEDS = [0, 1, 2]


def _row(optimizer, lr, c, seed, val, test):
    return {"run": f"{optimizer}_{lr}_{c}_{seed}", "optimizer": optimizer, "lr": lr, "rho": None, "rescale": c,
            "seed": seed, "status": "ok", "best_val_mean_R@1": val, "best_test_mean_R@1": test}


def test_entries_pick_the_best_config_at_c_1_and_pair_each_c_by_seed():
    rng = np.random.default_rng(0)
    rows, tests = [], {}
    for lr, val in ((0.1, 0.5), (0.3, 0.6)):  # lr 0.3 is best at c = 1 ...
        for c in SCALES:
            for s in SEEDS + [3]:
                # ... and lr 0.1 would be best at c = 2 on validation: the choice must stay at c = 1's
                v = val + (0.3 if (lr, c) == (0.1, 2.0) else 0.0)
                tests[lr, c, s] = 0.4 + 0.05 * c + 0.01 * rng.standard_normal()
                rows.append(_row("sgd", lr, c, s, v, tests[lr, c, s]))
    [entry] = invariance_entries(rows, "mean_R@1")
    assert entry["key"] == ("sgd", 0.3, None)
    for level in entry["levels"]:
        c = level["c"]
        assert level["mean"] == pytest.approx(np.mean([tests[0.3, c, s] for s in SEEDS + [3]]))
        if c == 1.0:
            continue
        d = np.array([tests[0.3, c, s] - tests[0.3, 1.0, s] for s in SEEDS + [3]])
        half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        assert (level["diff"], level["low"], level["high"]) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
        assert level["p"] == pytest.approx(sps.ttest_rel([tests[0.3, c, s] for s in SEEDS + [3]],
                                                         [tests[0.3, 1.0, s] for s in SEEDS + [3]]).pvalue, rel=1e-6)
        assert level["pairs"] == 4
    means = [lv["mean"] for lv in entry["levels"]]
    assert entry["spread"] == pytest.approx(max(means) - min(means))
    assert entry["moves"]  # 0.05·c against noise 0.01: a clear shift


def _study(root: Path, data: dict, **grid) -> dict:
    return {"name": "inv", "study_dir": str(root / "out"), "workers": 1, "reference": "sam", "data": data,
            "head": {"kind": "mlp", "activation": "relu", "out_dim": 16, "hidden_dim": 24},
            "schedule": {"steps": 20, "batch_size": 64, "warmup_steps": 2},
            "eval": {"every": 20, "ks": [1], "sharpness_final": False, "sharpness_batches": 1, "hessian_iters": 2, "hutchinson_samples": 1,
                     "sharpness_ascent_steps": 1, "backend": "torch", "sharpness_geometries": ["adaptive", "monge"]},
            "loss_at_step": 10, "checkpoint_every": 20, "device": "cpu",
            "grid": {"optimizers": ["sam"], "lrs": [0.01], "rhos": [0.05], "seeds": SEEDS, "rescales": [1.0, 2.0],
                     **grid}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_data) -> Path:
    root = tmp_path_factory.mktemp("inv")
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(_study(root, cache_data)))
    result = runner.invoke(app, ["compare", "--config", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    return root / "out"


def test_a_rescales_grid_trains_each_c_and_reports_the_invariance_section(finished, cache_data):
    with open(finished / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * len(SEEDS)
    assert {float(r["rescale"]) for r in rows} == {1.0, 2.0}
    assert {r["run"] for r in rows if r["seed"] == "0"} == {"sam_lr0.01_rho0.05_s0", "sam_lr0.01_rho0.05_c2_s0"}
    head = yaml.safe_load((finished / "runs" / "sam_lr0.01_rho0.05_c2_s0" / "config.yaml").read_text())["head"]
    assert head["rescale"] == 2.0
    with open(finished / "summary.csv", newline="") as fh:
        assert all(int(s["seeds"]) == len(SEEDS) for s in csv.DictReader(fh))  # the plain head's runs only
    report = (finished / "report.md").read_text()
    assert "## Invariance under function-preserving rescalings of the head" in report
    assert "moved by more than" in report.lower() or "moved by more than its seed noise" in report
    # The cosine distance of SAM at c = 2, recomputed from the run folders and the test cache.
    image_rows, text_rows, _ = (torch.from_numpy(a) for a in synthetic_split("test", SIZES["test"]))  # the cache's
    image, text = [], []
    for s in SEEDS:
        a = load_run(finished / "runs" / f"sam_lr0.01_rho0.05_c2_s{s}", device="cpu")
        b = load_run(finished / "runs" / f"sam_lr0.01_rho0.05_s{s}", device="cpu")
        fa, fb = a.project_images(image_rows), b.project_images(image_rows)
        image.append(float(np.mean(1 - np.sum(fa.numpy() * fb.numpy(), axis=1))))
        ta, tb = a.project_texts(text_rows), b.project_texts(text_rows)
        text.append(float(np.mean(1 - np.sum(ta.numpy() * tb.numpy(), axis=1))))
    line = next(x for x in report.splitlines() if x.startswith("| sam (") and "| 2 |" in x)
    assert f"{np.mean(image):.4f} / {np.mean(text):.4f}" in line, line
    assert np.mean(image) > 1e-4  # the rescaled head learned another function


@pytest.mark.parametrize("change,says", [
    ({"grid": {"rescales": [0.5, 2.0]}}, "must include 1"),
    ({"grid": {"rescales": [1.0, -2.0]}}, "must be > 0"),
    ({"head": {"kind": "mlp", "out_dim": 16}}, "head.activation=relu"),
], ids=["no-1", "negative", "gelu"])
def test_a_rescales_grid_the_head_cannot_take_is_one_line(change, says, cache_data, tmp_path):
    config = _study(tmp_path, cache_data)
    for section, value in change.items():
        config[section] = {**config[section], **value} if section == "grid" else value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    line = one_error_line(runner.invoke(app, ["compare", "--config", str(path), "--no-progress"]))
    assert says in line, line
    assert not (tmp_path / "out" / "runs").exists()
