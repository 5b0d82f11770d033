"""The shape of a study's seed noise (core: numbers in, numbers out): Shapiro–Wilk's test of normality and the
sign-flip permutation test of paired differences, which needs no normality.

A Student-t interval keeps its level only when the paired differences are close to normal; under skewed seed noise
a 5-seed 95% one covers 88% (centred exponential noise) or 82% (centred χ²₁; 200,000 simulated studies each).
``shapiro_wilk`` says when a comparison's differences are far from normal, and ``sign_flip_p`` tests the same mean
difference without assuming normality, only symmetry: under the null hypothesis (no difference, noise symmetric
about 0) each difference is as likely with either sign, so the observed |Σ d| is ranked among those of all 2^n sign
patterns. With n pairs its smallest two-sided p is 2/2^n: 0.0625 at n = 5,
which no test at 5% can reach, 0.031 at n = 6 (hence ``MIN_SIGN_FLIP_PAIRS``).

Shapiro–Wilk is computed here, not by scipy: the library's statistics need no scipy at run time (scipy comes with
the test extras only), and Royston's algorithm (Applied Statistics AS R94, 1995: his approximations of the
coefficients and of W's null distribution, for 3 ≤ n ≤ 5000) is the one scipy.stats.shapiro and R's shapiro.test
run; tests/test_seed_noise.py checks it against scipy.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

NORMALITY_ALPHA = 0.05  # a comparison's seed noise is "far from normal" when Shapiro–Wilk's p is below this
MIN_SIGN_FLIP_PAIRS = 6  # below this the sign-flip test cannot reach p ≤ 0.05 (2/2^5 = 0.0625)
EXACT_SIGN_FLIPS = 20  # up to 2^20 sign patterns are enumerated; more pairs: ``SIGN_FLIP_DRAWS`` random ones
SIGN_FLIP_DRAWS = 2 ** 16
_RELATIVE_TIE = 1e-12  # pattern sums within this (× Σ|d|) of the observed one count as ties: rounding, not a difference

# Royston's polynomial coefficients (AS R94), constant term first.
_C1 = (0.0, 0.221157, -0.147981, -2.07119, 4.434685, -2.706056)  # the largest coefficient a_n, in 1/√n
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)  # the second largest a_(n−1), in 1/√n
_G = (-2.273, 0.459)  # n ≤ 11: the bound γ(n) of −ln(1 − W)'s transform
_C3 = (0.544, -0.39978, 0.025054, -6.714e-4)  # n ≤ 11: mean of −ln(γ − ln(1 − W)), in n
_C4 = (1.3822, -0.77857, 0.062767, -0.0020322)  # n ≤ 11: ln of its standard deviation, in n
_C5 = (-1.5861, -0.31082, -0.083751, 0.0038915)  # n ≥ 12: mean of ln(1 − W), in ln n
_C6 = (-0.4803, -0.082676, 0.0030302)  # n ≥ 12: ln of its standard deviation, in ln n


def _poly(coefficients: tuple[float, ...], x: float) -> float:
    return sum(c * x ** i for i, c in enumerate(coefficients))


def _finite(values: Any) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[~np.isnan(x)]


def shapiro_coefficients(n: int) -> np.ndarray:
    """Royston's Shapiro–Wilk coefficients a_1 ≤ … ≤ a_n for a sample of ``n`` ≥ 3 (antisymmetric, Σ a² = 1)."""
    if n < 3:
        raise ValueError(f"Shapiro–Wilk needs n >= 3, got {n}")
    half = n // 2
    if n == 3:
        upper = np.array([math.sqrt(0.5)])
    else:
        m = np.array([NormalDist().inv_cdf((i - 0.375) / (n + 0.25)) for i in range(1, half + 1)])  # m_1 < 0 ...
        summ2 = 2.0 * float(m @ m)
        rsn = 1.0 / math.sqrt(n)
        upper = -m / math.sqrt(summ2)
        upper[0] = _poly(_C1, rsn) - m[0] / math.sqrt(summ2)
        fixed = 2 if n > 5 else 1  # how many of the largest coefficients come from the polynomials
        if fixed == 2:
            upper[1] = _poly(_C2, rsn) - m[1] / math.sqrt(summ2)
        rest = math.sqrt((summ2 - 2.0 * float(m[:fixed] @ m[:fixed]))
                         / (1.0 - 2.0 * float(upper[:fixed] @ upper[:fixed])))
        upper[fixed:] = -m[fixed:] / rest
    a = np.zeros(n)
    a[:half], a[n - half:] = -upper, upper[::-1]
    return a


def shapiro_wilk(values: Any) -> tuple[float, float]:
    """Shapiro–Wilk's W and its p-value (Royston) for the sample ``values`` (NaNs dropped): small p, far from
    normal. (NaN, NaN) below 3 values; (1, 1) when all values are equal (nothing to test)."""
    x = np.sort(_finite(values))
    n = x.size
    if n < 3:
        return math.nan, math.nan
    spread = float(x[-1] - x[0])
    if spread <= 1e-19 * max(1.0, float(np.abs(x).max())):
        return 1.0, 1.0
    a = shapiro_coefficients(n)
    centred = (x - x.mean()) / spread
    ssa, ssx, sax = float(a @ a), float(centred @ centred), float(a @ centred)
    root = math.sqrt(ssa * ssx)
    w1 = (root - sax) * (root + sax) / (ssa * ssx)  # 1 − W without cancellation when W is near 1
    w = 1.0 - w1
    if n == 3:  # exact: W is uniform in asin(√W) over [π/3, π/2]
        return w, max(0.0, 6.0 / math.pi * (math.asin(math.sqrt(w)) - math.pi / 3.0))
    y = math.log(w1)
    if n <= 11:
        gamma = _poly(_G, n)
        if y >= gamma:
            return w, 1e-99  # beyond the approximation's range: as far from normal as it measures
        y, mean, sd = -math.log(gamma - y), _poly(_C3, n), math.exp(_poly(_C4, n))
    else:
        mean, sd = _poly(_C5, math.log(n)), math.exp(_poly(_C6, math.log(n)))
    return w, 0.5 * math.erfc((y - mean) / (sd * math.sqrt(2.0)))  # the upper tail of N(mean, sd)


def _sign_flip_sums(d: np.ndarray) -> np.ndarray:
    """Σ s_i d_i for every sign pattern s ∈ {±1}^n (n ≤ ``EXACT_SIGN_FLIPS``), or for ``SIGN_FLIP_DRAWS`` random
    ones drawn from a fixed seed."""
    n = d.size
    if n > EXACT_SIGN_FLIPS:
        signs = np.random.default_rng(0).integers(0, 2, size=(SIGN_FLIP_DRAWS, n)) * 2 - 1
        return signs @ d
    patterns = np.arange(2 ** n, dtype=np.int64)
    out = np.empty(patterns.size)
    for lo in range(0, patterns.size, 2 ** 14):
        bits = (patterns[lo:lo + 2 ** 14, None] >> np.arange(n)) & 1
        out[lo:lo + 2 ** 14] = (1 - 2 * bits) @ d
    return out


def sign_flip_p(differences: Any) -> float:
    """Two-sided p of the sign-flip permutation test of mean(differences) = 0 (NaNs dropped): the share of the
    2^n sign patterns whose |Σ ± d_i| reaches the observed |Σ d_i| (exact up to ``EXACT_SIGN_FLIPS`` differences;
    beyond, (1 + hits) / (1 + draws) over a fixed-seed sample of patterns). NaN for no difference."""
    d = _finite(differences)
    if d.size == 0:
        return math.nan
    observed = abs(float(d.sum()))
    sums = np.abs(_sign_flip_sums(d))
    hits = int((sums >= observed - _RELATIVE_TIE * float(np.abs(d).sum())).sum())
    if d.size > EXACT_SIGN_FLIPS:
        return (1 + hits) / (1 + sums.size)
    return hits / sums.size
