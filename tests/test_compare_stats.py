"""The study statistics (pure) against hand computations and scipy."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from align.study.stats import best_configs, config_key, max_paired_gap, robustness, summary, table3, used_axes


def _row(opt, lr, rho, seed, val, test, status="ok", knn=0.5, loss_t=1.0, final=0.5, max_knn=0.6, **axes):
    return {"run": f"{opt}_{lr}_{rho}_{seed}", "optimizer": opt, "lr": lr, "rho": rho, **axes, "seed": seed,
            "status": status, "best_val_mean_R@1": val, "best_test_mean_R@1": test, "best_test_i2t_R@1": test,
            "best_test_t2i_R@1": test, "best_test_mutual_knn": knn, "best_test_cknna": knn / 2,
            "max_val_mutual_knn": max_knn, "loss_at_step": loss_t, "final_loss": final}


def test_best_config_is_chosen_on_validation_and_two_seeds_give_no_interval():
    rows = [
        _row("sam", 0.1, 0.05, 0, val=0.50, test=0.55), _row("sam", 0.1, 0.05, 1, val=0.52, test=0.53),
        _row("sam", 0.1, 0.10, 0, val=0.60, test=0.40), _row("sam", 0.1, 0.10, 1, val=0.62, test=0.41),
        # best validation mean, but one seed diverged → not chosen
        _row("sam", 0.3, 0.10, 0, val=0.90, test=0.90), _row("sam", 0.3, 0.10, 1, val=0.90, test=0.10, status="diverged"),
        _row("msam", 0.1, 0.05, 0, val=0.70, test=0.65), _row("msam", 0.1, 0.05, 1, val=0.72, test=0.61),
    ]
    best = best_configs(rows)
    assert best == {"sam": ("sam", 0.1, 0.10), "msam": ("msam", 0.1, 0.05)}
    summ = {s["optimizer"]: s for s in summary(rows, reference="sam")}
    assert summ["msam"]["mean_R@1_mean"] == pytest.approx(0.63)
    assert summ["msam"]["mean_R@1_std"] == pytest.approx(np.std([0.65, 0.61], ddof=1))
    # paired by seed: (0.65 − 0.40, 0.61 − 0.41) → mean 0.225, but two pairs give no interval and no test
    assert summ["msam"]["diff_vs_ref"] == pytest.approx(0.225) and summ["msam"]["pairs"] == 2
    assert math.isnan(summ["msam"]["diff_ci_low"]) and math.isnan(summ["msam"]["diff_ci_high"])
    assert summ["msam"]["verdict"] == "n < 3: no test" and math.isnan(summ["msam"]["p_holm"])
    assert summ["msam"]["no_interval"] == "n = 2: no interval"
    assert math.isnan(summ["sam"]["diff_vs_ref"]) and summ["sam"]["verdict"] == "reference"
    assert summ["sam"]["pairs"] is None and summ["sam"]["seeds"] == 2


def test_summary_interval_and_holm_verdicts_at_five_seeds_equal_scipy_by_hand():
    ref = [0.60, 0.55, 0.58, 0.62, 0.57]
    up = [0.05, 0.06, 0.04, 0.055, 0.05]           # clearly better
    noise = [0.02, -0.03, 0.01, -0.01, 0.005]      # no detectable difference
    rows = [_row("sam", 0.01, 0.05, s, val=0.5, test=ref[s]) for s in range(5)]
    rows += [_row("msam", 0.01, 0.05, s, val=0.5, test=ref[s] + up[s]) for s in range(5)]
    rows += [_row("asam", 0.01, 0.5, s, val=0.5, test=ref[s] + noise[s]) for s in range(5)]
    summ = {s["optimizer"]: s for s in summary(rows, reference="sam")}
    p = {}
    for name, d in (("msam", up), ("asam", noise)):
        lo, hi = stats.t.interval(0.95, 4, loc=np.mean(d), scale=stats.sem(d))
        assert summ[name]["diff_vs_ref"] == pytest.approx(np.mean(d), rel=1e-9)
        assert (summ[name]["diff_ci_low"], summ[name]["diff_ci_high"]) == pytest.approx((lo, hi), rel=1e-9)
        assert summ[name]["pairs"] == 5 and summ[name]["seeds"] == 5 and summ[name]["no_interval"] is None
        p[name] = stats.ttest_rel([ref[s] + d[s] for s in range(5)], ref).pvalue
    # Holm over the two comparisons: the smaller p times 2, the larger times 1 (never below the first)
    small, large = sorted(p, key=p.get)
    assert summ[small]["p_holm"] == pytest.approx(2 * p[small], rel=1e-9)
    assert summ[large]["p_holm"] == pytest.approx(max(p[large], 2 * p[small]), rel=1e-9)
    assert summ["msam"]["verdict"] == "better" and summ["asam"]["verdict"] == "no detectable difference"


def test_table3_by_hand():
    rows = [
        _row("msam", 0.1, 0.05, 0, 0, test=0.80, max_knn=0.40, loss_t=2.0, final=1.0),
        _row("msam", 0.1, 0.05, 1, 0, test=0.60, max_knn=0.50, loss_t=3.0, final=2.0),
        _row("msam", 0.1, 0.10, 0, 0, test=0.69, status="diverged", max_knn=0.2, loss_t=4.85, final=4.85),
        _row("msam", 0.1, 0.10, 1, 0, test=0.69, max_knn=0.3, loss_t=1.0, final=1.0),
    ]
    t3 = {(r["lr"], r["rho"]): r for r in table3(rows, "msam")}
    assert t3[(0.1, 0.05)]["best_alignment"] == pytest.approx(0.45)
    assert t3[(0.1, 0.05)]["loss_at_step"] == pytest.approx(2.5)
    assert t3[(0.1, 0.05)]["final_loss"] == pytest.approx(1.5)
    assert t3[(0.1, 0.10)]["diverged"] == 1 and t3[(0.1, 0.05)]["diverged"] == 0
    assert "eta" not in t3[(0.1, 0.05)]  # no method axis in the grid: no extra column


def test_robustness_judges_on_validation_and_puts_test_beside():
    # Validation and test disagree on purpose: on test, (0.3, 0.05) would be best and (0.1, 0.10) worst.
    rows = [
        _row("msam", 0.1, 0.05, 0, val=0.70, test=0.50), _row("msam", 0.1, 0.05, 1, val=0.70, test=0.52),
        _row("msam", 0.1, 0.10, 0, val=0.68, test=0.20, status="diverged"),
        _row("msam", 0.1, 0.10, 1, val=0.67, test=0.30),
        _row("msam", 0.3, 0.05, 0, val=0.20, test=0.90), _row("msam", 0.3, 0.05, 1, val=0.30, test=0.80),
    ]
    (rob,) = robustness(rows)
    # validation config means: 0.70, 0.675, 0.25 → best 0.70; 0.675 ≥ 0.665 counts, 0.25 does not → 2 of 3
    assert rob["best_val"] == pytest.approx(0.70) and rob["worst_val"] == pytest.approx(0.25)
    assert rob["within_95pct_val"] == pytest.approx(2 / 3)
    assert (rob["worst_lr"], rob["worst_rho"]) == (0.3, 0.05)
    # the test means of the same two configurations, not the best/worst test means (0.85 and 0.25)
    assert rob["best_test"] == pytest.approx(0.51) and rob["worst_test"] == pytest.approx(0.85)
    assert rob["diverged_configs"] == 1 and rob["configs"] == 3


def _eta_rows():
    """Fisher SAM over η ∈ {1, 1000} beside SAM, 2 seeds: η = 1 repeats SAM to 1e-4, η = 1000 differs."""
    rows = [_row("sam", 0.01, 0.05, s, val=0.60, test=0.50 + 0.01 * s) for s in (0, 1)]
    rows += [_row("fsam", 0.01, 0.05, s, val=0.68, test=0.50 + 0.01 * s + 1e-4 * (s + 1), eta=1.0) for s in (0, 1)]
    rows += [_row("fsam", 0.01, 0.05, s, val=0.70, test=0.58, eta=1000.0) for s in (0, 1)]
    rows += [_row("fsam", 0.01, 0.20, s, val=0.10, test=0.65, eta=1000.0) for s in (0, 1)]
    return rows


def test_method_axes_make_separate_configurations():
    rows = _eta_rows()
    assert used_axes(rows) == ["eta"] and used_axes(rows[:2]) == []
    assert config_key(rows[0]) == ("sam", 0.01, 0.05)  # a row without axes keeps today's key
    assert config_key(rows[2]) == ("fsam", 0.01, 0.05, ("eta", 1.0))
    assert config_key({**rows[2], "eta": ""}) == ("fsam", 0.01, 0.05)  # a blank CSV cell is no axis
    assert best_configs(rows)["fsam"] == ("fsam", 0.01, 0.05, ("eta", 1000.0))
    summ = {s["optimizer"]: s for s in summary(rows, reference="sam")}
    assert summ["fsam"]["eta"] == 1000.0 and summ["sam"]["eta"] is None
    assert summ["fsam"]["mean_R@1_mean"] == pytest.approx(0.58)
    t3 = table3(rows, "fsam")
    assert [(r["lr"], r["rho"], r["eta"]) for r in t3] == [(0.01, 0.05, 1.0), (0.01, 0.05, 1000.0), (0.01, 0.2, 1000.0)]
    assert [r["seeds"] for r in t3] == [2, 2, 2]
    assert table3(rows, "sam")[0]["eta"] is None
    rob = {r["optimizer"]: r for r in robustness(rows)}
    # validation means 0.68, 0.70, 0.10: 0.68 ≥ 0.95 · 0.70 = 0.665 counts
    assert rob["fsam"]["configs"] == 3 and rob["fsam"]["within_95pct_val"] == pytest.approx(2 / 3)
    assert (rob["fsam"]["worst_rho"], rob["fsam"]["worst_eta"]) == (0.2, 1000.0)
    assert rob["sam"]["worst_eta"] is None


def test_max_paired_gap_pairs_runs_by_lr_rho_and_seed():
    rows = _eta_rows()
    gap, pairs = max_paired_gap(rows, "fsam", "sam", {"eta": 1.0})
    assert pairs == 2 and gap == pytest.approx(2e-4)  # seeds 0 and 1 differ by 1e-4 and 2e-4
    gap, pairs = max_paired_gap(rows, "fsam", "sam", {"eta": 1000.0})
    assert pairs == 2 and gap == pytest.approx(0.08)  # only ρ 0.05 has SAM twins: 0.58 − 0.50
    gap, pairs = max_paired_gap(rows, "fsam", "sam", {"eta": 5.0})
    assert pairs == 0 and math.isnan(gap)
