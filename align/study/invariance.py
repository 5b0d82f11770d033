"""The reparameterization-invariance part of a study whose grid has ``rescales`` (core: rows of results.csv in,
table entries and report lines out; no I/O).

Each optimizer's best configuration is chosen at c = 1 (the plain head) on validation, as the rest of the report
chooses it; the same configuration trained at each other c (``head.rescale``: the same function at initialisation,
other coordinates) is compared with it on test, paired by seed. An optimizer "moves by more than its seed noise"
when the paired t-test of some c against c = 1 rejects, Holm-adjusted over every such comparison of the study.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from align.study.stats import best_configs, cell_number, config_key, holm_adjust, paired_interval, paired_t_test

ALPHA = 0.05  # the level of the "moves" statement (Holm-adjusted)
# results.csv's sharpness columns the table shows per c, where the runs measured them: (column, label)
SHARPNESS = (("sharpness_worst_case_first_order", "Euclidean"), ("sharpness_adaptive_first_order", "adaptive"),
             ("sharpness_monge_first_order", "Monge"))


def scale_of(row: dict[str, Any]) -> float:
    """A row's head rescaling c (1 where the grid had no rescales axis)."""
    c = cell_number(row.get("rescale"))
    return 1.0 if math.isnan(c) else c


def at_unit_scale(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the plain head (c = 1): what the rest of the report compares (all rows without the axis)."""
    return [r for r in rows if scale_of(r) == 1.0]


def has_rescales(rows: list[dict[str, Any]]) -> bool:
    """Whether any row was trained at a rescaling other than 1."""
    return any(scale_of(r) != 1.0 for r in rows)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def invariance_entries(rows: list[dict[str, Any]], score: str) -> list[dict[str, Any]]:
    """Per optimizer (its best configuration at c = 1 on validation ``score``): for every c, the test ``score``
    per seed, its mean, the paired difference to c = 1 (mean, 95% t-interval, n, t-test p and its Holm
    adjustment over all optimizers and c), the mean sharpness columns and the runs of each seed; then the spread
    (max − min over c of the means, with the t-interval of each seed's spread over c) and whether it moves."""
    scales = sorted({scale_of(r) for r in rows})
    best = best_configs(at_unit_scale(rows), f"best_val_{score}")
    out = []
    for name, key in best.items():
        mine = [r for r in rows if config_key(r) == key]
        per_c = {c: {r["seed"]: r for r in mine if scale_of(r) == c} for c in scales}
        base = {s: cell_number(r.get(f"best_test_{score}")) for s, r in per_c[1.0].items()}
        levels = []
        for c in scales:
            test = {s: cell_number(r.get(f"best_test_{score}")) for s, r in per_c[c].items()}
            diffs = [test[s] - base[s] for s in sorted(set(test) & set(base))]
            diffs = [d for d in diffs if not math.isnan(d)]
            mean, low, high = paired_interval(diffs) if c != 1.0 and diffs else (math.nan,) * 3
            levels.append({"c": c, "mean": _mean(list(test.values())), "std": _std(list(test.values())),
                           "diff": mean, "low": low, "high": high, "pairs": len(diffs) if c != 1.0 else 0,
                           "p": paired_t_test(diffs)[1] if c != 1.0 else math.nan,
                           "runs": {s: r["run"] for s, r in per_c[c].items()},
                           **{col: _mean([cell_number(r.get(col)) for r in per_c[c].values()]) for col, _ in SHARPNESS}})
        spreads = [max(v) - min(v) for s in sorted(base)
                   if len(v := [cell_number(per_c[c][s].get(f"best_test_{score}")) for c in scales if s in per_c[c]]) == len(scales)
                   and not any(math.isnan(x) for x in v)]
        means = [lv["mean"] for lv in levels if not math.isnan(lv["mean"])]
        spread_mean, spread_low, spread_high = paired_interval(spreads) if spreads else (math.nan,) * 3
        out.append({"optimizer": name, "key": key, "levels": levels, "seed_std": _std(list(base.values())),
                    "spread": max(means) - min(means) if means else math.nan, "seed_spread": spread_mean,
                    "spread_low": spread_low, "spread_high": spread_high})
    _holm(out)
    return out


def _std(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.std(finite, ddof=1)) if len(finite) >= 2 else math.nan


def _holm(entries: list[dict[str, Any]]) -> None:
    """Each level's Holm-adjusted p over all (optimizer, c ≠ 1) comparisons, and each entry's ``moves``."""
    levels = [lv for e in entries for lv in e["levels"] if lv["c"] != 1.0]
    for lv, adjusted in zip(levels, holm_adjust([lv["p"] for lv in levels])):
        lv["p_holm"] = adjusted
    for e in entries:
        e["moves"] = any(lv.get("p_holm", math.nan) < ALPHA for lv in e["levels"])


def _points(value: float, sign: bool = False) -> str:
    return "—" if math.isnan(value) else (f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}")


def _interval(mean: float, low: float, high: float, n: int | None = None, sign: bool = True) -> str:
    if math.isnan(mean):
        return "—"
    tail = f" (n = {n})" if n is not None else ""
    if math.isnan(low):
        return f"{_points(mean, sign)}{tail}: no interval"
    return f"{_points(mean, sign)} [{_points(low, sign)}, {_points(high, sign)}]{tail}"


def _p(value: float) -> str:
    return "—" if math.isnan(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")


def invariance_lines(entries: list[dict[str, Any]], label: str, config_text: Any) -> list[str]:
    """The Invariance section's tables and statement (markdown) from ``invariance_entries`` (a level's
    ``distances``, where the caller measured them: {"image": ..., "text": ...} mean cosine distances);
    ``config_text(key)`` names a configuration."""
    shown = [(col, name) for col, name in SHARPNESS
             if any(not math.isnan(lv[col]) for e in entries for lv in e["levels"])]
    head = ("| optimizer (best at c = 1) | c | test " + label + " (%) | Δ vs c = 1 (points, 95% t-interval, n) | "
            "p (Holm) | cos. distance to c = 1, image / text | " + "".join(f"{n} sharpness | " for _, n in shown))
    lines = [head, "|---" * (6 + len(shown)) + "|"]
    for e in entries:
        for lv in e["levels"]:
            dist = lv.get("distances")
            dist_text = "—" if not dist else f"{dist['image']:.4f} / {dist['text']:.4f}"
            lines.append(f"| {e['optimizer']} ({config_text(e['key'])}) | {lv['c']:g} | "
                         f"{_points(lv['mean'])} ± {_points(lv['std'])} | "
                         + ("(reference)" if lv["c"] == 1.0 else _interval(lv["diff"], lv["low"], lv["high"], lv["pairs"]))
                         + f" | {_p(lv.get('p_holm', math.nan))} | {dist_text} | "
                         + "".join(f"{_sharp(lv[col])} | " for col, _ in shown))
    lines += ["", "| optimizer | spread of the means over c (points) | each seed's spread over c (points, 95% "
              "t-interval) | seed std at c = 1 (points) | moves beyond seed noise |", "|---" * 5 + "|"]
    for e in entries:
        lines.append(f"| {e['optimizer']} | {_points(e['spread'])} | "
                     f"{_interval(e['seed_spread'], e['spread_low'], e['spread_high'], sign=False)} | {_points(e['seed_std'])} | "
                     f"{'yes' if e['moves'] else 'no'} |")
    moved = [e["optimizer"] for e in entries if e["moves"]]
    kept = [e["optimizer"] for e in entries if not e["moves"]]
    lines += ["", (f"Moved by more than their seed noise (some c against c = 1, paired t-test, Holm-adjusted p < "
                   f"{ALPHA:g}): {', '.join(moved)}." if moved else
                   f"No optimizer moved by more than its seed noise (paired t-test of each c against c = 1, "
                   f"Holm-adjusted p ≥ {ALPHA:g} everywhere).")
              + (f" Within their seed noise: {', '.join(kept)}." if moved and kept else "")]
    return lines


def _sharp(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3g}"
