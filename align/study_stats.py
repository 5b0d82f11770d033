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
