"""Evaluation figures (PNG): zero-shot confusion matrices and the retrieval gallery (edge: writes files)."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from align.common.figures import pyplot, save_figure


def _confusion_axes(ax: Any, confusion: np.ndarray, classes: list[str], title: str) -> Any:
    """One confusion matrix drawn as row-normalised shares (row = true class), with the counts written in."""
    counts = np.asarray(confusion, dtype=float)
    support = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    if len(classes) <= 20:  # the numbers stay legible up to here
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=90 if max(map(len, classes), default=0) > 2 else 0, fontsize=7)
    ax.set_yticks(ticks, classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return im


def confusion_figure(path: Path, confusion: Any, classes: list[str], title: str) -> Path:
    """A zero-shot confusion matrix (C, C) as a PNG: share of each true class (row) per prediction."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6), layout="constrained")
    im = _confusion_axes(ax, np.asarray(confusion), classes, title)
    fig.colorbar(im, ax=ax, shrink=0.85, label="share of the true class")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out = save_figure(fig, Path(path))
    plt.close(fig)
    return out


def confusion_grid(path: Path, panels: dict[str, Any], classes: list[str], title: str, per_row: int = 3) -> Path:
    """Several confusion matrices side by side ({panel title: (C, C) counts}), e.g. one per optimizer."""
    plt = pyplot()
    ncols = max(1, min(per_row, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.9 * ncols, 3.7 * nrows), squeeze=False, layout="constrained")
    im = None
    for ax, (name, confusion) in zip(axes.flat, panels.items()):
        im = _confusion_axes(ax, np.asarray(confusion), classes, name)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, label="share of the true class")
    fig.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out = save_figure(fig, Path(path))
    plt.close(fig)
    return out


def gallery_figure(path: Path, queries: list[dict[str, Any]], title: str) -> Path:
    """A retrieval gallery: one row per caption query, its top-k images with their cosine scores.

    ``queries``: [{"text": caption, "hits": [{"image": PIL image, "score": float, "own": bool, "label": str}]}];
    a green frame marks the query's own image, a blue one an image of the same class (labelled sets)."""
    plt = pyplot()
    k = max(len(q["hits"]) for q in queries)
    fig, axes = plt.subplots(len(queries), k, figsize=(2.0 * k, 2.35 * len(queries)), squeeze=False,
                             layout="constrained")
    for row, query in zip(axes, queries):
        for ax, hit in zip(row, query["hits"]):
            ax.imshow(np.asarray(hit["image"].convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "#1a9641" if hit["own"] else "#2c7bb6" if hit.get("same_class") else "#bbbbbb"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4 if hit["own"] or hit.get("same_class") else 1)
            ax.set_title(f"{hit['score']:.3f}" + (f"  {hit['label']}" if hit.get("label") else ""), fontsize=8)
        for ax in row[len(query["hits"]):]:
            ax.set_visible(False)
        text = textwrap.shorten(query["text"], 90, placeholder="...")
        row[0].set_ylabel(textwrap.fill(text, 26), fontsize=8, rotation=0, ha="right", va="center", labelpad=8)
    fig.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out = save_figure(fig, Path(path))
    plt.close(fig)
    return out
