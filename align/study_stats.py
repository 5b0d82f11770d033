"""Statistics of an optimizer study (pure functions of the rows of ``results.csv``; no I/O).

A row is one run: optimizer, lr, rho (None for single-pass optimizers), seed, status ("ok" | "diverged") and
flat metric columns such as ``best_val_mean_R@1``, ``best_test_mutual_knn``, ``max_val_mutual_knn``,
``loss_at_step``, ``final_loss``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

SCORE = "mean_R@1"        # the headline metric: mean of i2t and t2i R@1
ALIGNMENT = "mutual_knn"  # the paper's alignment metric


def _num(value: Any) -> float:
    return float(value) if value is not None and value != "" else math.nan


def config_means(rows: list[dict[str, Any]], column: str) -> dict[tuple, float]:
    """Mean of ``column`` over seeds for every (optimizer, lr, ρ) configuration (NaN-aware)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["optimizer"], r["lr"], r["rho"]), []).append(_num(r.get(column)))
    return {k: float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else math.nan for k, v in groups.items()}


def best_configs(rows: list[dict[str, Any]], select: str = f"best_val_{SCORE}") -> dict[str, tuple]:
    """Per optimizer, the configuration with the best mean validation score; configurations in which a
    seed diverged only win when every configuration of that optimizer diverged somewhere."""
    means = config_means(rows, select)
    diverged = {(r["optimizer"], r["lr"], r["rho"]) for r in rows if r["status"] != "ok"}
    best: dict[str, tuple] = {}
    for key, value in means.items():
        name = key[0]
        rank = (key not in diverged, -math.inf if math.isnan(value) else value)
        if name not in best or rank > best[name][1]:
            best[name] = (key, rank)
    return {name: key for name, (key, _) in best.items()}


def bootstrap_difference(a: list[float], b: list[float], samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b paired by seed, and its percentile bootstrap 95% interval (resampling seeds)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = diff[~np.isnan(diff)]
    if diff.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(samples, diff.size))
    boots = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def summary(rows: list[dict[str, Any]], reference: str = "sam", samples: int = 2000) -> list[dict[str, Any]]:
    """Best configuration per optimizer: test metrics mean ± std over seeds, difference to the reference."""
    best = best_configs(rows)
    by_seed = {}
    for name, key in best.items():
        by_seed[name] = {r["seed"]: r for r in rows if (r["optimizer"], r["lr"], r["rho"]) == key}
    out = []
    for name, key in best.items():
        seeds = by_seed[name]
        entry: dict[str, Any] = {"optimizer": name, "lr": key[1], "rho": key[2], "seeds": len(seeds),
                                 "diverged_seeds": sum(r["status"] != "ok" for r in seeds.values())}
        for metric in (SCORE, "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", ALIGNMENT, "cknna"):
            values = [_num(r.get(f"best_test_{metric}")) for r in seeds.values()]
            entry[f"{metric}_mean"] = float(np.nanmean(values)) if not all(map(math.isnan, values)) else math.nan
            entry[f"{metric}_std"] = float(np.nanstd(values, ddof=1)) if sum(not math.isnan(v) for v in values) > 1 else 0.0
        if reference in by_seed and name != reference:
            common = sorted(set(seeds) & set(by_seed[reference]))
            diff = bootstrap_difference([_num(seeds[s].get(f"best_test_{SCORE}")) for s in common],
                                        [_num(by_seed[reference][s].get(f"best_test_{SCORE}")) for s in common],
                                        samples=samples)
            entry.update(diff_vs_ref=diff[0], diff_ci_low=diff[1], diff_ci_high=diff[2])
        else:
            entry.update(diff_vs_ref=math.nan, diff_ci_low=math.nan, diff_ci_high=math.nan)
        out.append(entry)
    return out


def table3(rows: list[dict[str, Any]], optimizer: str) -> list[dict[str, Any]]:
    """The paper's Table 3 shape for one optimizer: per (lr, ρ) cell, the best alignment over training
    (validation mutual-k-NN), the loss at step T and at the end (means over seeds), and divergence."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["optimizer"] == optimizer:
            cells.setdefault((r["lr"], r["rho"]), []).append(r)
    out = []
    for (lr, rho), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        out.append({"lr": lr, "rho": rho,
                    "best_alignment": float(np.nanmean([_num(r.get(f"max_val_{ALIGNMENT}")) for r in rs])),
                    "loss_at_step": float(np.nanmean([_num(r.get("loss_at_step")) for r in rs])),
                    "final_loss": float(np.nanmean([_num(r.get("final_loss")) for r in rs])),
                    "diverged": sum(r["status"] != "ok" for r in rs), "seeds": len(rs)})
    return out


def robustness(rows: list[dict[str, Any]], column: str = f"best_test_{SCORE}") -> list[dict[str, Any]]:
    """Per optimizer: the share of its grid configurations within 95% of its best one, and its worst one."""
    means = config_means(rows, column)
    diverged = {(r["optimizer"], r["lr"], r["rho"]) for r in rows if r["status"] != "ok"}
    out = []
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        items = {k: v for k, v in means.items() if k[0] == name}
        values = np.array([0.0 if math.isnan(v) else v for v in items.values()])
        best_value = float(values.max())
        worst_key = min(items, key=lambda k: 0.0 if math.isnan(items[k]) else items[k])
        out.append({"optimizer": name, "configs": len(items),
                    "within_95pct": float(np.mean(values >= 0.95 * best_value)) if best_value > 0 else 0.0,
                    "best": best_value, "worst": float(values.min()),
                    "worst_lr": worst_key[1], "worst_rho": worst_key[2],
                    "diverged_configs": sum(k in diverged for k in items)})
    return out


# -- honest intervals and tests for a handful of paired seeds ---------------------------------------------
# A percentile bootstrap over n seeds covers far less than its nominal level at small n (paper-notes.md:
# 84% at n = 5); a Student-t interval on the paired differences keeps its level at every n under normal noise.

MIN_PAIRS = 3  # below this, report the numbers themselves: no interval, no test
VERDICTS = ("better", "worse", "no detectable difference", "n < 3: no test")


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularized incomplete beta I_x(a, b) with y = 1 − x given separately (no cancellation near x = 1)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry I_x(a,b) = 1 − I_y(b,a) beyond.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes §6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom (NaN t gives NaN)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    t2 = t * t
    return _betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))


def student_t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with ``df`` > 0 degrees of freedom (bisection on the exact CDF)."""
    if not 0.0 < q < 1.0 or not df > 0:
        raise ValueError(f"need 0 < q < 1 and df > 0, got q={q!r}, df={df!r}")
    if q == 0.5:
        return 0.0
    tail = 2.0 * min(q, 1.0 - q)  # two-sided tail probability of the |quantile|
    lo, hi = 0.0, 1.0
    while student_t_two_sided_p(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    while True:  # bisect until the bracket cannot shrink in floating point
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if student_t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return math.copysign(0.5 * (lo + hi), q - 0.5)


def paired_intervals(differences: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise Student-t intervals: differences[R, n] (finite) → (means[R], lows[R], highs[R]); NaN bounds if n < 3."""
    d = np.asarray(differences, dtype=float)
    if d.ndim != 2 or not np.isfinite(d).all():
        raise ValueError("differences must be a finite [repetitions, pairs] array")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n = d.shape[1]
    means = d.mean(axis=1) if n else np.full(d.shape[0], math.nan)
    if n < MIN_PAIRS:
        nan = np.full(d.shape[0], math.nan)
        return means, nan, nan.copy()
    half = student_t_quantile(0.5 + level / 2.0, n - 1) * d.std(axis=1, ddof=1) / math.sqrt(n)
    return means, means - half, means + half


def paired_interval(differences: Any, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t interval (NaNs dropped); NaN bounds below 3 differences."""
    d = np.asarray(differences, dtype=float).ravel()
    d = d[~np.isnan(d)]
    means, lows, highs = paired_intervals(d[None, :], level)
    return float(means[0]), float(lows[0]), float(highs[0])


def paired_t_test(differences: Any) -> tuple[float, float]:
    """Two-sided one-sample t-test of mean(differences) = 0 (NaNs dropped): (t, p); NaN below 2 differences.

    All differences equal: t = ±inf, p = 0 when they are non-zero; t = NaN, p = 1 when they are all zero.
    """
    d = np.asarray(differences, dtype=float).ravel()
    d = d[~np.isnan(d)]
    if d.size < 2:
        return math.nan, math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return (math.copysign(math.inf, mean), 0.0) if mean != 0.0 else (math.nan, 1.0)
    t = mean / (sd / math.sqrt(d.size))
    return t, student_t_two_sided_p(t, d.size - 1)


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given); NaN entries stay NaN and are not counted."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(finite)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))  # monotone: never below a smaller p's adjustment
        out[i] = running
    return out


def best_config_scores(rows: list[dict[str, Any]], column: str = f"best_test_{SCORE}",
                       select: str = f"best_val_{SCORE}") -> dict[str, dict[Any, float]]:
    """Per optimizer, ``column`` per seed of its best configuration (chosen on ``select``, as ``best_configs``)."""
    best = best_configs(rows, select)
    return {name: {r["seed"]: _num(r.get(column)) for r in rows if (r["optimizer"], r["lr"], r["rho"]) == key}
            for name, key in best.items()}


def verdicts_vs_reference(scores: dict[str, dict[Any, float]], reference: str, alpha: float = 0.05,
                          higher_is_better: bool = True) -> list[dict[str, Any]]:
    """Each optimizer against ``reference``, paired by seed: paired t-test, Holm-adjusted over the optimizers.

    ``scores`` maps optimizer → {seed: value}; seeds missing or NaN on either side are not paired. Each row has
    the mean difference (optimizer − reference) with its (unadjusted) 1 − alpha Student-t interval, t, p, the
    Holm-adjusted p and a verdict from ``VERDICTS``: "better"/"worse" when the adjusted p ≤ alpha, else "no
    detectable difference"; fewer than 3 pairs are not tested and do not count in Holm's family.
    """
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not among the optimizers {sorted(scores)}")
    ref = scores[reference]
    out = []
    for name, by_seed in scores.items():
        if name == reference:
            continue
        diffs = [by_seed[s] - ref[s] for s in by_seed
                 if s in ref and not math.isnan(_num(by_seed[s])) and not math.isnan(_num(ref[s]))]
        mean, low, high = paired_interval(diffs, 1.0 - alpha)
        t, p = paired_t_test(diffs) if len(diffs) >= MIN_PAIRS else (math.nan, math.nan)
        out.append({"optimizer": name, "reference": reference, "pairs": len(diffs), "diff_mean": mean,
                    "diff_low": low, "diff_high": high, "t": t, "p": p})
    for row, p_holm in zip(out, holm_adjust([row["p"] for row in out])):
        row["p_holm"] = p_holm
        if row["pairs"] < MIN_PAIRS:
            row["verdict"] = VERDICTS[3]
        elif p_holm <= alpha and row["diff_mean"] != 0.0:
            row["verdict"] = VERDICTS[0] if (row["diff_mean"] > 0) == higher_is_better else VERDICTS[1]
        else:
            row["verdict"] = VERDICTS[2]
    return out
