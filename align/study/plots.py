"""Study plots (PNG): heatmaps over ρ × lr, training curves, a bar chart with error bars, sharpness vs recall."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from align.common.figures import pyplot, save_figure
from align.optim.registry import OPTIMIZERS
from align.study.stats import SCORE, SCORES, cell_number, config_key
from align.train import run_dir


def _label(name: str) -> str:
    """The registry's display label of an optimizer (the name itself when it is not registered)."""
    return OPTIMIZERS[name].label if name in OPTIMIZERS else name


def _color(name: str, fallback: str | None = None) -> str | None:
    """The registry's plot colour of an optimizer, so it matches the toy figures."""
    return OPTIMIZERS[name].color if name in OPTIMIZERS else fallback


def _panels(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows per heatmap panel: per optimizer and per combination of its method-axis values (η = 1000, ...)."""
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = config_key(r)
        panels.setdefault((key[0], *key[3:]), []).append(r)
    return panels


def heatmaps(rows: list[dict[str, Any]], column: str, title: str, path: Path, per_row: int = 6) -> Path:
    """One panel per optimizer (and method-axis value): seed-mean ``column`` over lr (rows) × ρ (columns);
    ✕ marks diverged seeds. At most ``per_row`` panels side by side."""
    plt = pyplot()
    panels = _panels(rows)
    ncols = max(1, min(per_row, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 3.6 * nrows), squeeze=False, layout="constrained")
    values = [cell_number(r.get(column)) for r in rows]
    vmin, vmax = np.nanmin(values) if values else 0, np.nanmax(values) if values else 1
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel, rs) in zip(axes.flat, panels.items()):
        name = panel[0]
        lrs = sorted({r["lr"] for r in rs})
        rhos = sorted({r["rho"] for r in rs}, key=lambda x: -1 if x is None else x)
        grid = np.full((len(lrs), len(rhos)), np.nan)
        div = np.zeros_like(grid)
        for i, lr in enumerate(lrs):
            for j, rho in enumerate(rhos):
                cell = [r for r in rs if r["lr"] == lr and r["rho"] == rho]
                vals = [cell_number(r.get(column)) for r in cell]
                grid[i, j] = np.nanmean(vals) if not all(map(math.isnan, vals)) else np.nan
                div[i, j] = sum(r["status"] != "ok" for r in cell)
        im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
        for i in range(len(lrs)):
            for j in range(len(rhos)):
                text = "—" if math.isnan(grid[i, j]) else f"{grid[i, j]:.3f}"
                ax.text(j, i, text + (" ✕" if div[i, j] else ""), ha="center", va="center", fontsize=8,
                        color="white" if not math.isnan(grid[i, j]) and grid[i, j] < (vmin + vmax) / 2 else "black")
        ax.set_xticks(range(len(rhos)), ["—" if r is None else f"{r:g}" for r in rhos])
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_xlabel("ρ")
        ax.set_ylabel("lr")
        ax.set_title(_label(name) + "".join(f"  {a} {v:g}" for a, v in panel[1:]))
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9, pad=0.01)
    fig.suptitle(title)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def training_curves(run_root: Path, best: dict[str, tuple], rows: list[dict[str, Any]], path: Path,
                    score: str = SCORE) -> Path:
    """Training loss and the validation ``score`` over steps for each optimizer's best configuration (all seeds)."""
    plt = pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, key in best.items():
        color = _color(name)
        for i, r in enumerate(r for r in rows if config_key(r) == key):
            records = run_dir.read_metrics(run_root / r["run"])
            train = [m for m in records if m.get("kind") == "train"]
            val = [m for m in records if m.get("kind") == "val"]
            label = _label(name) if i == 0 else None
            if train:
                steps = np.array([m["step"] for m in train])
                loss = np.array([cell_number(m.get("loss")) for m in train])
                window = min(10, len(loss))
                smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
                ax_loss.plot(steps[window - 1:], smooth, color=color, alpha=0.8, label=label)
            if val:
                ax_val.plot([m["step"] for m in val], [cell_number(m.get(score)) for m in val], "o-", ms=3,
                            color=color, alpha=0.8, label=label)
    ax_loss.set(xlabel="step", ylabel="training loss (10-step mean)", title="training loss")
    label = SCORES.get(score, score)
    ax_val.set(xlabel="step", ylabel=f"validation {label}", title=f"validation {label}")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("best configuration of each optimizer")
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def bar_chart(summary: list[dict[str, Any]], path: Path, score: str = SCORE) -> Path:
    """The test ``score`` and mutual-k-NN of each optimizer's best configuration, mean ± std over seeds."""
    plt = pyplot()
    names = [s["optimizer"] for s in summary]
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 1.4 * len(names)), 4.2), layout="constrained")
    x = np.arange(len(names))
    for ax, metric, label in ((axes[0], score, f"test {SCORES.get(score, score)}"),
                              (axes[1], "mutual_knn", "test mutual-k-NN")):
        means = [s[f"{metric}_mean"] for s in summary]
        stds = [s[f"{metric}_std"] for s in summary]
        ax.bar(x, means, yerr=stds, capsize=4, color=[_color(n, "#333333") for n in names])
        ax.set_xticks(x, [_label(n).replace(" ", "\n") for n in names])  # "Fisher SAM" on two lines: no overlap
        finite = [m for m in means if not math.isnan(m)]
        if finite:
            lo = min(finite)
            ax.set_ylim(max(0.0, lo - 0.1 * (max(finite) - lo + 1e-3) - 0.02), None)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("best configuration per optimizer (error bars: std over seeds)")
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def sharpness_scatter(rows: list[dict[str, Any]], path: Path, score: str = SCORE) -> Path | None:
    """Sharpness of each finished run's best head against its test ``score``."""
    column = next((c for c in ("sharpness_hessian_top_eigenvalue", "sharpness_top_eigenvalue",
                               "sharpness_worst_case_ascent", "sharpness_worst_case_first_order")
                   if any(cell_number(r.get(c)) == cell_number(r.get(c)) for r in rows)), None)
    if column is None:
        column = next((c for c in rows[0] if c.startswith("sharpness_")), None) if rows else None
    if column is None:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        rs = [r for r in rows if r["optimizer"] == name and r["status"] == "ok"]
        ax.scatter([cell_number(r.get(column)) for r in rs], [cell_number(r.get(f"best_test_{score}")) for r in rs],
                   s=18, alpha=0.75, color=_color(name), label=_label(name))
    ax.set_xscale("symlog")
    ax.set(xlabel=column.removeprefix("sharpness_").replace("_", " "), ylabel=f"test {SCORES.get(score, score)}",
           title=f"flatness vs {SCORES.get(score, score)} (finished runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def study_plots(rows: list[dict[str, Any]], summary: list[dict[str, Any]], out_dir: Path, run_root: Path,
                best: dict[str, tuple], score: str = SCORE) -> dict[str, Path]:
    """Every study plot → {title: path} (``score``: the study's headline metric)."""
    label = SCORES.get(score, score)
    figures = {
        "Test mean R@1 over ρ × lr": heatmaps(rows, "best_test_mean_R@1", "test mean R@1 (seed mean)",
                                             out_dir / "heatmap_recall.png"),
        "Test mutual-k-NN over ρ × lr": heatmaps(rows, "best_test_mutual_knn", "test mutual-k-NN (seed mean)",
                                                out_dir / "heatmap_mutual_knn.png"),
    }
    if score != SCORE:
        figures = {f"Test {label} over ρ × lr": heatmaps(rows, f"best_test_{score}", f"test {label} (seed mean)",
                                                         out_dir / f"heatmap_{score}.png"), **figures}
    figures.update({
        "Training curves": training_curves(run_root, best, rows, out_dir / "training_curves.png", score),
        "Best configuration per optimizer": bar_chart(summary, out_dir / "best_per_optimizer.png", score),
    })
    scatter = sharpness_scatter(rows, out_dir / "sharpness_vs_recall.png", score)
    if scatter is not None:
        figures["Sharpness vs test recall"] = scatter
    return figures
