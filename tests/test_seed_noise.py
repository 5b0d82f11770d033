"""The shape of a study's seed noise: Shapiro–Wilk (scipy's) at n = 3 equals its exact distribution; the sign-flip
permutation test equals every sign pattern counted by hand and scipy.stats.permutation_test; the comparisons carry
both, and the report and the terminal say where a t-interval's level is not guaranteed."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sp

from align.study import stats
from align.study.report import seed_noise_note, summary_lines
from align.study.seed_noise import (EXACT_SIGN_FLIPS, MIN_SIGN_FLIP_PAIRS, shapiro_wilk,
                                    sign_flip_p)


def test_shapiro_wilk_at_three_values_is_the_exact_distribution():
    x = np.array([0.0, 1.0, 5.0])
    w, p = shapiro_wilk(x)
    # n = 3: W = (a (x₃ − x₁))² / SS with a = 1/√2, and P(W ≤ w) = 6/π (asin √w − π/3)
    ss = float(((x - x.mean()) ** 2).sum())
    assert w == pytest.approx((x[2] - x[0]) ** 2 / 2 / ss, rel=1e-12)
    assert p == pytest.approx(6 / math.pi * (math.asin(math.sqrt(w)) - math.pi / 3), rel=1e-12)
    assert p == pytest.approx(sp.shapiro(x).pvalue, abs=1e-6)


def test_shapiro_wilk_needs_three_values_and_some_spread():
    assert all(math.isnan(v) for v in shapiro_wilk([1.0, 2.0]))
    assert all(math.isnan(v) for v in shapiro_wilk([1.0, float("nan"), 2.0]))  # NaNs dropped: two values left
    assert shapiro_wilk([0.3, 0.3, 0.3, 0.3]) == (1.0, 1.0)  # nothing to test (scipy says the same, with a warning)


def _by_hand(d: list[float]) -> float:
    """Two-sided sign-flip p: every one of the 2^n sign patterns, |Σ ± dᵢ| against the observed |Σ dᵢ|."""
    observed = abs(sum(d))
    sums = [abs(sum(s * v for s, v in zip(signs, d))) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(s >= observed - 1e-12 for s in sums) / len(sums)


@pytest.mark.parametrize("d", [[0.4], [0.1, -0.3], [1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 6, [0.0] * 6,
                               [0.012, -0.004, 0.009, 0.015, 0.003, -0.001], [1, -1, 2, -2, 3, 3, 0.5],
                               [0.5, 1.5, 0.2, 0.8, 1.1, 0.9, -0.3, 0.4, 1.2, 0.1]])
def test_sign_flip_p_equals_every_sign_pattern_counted_by_hand(d):
    assert sign_flip_p(d) == pytest.approx(_by_hand(d), abs=1e-15)


def test_sign_flip_p_equals_scipys_permutation_test():
    rng = np.random.default_rng(3)
    for n in range(2, 14):
        d = rng.standard_normal(n) + 0.4
        ref = sp.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=10 ** 6, vectorized=True)
        assert sign_flip_p(d) == pytest.approx(ref.pvalue, abs=1e-12)


def test_the_smallest_sign_flip_p_is_two_over_two_to_the_n_so_the_test_starts_at_six_pairs():
    assert sign_flip_p([0.01] * 5) == 2 / 32 > 0.05
    assert sign_flip_p([0.01] * MIN_SIGN_FLIP_PAIRS) == 2 / 64 < 0.05 and MIN_SIGN_FLIP_PAIRS == 6
    assert math.isnan(sign_flip_p([])) and sign_flip_p([0.2, float("nan"), 0.3]) == sign_flip_p([0.2, 0.3])


def test_beyond_exact_enumeration_the_sign_flip_p_is_a_fixed_seed_estimate_of_the_exact_one():
    rng = np.random.default_rng(5)
    d = rng.standard_normal(EXACT_SIGN_FLIPS + 2) * 0.3 + 0.1
    exact = 0
    for lo in range(0, 2 ** d.size, 2 ** 18):  # every pattern, by hand, in chunks
        bits = (np.arange(lo, lo + 2 ** 18)[:, None] >> np.arange(d.size)) & 1
        exact += int((np.abs((1 - 2 * bits) @ d) >= abs(d.sum()) - 1e-12).sum())
    exact /= 2 ** d.size
    p = sign_flip_p(d)
    assert p == sign_flip_p(d) and abs(p - exact) < 0.01  # the same draws every time; SE ≈ 0.002


# -- the comparisons and what the report says -----------------------------------------------------------------

def _rows(diffs: dict[str, list[float]]) -> list[dict]:
    """Rows of a one-configuration-per-optimizer study: SAM's scores and each other's SAM + its differences."""
    base = [0.60 + 0.01 * s for s in range(len(next(iter(diffs.values()))))]
    rows = [{"optimizer": "sam", "lr": 0.01, "rho": 0.05, "seed": s, "status": "ok", "best_val_mean_R@1": 0.6,
             "best_test_mean_R@1": v} for s, v in enumerate(base)]
    for name, d in diffs.items():
        rows += [{"optimizer": name, "lr": 0.01, "rho": None, "seed": s, "status": "ok", "best_val_mean_R@1": 0.6,
                  "best_test_mean_R@1": base[s] + d[s]} for s in range(len(d))]
    return rows


SKEWED = [0.001, 0.002, 0.0015, 0.001, 0.0025, 0.06]  # one seed far out: Shapiro–Wilk p ≈ 4e-5
NORMAL = [0.004, -0.003, 0.011, 0.002, 0.008, 0.006]


def test_comparisons_carry_shapiro_wilk_and_a_holm_adjusted_sign_flip_from_six_pairs():
    summary = {s["optimizer"]: s for s in stats.summary(_rows({"adamw": SKEWED, "msam": NORMAL}))}
    diffs = {name: [b - a for a, b in zip([0.60 + 0.01 * s for s in range(6)],
                                          [0.60 + 0.01 * s + v for s, v in enumerate(d)])]
             for name, d in (("adamw", SKEWED), ("msam", NORMAL))}
    for name in ("adamw", "msam"):
        assert summary[name]["normality_p"] == pytest.approx(sp.shapiro(diffs[name]).pvalue, abs=1e-5)
        assert summary[name]["p_sign_flip"] == pytest.approx(_by_hand(diffs[name]), abs=1e-12)
    raw = sorted((_by_hand(diffs[n]), n) for n in ("adamw", "msam"))  # Holm by hand: 2 · smallest, then monotone
    first = min(1.0, 2 * raw[0][0])
    assert summary[raw[0][1]]["p_sign_flip_holm"] == pytest.approx(first)
    assert summary[raw[1][1]]["p_sign_flip_holm"] == pytest.approx(max(first, raw[1][0]))
    assert math.isnan(summary["sam"]["p_sign_flip_holm"])
    five = {s["optimizer"]: s for s in stats.summary(_rows({"adamw": SKEWED[:5]}))}
    assert math.isnan(five["adamw"]["p_sign_flip"]) and not math.isnan(five["adamw"]["normality_p"])


def test_a_study_whose_seed_noise_is_far_from_normal_says_its_interval_level_is_not_guaranteed():
    summary = stats.summary(_rows({"adamw": SKEWED, "msam": NORMAL}))
    note = seed_noise_note(summary, "sam")[0]
    assert "Shapiro–Wilk" in note and "`adamw` (p = " in note and "`msam`" not in note.split("Beside")[0]
    assert "not guaranteed" in note and "sign-flip permutation test" in note
    header, _, *lines = summary_lines(summary, "sam")
    assert header.endswith("sign-flip p (Holm) |")
    adamw = next(s for s in summary if s["optimizer"] == "adamw")
    assert next(line for line in lines if line.startswith("| adamw")).endswith(
        f" {adamw['p_sign_flip_holm']:.3f} |")
    calm = stats.summary(_rows({"msam": NORMAL[:5]}))
    note = seed_noise_note(calm, "sam")[0]
    assert "finds no departure from normality" in note and "sign-flip" not in note
    assert not summary_lines(calm, "sam")[0].endswith("sign-flip p (Holm) |")
    few = stats.summary(_rows({"adamw": [0.001, 0.0012, 0.0011, 0.001, 0.05]}))
    assert "from 6 paired seeds on" in seed_noise_note(few, "sam")[0]


def test_the_terminal_says_so_too(capsys):
    from align.cli.compare import _print_tables

    rows = _rows({"adamw": SKEWED, "msam": NORMAL})
    _print_tables({"summary": stats.summary(rows), "robustness": stats.robustness(rows)}, "sam")
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines at the console's width
    assert "sign-flip p (Holm)" in out and "not guaranteed" in out and "adamw (p = " in out
