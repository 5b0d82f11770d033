"""Student-t intervals, paired t-tests and Holm's adjustment of align.study_stats against scipy and by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from align.study.stats import (VERDICTS, best_config_scores, holm_adjust, paired_interval, paired_intervals,
                               paired_t_test, student_t_quantile, student_t_two_sided_p, verdicts_vs_reference)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 200, 2.5])
def test_t_quantile_matches_scipy(df):
    for q in (0.975, 0.995, 0.95, 0.9, 0.6, 0.5, 0.3, 0.025, 1e-4):
        assert student_t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-11, abs=1e-14)


def test_two_sided_p_matches_scipy_down_to_tiny_tails():
    for df in (1, 2, 4, 9, 50):
        for t in (0.0, 0.3, -1.0, 2.1, 5.0, -12.0, 80.0):
            assert student_t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-10, abs=1e-300)
    assert student_t_two_sided_p(math.inf, 3) == 0.0 and math.isnan(student_t_two_sided_p(math.nan, 3))
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


def test_paired_interval_equals_scipy_t_interval_and_needs_three_differences():
    d = [0.031, -0.004, 0.022, 0.015, 0.009]
    mean, lo, hi = paired_interval(d, level=0.9)
    ref = stats.t.interval(0.9, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert mean == pytest.approx(np.mean(d), rel=1e-14)
    assert (lo, hi) == pytest.approx(ref, rel=1e-11)
    # NaNs (a seed missing on one side) are dropped, not propagated
    assert paired_interval([*d, math.nan], level=0.9) == pytest.approx((mean, lo, hi), rel=1e-14)
    mean2, lo2, hi2 = paired_interval([0.1, 0.3])
    assert mean2 == pytest.approx(0.2) and math.isnan(lo2) and math.isnan(hi2)
    assert all(math.isnan(v) for v in paired_interval([]))


@pytest.mark.parametrize("n", [3, 5, 10])
def test_student_t_interval_covers_at_its_nominal_level(n):
    """True Δ = 0, normal noise, 4,000 repetitions: the 95% interval covers 0 in 93–97% of them."""
    rng = np.random.default_rng(1000 + n)
    d = rng.normal(0.0, 0.02, size=(4000, n))
    means, lows, highs = paired_intervals(d)
    covered = float(np.mean((lows <= 0.0) & (0.0 <= highs)))
    assert 0.93 <= covered <= 0.97, covered
    # the row-wise version is the same computation as the one-row function
    assert paired_interval(d[7]) == pytest.approx((means[7], lows[7], highs[7]), rel=1e-14)


def test_paired_t_test_p_values_equal_scipy_ttest_rel():
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 12):
        a, b = rng.normal(0.5, 0.05, n), rng.normal(0.52, 0.05, n)
        t, p = paired_t_test(a - b)
        ref = stats.ttest_rel(a, b)
        assert t == pytest.approx(ref.statistic, rel=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-10)
    assert paired_t_test([0.02, 0.02, 0.02]) == (math.inf, 0.0)
    t0, p0 = paired_t_test([0.0, 0.0, 0.0])
    assert math.isnan(t0) and p0 == 1.0
    assert all(math.isnan(v) for v in paired_t_test([0.1]))


def test_holm_adjustment_by_hand():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06 (step-down monotone)
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-14)
    adjusted = holm_adjust([math.nan, 0.01, 0.04])  # NaN (untested) is not in the family: m = 2
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.02, 0.04], rel=1e-14)
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm_adjust([]) == []


def _scores(ref: list[float], diffs: list[float]) -> dict[int, float]:
    return {seed: r + d for seed, (r, d) in enumerate(zip(ref, diffs))}


def test_verdicts_are_holm_adjusted_paired_t_tests():
    ref = [0.60, 0.55, 0.58, 0.62, 0.57]
    marginal = [0.01, 0.03, 0.02, 0.04, 0.0]          # unadjusted p < 0.05, but not after Holm over four
    scores = {"sam": dict(enumerate(ref)),
              "msam": _scores(ref, [0.05, 0.06, 0.04, 0.055, 0.05]),
              "asam": _scores(ref, [-0.03, -0.04, -0.02, -0.035, -0.05]),
              "fsam": _scores(ref, marginal),
              "sgd": _scores(ref, [0.02, -0.03, 0.01, -0.01, 0.005]),
              "adam": {0: 0.7, 1: 0.7, 9: 0.1}}      # only two seeds shared with the reference
    rows = {r["optimizer"]: r for r in verdicts_vs_reference(scores, "sam")}
    p_raw = {name: stats.ttest_rel([scores[name][s] for s in range(5)], ref).pvalue
             for name in ("msam", "asam", "fsam", "sgd")}
    assert p_raw["fsam"] < 0.05
    order = sorted(p_raw, key=p_raw.get)  # Holm by hand over the four tested optimizers
    expected = {}
    for rank, name in enumerate(order):
        expected[name] = min(1.0, max([(4 - k) * p_raw[order[k]] for k in range(rank + 1)]))
    for name in p_raw:
        assert rows[name]["p"] == pytest.approx(p_raw[name], rel=1e-9)
        assert rows[name]["p_holm"] == pytest.approx(expected[name], rel=1e-9)
        assert rows[name]["pairs"] == 5
    assert expected["fsam"] > 0.05
    assert [rows[n]["verdict"] for n in ("msam", "asam", "fsam", "sgd", "adam")] == [
        "better", "worse", "no detectable difference", "no detectable difference", "n < 3: no test"]
    assert rows["adam"]["pairs"] == 2 and math.isnan(rows["adam"]["p_holm"])
    assert rows["msam"]["diff_mean"] == pytest.approx(0.051)
    assert set(r["verdict"] for r in rows.values()) <= set(VERDICTS)
    # for a loss, lower is better: the same data flips the verdicts
    flipped = {r["optimizer"]: r["verdict"] for r in verdicts_vs_reference(scores, "sam", higher_is_better=False)}
    assert flipped["msam"] == "worse" and flipped["asam"] == "better"
    with pytest.raises(ValueError, match="reference"):
        verdicts_vs_reference(scores, "lion")


def test_best_config_scores_are_the_best_configurations_seeds():
    def row(opt, lr, seed, val, test):
        return {"optimizer": opt, "lr": lr, "rho": 0.05, "seed": seed, "status": "ok",
                "best_val_mean_R@1": val, "best_test_mean_R@1": test}
    rows = [row("sam", 0.1, 0, 0.5, 0.40), row("sam", 0.1, 1, 0.5, 0.42),
            row("sam", 0.2, 0, 0.6, 0.30), row("sam", 0.2, 1, 0.6, 0.31)]
    assert best_config_scores(rows) == {"sam": {0: 0.30, 1: 0.31}}
