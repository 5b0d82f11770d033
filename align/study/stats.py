"""Statistics of an optimizer study (pure functions of the rows of ``results.csv``; no I/O).

A row is one run: optimizer, lr, rho (None for single-pass optimizers), seed, status ("ok" | "diverged"),
collapsed (True | False; None where its results predate the count: ``align.train.run``), optionally the method
axes of the grid (``METHOD_AXES``: η, α, β, ...; None or absent where a method lacks them) and flat metric columns such
as ``best_val_mean_R@1``, ``best_test_mutual_knn``, ``max_val_mutual_knn``, ``loss_at_step``, ``final_loss``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from align.optim.registry import METHOD_AXES
from align.study.seed_noise import MIN_SIGN_FLIP_PAIRS, shapiro_wilk, sign_flip_p

SCORE = "mean_R@1"        # the default headline metric: mean of i2t and t2i R@1
ALIGNMENT = "mutual_knn"  # the paper's alignment metric
ZEROSHOT = ("zeroshot_top1", "zeroshot_top5", "zeroshot_balanced_accuracy")  # labelled sets (mnist)
SUMMARY_METRICS = (SCORE, "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", ALIGNMENT, "cknna", *ZEROSHOT)
# A study's headline metric (``score`` of its config) picks each optimizer's best configuration on validation and
# is the one compared with the reference on test; zero-shot top-1 on sets whose captions only name the class.
SCORES = {"mean_R@1": "mean R@1", "zeroshot_top1": "zero-shot top-1"}


def cell_number(value: Any) -> float:
    """A results.csv cell as a number: NaN where it is blank or None."""
    return float(value) if value is not None and value != "" else math.nan


def _is_set(value: Any) -> bool:
    return value is not None and value != "" and not (isinstance(value, float) and math.isnan(value))


def config_key(row: dict[str, Any]) -> tuple:
    """A row's configuration: (optimizer, lr, ρ), then (axis, value) for each method axis the row sets.

    Without method axes this is the plain (optimizer, lr, ρ) triple; the pairs keep η = 1 and α = 1 apart.
    """
    extra = tuple((a, float(row[a])) for a in METHOD_AXES if _is_set(row.get(a)))
    return (row["optimizer"], row["lr"], row["rho"], *extra)


def key_axes(key: tuple) -> dict[str, float]:
    """The method-axis values of a configuration key from ``config_key`` ({} when it has none)."""
    return dict(key[3:])


def used_axes(rows: list[dict[str, Any]]) -> list[str]:
    """The method axes any row sets (the extra columns of the tables), in ``METHOD_AXES`` order."""
    return [a for a in METHOD_AXES if any(_is_set(r.get(a)) for r in rows)]


def config_means(rows: list[dict[str, Any]], column: str) -> dict[tuple, float]:
    """Mean of ``column`` over seeds for every configuration (``config_key``; NaN-aware)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(config_key(r), []).append(cell_number(r.get(column)))
    return {k: float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else math.nan for k, v in groups.items()}


def best_configs(rows: list[dict[str, Any]], select: str = f"best_val_{SCORE}") -> dict[str, tuple]:
    """Per optimizer, the configuration with the best mean validation score; configurations in which a
    seed diverged only win when every configuration of that optimizer diverged somewhere."""
    means = config_means(rows, select)
    diverged = {config_key(r) for r in rows if r["status"] != "ok"}
    best: dict[str, tuple] = {}
    for key, value in means.items():
        name = key[0]
        rank = (key not in diverged, -math.inf if math.isnan(value) else value)
        if name not in best or rank > best[name][1]:
            best[name] = (key, rank)
    return {name: key for name, (key, _) in best.items()}


def _seed_stats(seeds: list[dict[str, Any]]) -> dict[str, float]:
    """Test metrics of one configuration's seeds: mean and sample std (0 for a single value) per metric."""
    out: dict[str, float] = {}
    for metric in SUMMARY_METRICS:
        values = [cell_number(r.get(f"best_test_{metric}")) for r in seeds]
        out[f"{metric}_mean"] = float(np.nanmean(values)) if not all(map(math.isnan, values)) else math.nan
        out[f"{metric}_std"] = float(np.nanstd(values, ddof=1)) if sum(not math.isnan(v) for v in values) > 1 else 0.0
    return out


def _vs_reference(verdict: dict[str, Any] | None, is_reference: bool) -> dict[str, Any]:
    """The summary's reference columns from a ``verdicts_vs_reference`` row (blank for the reference itself)."""
    if verdict is None:
        return {"pairs": None, "diff_vs_ref": math.nan, "diff_ci_low": math.nan, "diff_ci_high": math.nan,
                "no_interval": None, "p_holm": math.nan, "verdict": "reference" if is_reference else None,
                "normality_p": math.nan, "p_sign_flip": math.nan, "p_sign_flip_holm": math.nan}
    pairs = verdict["pairs"]
    return {"pairs": pairs, "diff_vs_ref": verdict["diff_mean"], "diff_ci_low": verdict["diff_low"],
            "diff_ci_high": verdict["diff_high"],
            "no_interval": f"n = {pairs}: no interval" if pairs < MIN_PAIRS else None,  # why the bounds are blank
            "p_holm": verdict["p_holm"], "verdict": verdict["verdict"], "normality_p": verdict["normality_p"],
            "p_sign_flip": verdict["p_sign_flip"], "p_sign_flip_holm": verdict["p_sign_flip_holm"]}


def summary(rows: list[dict[str, Any]], reference: str = "sam", level: float = 0.95,
            score: str = SCORE) -> list[dict[str, Any]]:
    """Best configuration per optimizer (chosen on validation ``score``): test metrics mean ± std over its seeds,
    and its test ``score`` against the reference's best configuration, paired by seed.

    The comparison states n (``pairs``), the mean difference with its Student-t ``level`` interval (NaN bounds
    below 3 pairs: no interval at all rather than one that does not keep its level), the Holm-adjusted p over
    all optimizers compared with the reference and the verdict (``VERDICTS``); beside them Shapiro–Wilk's p on the
    paired differences (``normality_p``) and the sign-flip test's p, raw and Holm-adjusted (``p_sign_flip``,
    ``p_sign_flip_holm``; from ``MIN_SIGN_FLIP_PAIRS`` pairs on).
    """
    best = best_configs(rows, f"best_val_{score}")
    axes = used_axes(rows)
    verdicts: dict[str, dict[str, Any]] = {}
    if reference in best:
        scores = best_config_scores(rows, f"best_test_{score}", f"best_val_{score}")
        verdicts = {v["optimizer"]: v for v in verdicts_vs_reference(scores, reference, alpha=1.0 - level)}
    out = []
    for name, key in best.items():
        seeds = list({r["seed"]: r for r in rows if config_key(r) == key}.values())
        entry: dict[str, Any] = {"optimizer": name, "lr": key[1], "rho": key[2],
                                 **{a: key_axes(key).get(a) for a in axes}, "seeds": len(seeds),
                                 "diverged_seeds": sum(r["status"] != "ok" for r in seeds), "score": score}
        entry.update(_seed_stats(seeds))
        entry.update(_vs_reference(verdicts.get(name), name == reference))
        out.append(entry)
    return out


def collapse_count(rows: list[dict[str, Any]]) -> tuple[int | None, int]:
    """(collapsed runs, runs whose collapse was measured) among ``rows``; (None, 0) when none was measured (results
    written before collapse was recorded)."""
    known = [bool(r["collapsed"]) for r in rows if r.get("collapsed") not in (None, "")]
    return (sum(known) if known else None), len(known)


def _config_order(key: tuple) -> tuple:
    """Sort order of (lr, ρ, *axis pairs): ρ None (single-pass optimizers) first."""
    return (key[0], -1 if key[1] is None else key[1], key[2:])


def table3(rows: list[dict[str, Any]], optimizer: str) -> list[dict[str, Any]]:
    """The paper's Table 3 shape for one optimizer: per (lr, ρ, method axes) cell, the best alignment over
    training (validation mutual-k-NN), the loss at step T and at the end (means over seeds), divergence and
    collapse (``collapsed`` of ``collapse_measured`` seeds; None when no seed's was measured).

    Every row carries the method-axis columns any row of ``rows`` uses (None where this optimizer lacks one).
    """
    axes = used_axes(rows)
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["optimizer"] == optimizer:
            cells.setdefault(config_key(r)[1:], []).append(r)
    out = []
    for key, rs in sorted(cells.items(), key=lambda kv: _config_order(kv[0])):
        values = dict(key[2:])
        collapsed, measured = collapse_count(rs)
        out.append({"lr": key[0], "rho": key[1], **{a: values.get(a) for a in axes},
                    "best_alignment": float(np.nanmean([cell_number(r.get(f"max_val_{ALIGNMENT}")) for r in rs])),
                    "loss_at_step": float(np.nanmean([cell_number(r.get("loss_at_step")) for r in rs])),
                    "final_loss": float(np.nanmean([cell_number(r.get("final_loss")) for r in rs])),
                    "diverged": sum(r["status"] != "ok" for r in rs), "seeds": len(rs),
                    "collapsed": collapsed, "collapse_measured": measured})
    return out


def robustness(rows: list[dict[str, Any]], select: str = f"best_val_{SCORE}",
               test: str = f"best_test_{SCORE}") -> list[dict[str, Any]]:
    """Per optimizer, judged on VALIDATION seed means (``select``): the share of its grid configurations within
    95% of its best one, its best and its worst one. Beside them, labelled ``*_test``, the test means of those
    same two configurations; nothing here is chosen on test scores. Then its configurations with a diverged seed,
    and over its runs: how many diverged, and how many collapsed of those whose collapse was measured.
    """
    val = config_means(rows, select)
    tst = config_means(rows, test)
    diverged = {config_key(r) for r in rows if r["status"] != "ok"}
    axes = used_axes(rows)
    out = []
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        items = {k: 0.0 if math.isnan(v) else v for k, v in val.items() if k[0] == name}
        best_key, worst_key = max(items, key=items.__getitem__), min(items, key=items.__getitem__)
        best_value = items[best_key]
        within = float(np.mean([v >= 0.95 * best_value for v in items.values()])) if best_value > 0 else 0.0
        worst_axes = key_axes(worst_key)
        runs = [r for r in rows if r["optimizer"] == name]
        collapsed, measured = collapse_count(runs)
        out.append({"optimizer": name, "configs": len(items), "within_95pct_val": within,
                    "best_val": best_value, "worst_val": items[worst_key],
                    "best_test": tst[best_key], "worst_test": tst[worst_key],
                    "worst_lr": worst_key[1], "worst_rho": worst_key[2],
                    **{f"worst_{a}": worst_axes.get(a) for a in axes},
                    "diverged_configs": sum(k in diverged for k in items), "runs": len(runs),
                    "diverged_runs": sum(r["status"] != "ok" for r in runs), "collapsed_runs": collapsed,
                    "collapse_measured": measured})
    return out



def rank_agreement(first: dict[str, float], second: dict[str, float]) -> tuple[float, int]:
    """Kendall's τ-b between two rankings of the optimizers both hold (higher value = better) → (τ, n); NaN
    below 2 optimizers or when one side is all ties. Counts concordant minus discordant pairs over √ of the
    untied pair counts of each side."""
    names = [n for n in first if n in second and not math.isnan(first[n]) and not math.isnan(second[n])]
    concordant = discordant = tied_first = tied_second = 0
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = np.sign(first[a] - first[b]), np.sign(second[a] - second[b])
            tied_first += x == 0
            tied_second += y == 0
            concordant += x * y > 0
            discordant += x * y < 0
    pairs = len(names) * (len(names) - 1) // 2
    denominator = math.sqrt((pairs - tied_first) * (pairs - tied_second))
    return (float((concordant - discordant) / denominator) if denominator else math.nan), len(names)


def max_paired_gap(rows: list[dict[str, Any]], optimizer: str, reference: str, where: dict[str, float] | None = None,
                   column: str = f"best_test_{SCORE}") -> tuple[float, int]:
    """Largest |difference in ``column``| between runs of ``optimizer`` whose method axes are ``where`` and the
    ``reference`` runs of the same lr, ρ and seed → (gap, pairs); (NaN, 0) when no run pairs."""
    ref = {(r["lr"], r["rho"], r["seed"]): cell_number(r.get(column)) for r in rows if r["optimizer"] == reference}
    gaps = [abs(cell_number(r.get(column)) - ref[(r["lr"], r["rho"], r["seed"])]) for r in rows
            if r["optimizer"] == optimizer and key_axes(config_key(r)) == (where or {})
            and (r["lr"], r["rho"], r["seed"]) in ref]
    finite = [g for g in gaps if not math.isnan(g)]
    return (max(finite) if finite else math.nan), len(finite)

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
    return {name: {r["seed"]: cell_number(r.get(column)) for r in rows if config_key(r) == key}
            for name, key in best.items()}


def verdicts_vs_reference(scores: dict[str, dict[Any, float]], reference: str, alpha: float = 0.05,
                          higher_is_better: bool = True) -> list[dict[str, Any]]:
    """Each optimizer against ``reference``, paired by seed: paired t-test, Holm-adjusted over the optimizers.

    ``scores`` maps optimizer → {seed: value}; seeds missing or NaN on either side are not paired. Each row has
    the mean difference (optimizer − reference) with its (unadjusted) 1 − alpha Student-t interval, t, p, the
    Holm-adjusted p and a verdict from ``VERDICTS``: "better"/"worse" when the adjusted p ≤ alpha, else "no
    detectable difference"; fewer than 3 pairs are not tested and do not count in Holm's family.

    Beside the t-test, which needs normal differences: Shapiro–Wilk's p on the differences (``normality_p``, NaN
    below 3 pairs), and from ``MIN_SIGN_FLIP_PAIRS`` pairs on the sign-flip permutation test's p (``p_sign_flip``)
    Holm-adjusted over the comparisons that have one (``p_sign_flip_holm``); NaN below.
    """
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not among the optimizers {sorted(scores)}")
    ref = scores[reference]
    out = []
    for name, by_seed in scores.items():
        if name == reference:
            continue
        diffs = [by_seed[s] - ref[s] for s in by_seed
                 if s in ref and not math.isnan(cell_number(by_seed[s])) and not math.isnan(cell_number(ref[s]))]
        mean, low, high = paired_interval(diffs, 1.0 - alpha)
        t, p = paired_t_test(diffs) if len(diffs) >= MIN_PAIRS else (math.nan, math.nan)
        out.append({"optimizer": name, "reference": reference, "pairs": len(diffs), "diff_mean": mean,
                    "diff_low": low, "diff_high": high, "t": t, "p": p, "normality_p": shapiro_wilk(diffs)[1],
                    "p_sign_flip": sign_flip_p(diffs) if len(diffs) >= MIN_SIGN_FLIP_PAIRS else math.nan})
    for row, p_flip in zip(out, holm_adjust([row["p_sign_flip"] for row in out])):
        row["p_sign_flip_holm"] = p_flip
    for row, p_holm in zip(out, holm_adjust([row["p"] for row in out])):
        row["p_holm"] = p_holm
        if row["pairs"] < MIN_PAIRS:
            row["verdict"] = VERDICTS[3]
        elif p_holm <= alpha and row["diff_mean"] != 0.0:
            row["verdict"] = VERDICTS[0] if (row["diff_mean"] > 0) == higher_is_better else VERDICTS[1]
        else:
            row["verdict"] = VERDICTS[2]
    return out
