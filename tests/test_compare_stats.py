"""The study statistics (pure) against hand computations."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from align.study_stats import best_configs, bootstrap_difference, robustness, summary, table3


def _row(opt, lr, rho, seed, val, test, status="ok", knn=0.5, loss_t=1.0, final=0.5, max_knn=0.6):
    return {"run": f"{opt}_{lr}_{rho}_{seed}", "optimizer": opt, "lr": lr, "rho": rho, "seed": seed,
            "status": status, "best_val_mean_R@1": val, "best_test_mean_R@1": test, "best_test_i2t_R@1": test,
            "best_test_t2i_R@1": test, "best_test_mutual_knn": knn, "best_test_cknna": knn / 2,
            "max_val_mutual_knn": max_knn, "loss_at_step": loss_t, "final_loss": final}


def test_bootstrap_interval_with_two_seeds_equals_the_exact_resampling_distribution():
    a, b = [0.70, 0.74], [0.60, 0.68]
    d = np.array(a) - np.array(b)  # 0.10, 0.06
    mean, lo, hi = bootstrap_difference(a, b, samples=4000, seed=1)
    assert mean == pytest.approx(d.mean())
    # Resampling 2 seeds with replacement gives means {0.06, 0.08, 0.10} with probabilities 1/4, 1/2, 1/4:
    # the 2.5th percentile is the smallest and the 97.5th the largest.
    assert lo == pytest.approx(0.06) and hi == pytest.approx(0.10)


def test_bootstrap_interval_matches_enumeration_for_three_seeds():
    a, b = np.array([0.5, 0.9, 0.7]), np.array([0.4, 0.4, 0.4])
    d = a - b
    all_means = np.array([d[list(idx)].mean() for idx in itertools.product(range(3), repeat=3)])
    mean, lo, hi = bootstrap_difference(list(a), list(b), samples=200_000, seed=3)
    assert mean == pytest.approx(d.mean())
    assert lo == pytest.approx(np.percentile(all_means, 2.5, method="inverted_cdf"), abs=1e-9)
    assert hi == pytest.approx(np.percentile(all_means, 97.5, method="inverted_cdf"), abs=1e-9)


def test_best_config_is_chosen_on_validation_and_avoids_diverged_configs():
    rows = [
        _row("sam", 0.1, 0.05, 0, val=0.50, test=0.55), _row("sam", 0.1, 0.05, 1, val=0.52, test=0.53),
        _row("sam", 0.1, 0.10, 0, val=0.60, test=0.40), _row("sam", 0.1, 0.10, 1, val=0.62, test=0.41),
        # best validation mean, but one seed diverged → not chosen
        _row("sam", 0.3, 0.10, 0, val=0.90, test=0.90), _row("sam", 0.3, 0.10, 1, val=0.90, test=0.10, status="diverged"),
        _row("msam", 0.1, 0.05, 0, val=0.70, test=0.65), _row("msam", 0.1, 0.05, 1, val=0.72, test=0.61),
    ]
    best = best_configs(rows)
    assert best == {"sam": ("sam", 0.1, 0.10), "msam": ("msam", 0.1, 0.05)}
    summ = {s["optimizer"]: s for s in summary(rows, reference="sam", samples=1000)}
    assert summ["msam"]["mean_R@1_mean"] == pytest.approx(0.63)
    assert summ["msam"]["mean_R@1_std"] == pytest.approx(np.std([0.65, 0.61], ddof=1))
    # paired by seed: (0.65 − 0.40, 0.61 − 0.41) → mean 0.225
    assert summ["msam"]["diff_vs_ref"] == pytest.approx(0.225)
    assert summ["msam"]["diff_ci_low"] == pytest.approx(0.20) and summ["msam"]["diff_ci_high"] == pytest.approx(0.25)
    assert math.isnan(summ["sam"]["diff_vs_ref"])


def test_table3_and_robustness_by_hand():
    rows = [
        _row("msam", 0.1, 0.05, 0, 0, test=0.80, max_knn=0.40, loss_t=2.0, final=1.0),
        _row("msam", 0.1, 0.05, 1, 0, test=0.60, max_knn=0.50, loss_t=3.0, final=2.0),
        _row("msam", 0.1, 0.10, 0, 0, test=0.69, status="diverged", max_knn=0.2, loss_t=4.85, final=4.85),
        _row("msam", 0.1, 0.10, 1, 0, test=0.69, max_knn=0.3, loss_t=1.0, final=1.0),
        _row("msam", 0.3, 0.05, 0, 0, test=0.20), _row("msam", 0.3, 0.05, 1, 0, test=0.30),
    ]
    t3 = {(r["lr"], r["rho"]): r for r in table3(rows, "msam")}
    assert t3[(0.1, 0.05)]["best_alignment"] == pytest.approx(0.45)
    assert t3[(0.1, 0.05)]["loss_at_step"] == pytest.approx(2.5)
    assert t3[(0.1, 0.05)]["final_loss"] == pytest.approx(1.5)
    assert t3[(0.1, 0.10)]["diverged"] == 1 and t3[(0.1, 0.05)]["diverged"] == 0
    (rob,) = robustness(rows)
    # config means: 0.70, 0.69, 0.25 → best 0.70; 0.69 ≥ 0.665 counts, 0.25 does not → 2 of 3
    assert rob["best"] == pytest.approx(0.70) and rob["worst"] == pytest.approx(0.25)
    assert rob["within_95pct"] == pytest.approx(2 / 3)
    assert (rob["worst_lr"], rob["worst_rho"]) == (0.3, 0.05)
    assert rob["diverged_configs"] == 1
