"""report.md's Invariance section (edge: reads the runs' best heads and the test split): the tables of
``align.study.invariance`` and the cosine distances between the test embeddings of heads trained at c and at 1."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from align.cache.read import load_cached_split
from align.common.errors import AlignError
from align.study import invariance
from align.train import run_dir
from align.train.heads import build_model


def invariance_section(cfg: Any, rows: list[dict[str, Any]], run_root: Path, score: str, label: str,
                       config_text: Callable[[tuple], str]) -> list[str]:
    """report.md's Invariance section (``align.study.invariance``) when the grid has rescales, else nothing: the
    headline ``score`` (named ``label``) of each optimizer's best configuration (named by ``config_text``)."""
    if not invariance.has_rescales(rows):
        return []
    entries = invariance.invariance_entries(rows, score)
    _tower_distances(cfg, run_root, entries)
    return ["## Invariance under function-preserving rescalings of the head", "",
            f"`head.rescale: c` ({cfg.head.kind} head): "
            + ("W1 → c·W1, b1 → c·b1, W2 → W2/c at initialisation (ReLU), "
               if cfg.head.kind == "mlp" else "W = c·V with V trained, initialised at W₀/c, ")
            + "the same function in other coordinates. Each optimizer's best configuration is chosen at c = 1 on "
            f"validation and trained at every c ∈ {{{', '.join(f'{c:g}' for c in cfg.grid.rescales)}}} with the same "
            f"seeds ({len(rows) - len(invariance.at_unit_scale(rows))} runs at c ≠ 1 besides the grid's). Test "
            f"{label}: mean ± std over seeds; Δ: the difference to c = 1 paired by seed, its Student-t 95% interval "
            "and the paired t-test's p, Holm-adjusted over every optimizer and c. Cosine distance: the mean of 1 − "
            "cos between the test-split embeddings of the heads trained at c and at 1 (same seed, best checkpoints), "
            "per tower, averaged over seeds. Sharpness: first-order worst-case loss increase of the best head at "
            f"ρ = {cfg.eval.sharpness_rho:g} in each ball (mean over seeds).", "",
            *invariance.invariance_lines(entries, label, config_text), ""]


def _tower_distances(cfg: Any, run_root: Path, entries: list[dict[str, Any]]) -> None:
    """Each level's mean cosine distance between the test embeddings of its heads and those at c = 1, per tower,
    averaged over the seeds both trained (``distances`` of the level, in place; left out without a test split)."""
    split = cfg.eval.test_split
    if not split:
        return
    test = load_cached_split(cfg.data, split)
    rows = (test.image.to_tensor(), test.text.to_tensor())
    for e in entries:
        plain_runs = next(lv for lv in e["levels"] if lv["c"] == 1.0)["runs"]
        plain = {seed: _features(cfg, 1.0, run_root / run, rows) for seed, run in plain_runs.items()}  # once per seed
        for lv in e["levels"]:
            if lv["c"] == 1.0:
                continue
            found = [_cosine_distances(_features(cfg, lv["c"], run_root / run, rows), plain[seed])
                     for seed, run in lv["runs"].items() if seed in plain]
            found = [d for d in found if d is not None]
            if found:
                lv["distances"] = {tower: float(np.mean([d[tower] for d in found])) for tower in ("image", "text")}


def _features(cfg: Any, c: float, run: Path, rows: tuple[Any, Any]) -> tuple[Any, Any] | None:
    """(image, text) test features of a run's best head trained at head.rescale c (None: it has none, e.g. a
    diverged run)."""
    try:
        state, _ = run_dir.load_head(run, "best")
    except AlignError:
        return None
    model = build_model(cfg.head.model_copy(update={"rescale": c}), cfg.loss, rows[0].shape[1], rows[1].shape[1])
    model.load_state_dict(state)
    with torch.no_grad():
        return model.encode_image(rows[0]), model.encode_text(rows[1])


def _cosine_distances(first: tuple[Any, Any] | None, second: tuple[Any, Any] | None) -> dict[str, float] | None:
    """Mean 1 − cos between two heads' features, per tower."""
    if first is None or second is None:
        return None
    return {tower: float(1 - (a * b).sum(-1).mean()) for tower, a, b in zip(("image", "text"), first, second)}
