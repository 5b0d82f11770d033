"""Per-optimizer method axes of a study grid: validation, cells, run keys, cell configs and result rows."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from align.study.config import Cell, CompareConfig, cell_config, grid_cells
from align.study.compare import plan
from align.study.studies import result_row
from align.common.config import validate
from align.common.errors import AlignError

DATA = {"dataset": {"kind": "synthetic"}, "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
        "text_encoder": {"backend": "open_clip", "model": "ViT-S-16"}, "cache_root": "/nonexistent", "device": "cpu"}
BASE_GRID = {"optimizers": ["sgd", "sam", "msam", "fsam"], "lrs": [0.001, 0.01], "rhos": [0.05, 1.0],
             "seeds": [0, 1, 2], "lr_overrides": {"sgd": [0.1]}}


def _cfg(**grid) -> CompareConfig:
    return validate(CompareConfig, {"data": DATA, "grid": {**BASE_GRID, **grid}})


def test_without_method_axes_cells_and_keys_are_unchanged():
    cells = grid_cells(_cfg().grid)
    # by hand: sgd 1 lr × 3 seeds; sam, msam, fsam each 2 lrs × 2 ρ × 3 seeds
    assert len(cells) == 3 + 3 * 12
    assert [c.key for c in cells[:4]] == ["sgd_lr0.1_s0", "sgd_lr0.1_s1", "sgd_lr0.1_s2", "sam_lr0.001_rho0.05_s0"]
    assert all(c.method == () for c in cells)
    assert Cell("fsam", 0.003, 0.05, 4).key == "fsam_lr0.003_rho0.05_s4"  # the folder names of existing studies


def test_method_axes_cross_only_their_optimizer():
    cfg = _cfg(method_axes={"fsam": {"eta": [1, 1000, 1e5]}, "msam": {"metric_beta": [0, 0.9], "alpha": [0.5, 2]}})
    cells = grid_cells(cfg.grid)
    by = {name: [c for c in cells if c.optimizer == name] for name in ("sgd", "sam", "msam", "fsam")}
    assert (len(by["sgd"]), len(by["sam"])) == (3, 12)
    assert len(by["fsam"]) == 2 * 2 * 3 * 3 and len(by["msam"]) == 2 * 2 * (2 * 2) * 3
    assert {c.method for c in by["fsam"]} == {(("eta", 1.0),), (("eta", 1000.0),), (("eta", 1e5),)}
    # axes in the fixed order eta, alpha, metric_beta whatever the YAML order; every combination once
    expected = {(("alpha", a), ("metric_beta", b)) for a, b in itertools.product([0.5, 2.0], [0.0, 0.9])}
    assert {c.method for c in by["msam"]} == expected
    keys = [c.key for c in cells]
    assert len(set(keys)) == len(keys)  # one folder per run
    assert "fsam_lr0.01_rho1_eta100000_s2" in keys and "msam_lr0.001_rho0.05_alpha0.5_metric_beta0.9_s0" in keys
    assert "sam_lr0.01_rho1_s2" in keys
    assert plan(cfg)["configs"] == 1 + 4 + 2 * 2 * 4 + 2 * 2 * 3
    assert plan(cfg)["runs"] == len(cells)


def test_a_cell_trains_with_its_method_values(tmp_path: Path):
    cfg = validate(CompareConfig, {"data": DATA, "optim": {"eta": 10.0, "alpha": 0.7},
                                   "grid": {**BASE_GRID, "method_axes": {"fsam": {"eta": [1000]}}}})
    fsam = next(c for c in grid_cells(cfg.grid) if c.optimizer == "fsam")
    optim = cell_config(cfg, fsam, tmp_path).optim
    assert (optim.name, optim.eta, optim.alpha) == ("fsam", 1000.0, None)  # the axis beats the shared η
    msam = next(c for c in grid_cells(cfg.grid) if c.optimizer == "msam")
    assert cell_config(cfg, msam, tmp_path).optim.alpha == 0.7


def test_result_rows_carry_the_axis_after_rho():
    row = result_row(Cell("fsam", 0.01, 0.05, 1, (("eta", 1000.0),)), {"status": "done"})
    assert list(row)[:6] == ["run", "optimizer", "lr", "rho", "eta", "seed"] and row["eta"] == 1000.0
    assert "eta" not in result_row(Cell("sam", 0.01, 0.05, 1), {"status": "done"})


@pytest.mark.parametrize("axes, message", [
    ({"adagrad": {"eta": [1]}}, "unknown optimizer 'adagrad'"),
    ({"sam": {"eta": [1]}}, "sam has no parameter 'eta'"),
    ({"sgd": {"eta": [1]}}, "it has none"),
    ({"fsam": {"alpha": [1]}}, "it has eta"),
    ({"msam": {"rho": [0.1]}}, "it has alpha, metric_beta"),
    ({"fsam": {"eta": [1, 1.0]}}, "repeats a value"),
    ({"fsam": {"eta": [float("nan")]}}, "not a finite number"),
    ({"fsam": {"eta": [float("inf")]}}, "not a finite number"),
    ({"fsam": {"eta": []}}, "must not be empty"),
    ({"fsam": {"eta": [-1]}}, "must be >= 0"),
    ({"msam": {"metric_beta": [0.5, 1.0]}}, "metric_beta: 1.0"),
    ({"fsam": {"eta": [True]}}, "expected a number"),
    ({"fsam": {}}, "names no parameter"),
])
def test_bad_method_axes_are_one_line_errors(axes, message):
    with pytest.raises(AlignError, match=message) as info:
        _cfg(method_axes=axes)
    assert "\n" not in str(info.value)


def test_the_default_study_has_five_seeds_and_sweeps_fisher_sams_eta_where_it_differs():
    from align.common.config import load_config
    from align.common.config_files import packaged_config

    path = packaged_config("compare", "default")
    cfg = load_config(CompareConfig, path)
    assert cfg.grid.seeds == [0, 1, 2, 3, 4]
    etas = cfg.grid.method_axes["fsam"]["eta"]
    # bench/study_knobs.py: below η ≈ 1e3 Fisher SAM's δ is within 0.3% of SAM's (1 + η gᵢ² ≤ 1.021 at η = 1)
    assert len(etas) >= 2 and min(etas) >= 1e3
    # by hand: sgd, adamw 3 lrs; sam, msam, asam 3 lrs × 3 ρ; fsam 1 lr × 3 ρ × the η; gsam, friendly_sam 1 lr × 3 ρ
    # at their papers' settings (no axis of theirs swept); all × 5 seeds
    assert cfg.grid.lr_overrides["fsam"] == cfg.grid.lr_overrides["gsam"] == cfg.grid.lr_overrides["friendly_sam"] \
        == [0.003]
    assert "gsam" not in cfg.grid.method_axes and "friendly_sam" not in cfg.grid.method_axes
    runs = (3 + 3 + 3 * 9 + 3 * len(etas) + 3 + 3) * 5
    assert plan(cfg)["runs"] == runs and f"{runs} runs" in path.read_text().split("\nname:")[0]
