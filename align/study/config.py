"""A study's configuration (orchestration): the grid (optimizers × lr × ρ × method axes × head rescalings × seeds),
checked at load, its cells and each cell's training config.
"""
from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ValidationError, field_validator, model_validator

from align.cache.key import EmbedConfig
from align.common.config import MAX_SEED, Integer, Number, StrictModel
from align.common.paths import relative_to_data_root
from align.data.datasets import LABELLED_KINDS
from align.optim.registry import DEFAULT_GRID, METHOD_AXES, METHOD_HPARAMS, OPTIMIZERS, optimizer_info
from align.study.cells import Cell
from align.train.config import OptimConfig, TrainConfig
from align.train.heads import HeadConfig


class GridConfig(StrictModel):
    """What varies across cells. Single-pass optimizers (sgd, adam, adamw) have no ρ and run once per lr.

    ``method_axes`` sweeps a method's own hyper-parameters besides lr × ρ, per optimizer, e.g.
    ``{fsam: {eta: [1000, 10000]}, msam: {alpha: [0.5, 1, 2], metric_beta: [0, 0.9]}}``: every combination of
    the listed values is crossed with that optimizer's lr × ρ × seeds. Which parameters a method can sweep is the
    registry's (``align.optim.registry``: its hyper-parameters marked as grid axes).
    """

    optimizers: list[str] = list(DEFAULT_GRID)
    lrs: list[Number] = [1e-3]
    rhos: list[Number] = [0.05]
    seeds: list[Integer] = [0, 1]
    lr_overrides: dict[str, list[Number]] = {}   # per optimizer, e.g. sgd: [0.1, 0.3]
    rho_overrides: dict[str, list[Number]] = {}  # per optimizer, e.g. asam: [0.5, 1.0] (ASAM's ρ lives on another scale)
    method_axes: dict[str, dict[str, list[Number]]] = {}  # per optimizer: one of its grid axes → values
    # head.rescale values (align.train.heads) every configuration runs at, for the report's Invariance section;
    # [1]: the plain head only (no axis). Each optimizer's best configuration is chosen at c = 1.
    rescales: list[Number] = [1.0]

    @field_validator("optimizers")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for name in value:
            optimizer_info(name)
        if not value or len(set(value)) != len(value):
            raise ValueError("optimizers must be a non-empty list without repeats")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "GridConfig":
        for key in [*self.lr_overrides, *self.rho_overrides]:
            if key not in OPTIMIZERS:
                raise ValueError(f"override for unknown optimizer {key!r}; choose one of {', '.join(OPTIMIZERS)}")
        self._nothing_ignored()
        lr_lists = {"lrs": self.lrs, **{f"lr_overrides.{k}": v for k, v in self.lr_overrides.items()}}
        rho_lists = {"rhos": self.rhos, **{f"rho_overrides.{k}": v for k, v in self.rho_overrides.items()}}
        for where, values in {**lr_lists, **rho_lists, "seeds": self.seeds}.items():
            _check_axis(where, values, positive=where in lr_lists, integer=where == "seeds")
        _check_method_axes(self.method_axes)
        _check_axis("rescales", self.rescales, positive=True, integer=False)
        if 1.0 not in self.rescales:
            raise ValueError(f"rescales {self.rescales} must include 1: each optimizer's best configuration is chosen "
                             "at c = 1 and the others are compared with it")
        return self

    @property
    def rescale_axis(self) -> list[float | None]:
        """The cells' head.rescale values: [None] (the plain head, no axis) unless rescales has more than 1."""
        return [None] if self.rescales == [1.0] else [float(c) for c in self.rescales]

    def _nothing_ignored(self) -> None:
        """Refuse an override or a method axis that no cell would use: one for an optimizer outside the grid (its
        cells are not trained; the plan would still echo it), or a ρ override for a single-pass optimizer."""
        sections = {"lr_overrides": self.lr_overrides, "rho_overrides": self.rho_overrides,
                    "method_axes": self.method_axes}
        outside = [f"{section}.{name}" for section, entries in sections.items() for name in entries
                   if name in OPTIMIZERS and name not in self.optimizers]
        if outside:
            raise ValueError(f"{', '.join(outside)}: not in grid.optimizers ({', '.join(self.optimizers)}), so "
                             f"ignored: add them there or remove them (--set grid.{outside[0].split('.')[0]}={{}} "
                             "empties a section)")
        for name in self.rho_overrides:
            if name in OPTIMIZERS and not optimizer_info(name).two_pass:
                raise ValueError(f"rho_overrides.{name}: {name} takes one pass per step and has no ρ, so it would be "
                                 "ignored: remove the entry")


def _check_method_axes(axes: dict[str, dict[str, list[Any]]]) -> None:
    """Each method axis: a known optimizer, a sweepable parameter it has, values valid for it (``OptimConfig``)."""
    for name, spec in axes.items():
        if name not in OPTIMIZERS:
            raise ValueError(f"method_axes: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
        own = [k for k in METHOD_AXES if (h := optimizer_info(name).hparam(k)) is not None and h.axis]
        if not spec:
            raise ValueError(f"method_axes.{name} names no parameter")
        for param, values in spec.items():
            where = f"method_axes.{name}.{param}"
            if param not in own:
                has = f"it has {', '.join(own)}" if own else "it has none (lr and ρ are swept by lrs and rhos)"
                raise ValueError(f"{where}: {name} has no parameter {param!r} to sweep; {has}")
            _check_axis(where, values, positive=False, integer=optimizer_info(name).hparam(param).integer)
            for v in values:
                try:
                    OptimConfig(name=name, **{param: v})
                except ValidationError as err:
                    raise ValueError(f"{where}: {v!r}: {err.errors()[0]['msg']}") from None


def _check_axis(where: str, values: list[Any], positive: bool, integer: bool) -> None:
    """A grid axis: non-empty, numbers (no booleans), finite, in range and without repeats (a repeat is two
    workers on one cell and a duplicate row)."""
    if not values:
        raise ValueError(f"{where} must not be empty")
    for v in values:
        if isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{where}: {v!r} is not a finite number")
        if integer and not 0 <= v < MAX_SEED:
            raise ValueError(f"{where}: seed {v} is outside [0, 2^63)")
        if (positive and not v > 0) or v < 0:
            raise ValueError(f"{where}: {v!r} must be {'> 0' if positive else '>= 0'}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where} repeats a value: {values}")


class CompareConfig(TrainConfig):
    """A study: every training setting of ``TrainConfig`` (shared by all cells) plus the grid."""

    name: str = "study"  # a plain folder name: letters, digits, '.', '_', '-'
    study_dir: str | None = None  # default: <data root>/studies/<name>
    workers: Integer | Literal["auto"] = "auto"  # cells trained at once (processes); auto: fits the cores, 1 on GPU
    reference: str = "sam"  # the optimizer every other one is compared with (paired t, Holm-adjusted)
    # Unused: the summary's intervals are Student-t now. Still accepted because every study's saved config.yaml
    # (written before) has it, and `align compare --config <study>/config.yaml` must keep loading those.
    bootstrap_samples: Integer | None = None
    # The headline metric: it picks each optimizer's best configuration (validation) and is compared with the
    # reference (test). zeroshot_top1 needs a labelled set (mnist), whose captions only name the class.
    score: Literal["mean_R@1", "zeroshot_top1"] = "mean_R@1"
    beside: str | None = None  # another study ranked beside this one: its name, or its folder as a path (with a /)
    grid: GridConfig = GridConfig()
    RESOLVES_BETAS: ClassVar[bool] = False  # unset optim.betas: each cell takes its own base's (Lion's differ)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(f"study name {value[:40]!r} must be a plain folder name (letters, digits, '.', '_', "
                             "'-'; no '/'): it names <data root>/studies/<name>")
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError(f"workers must be auto or a whole number >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _reference_in_grid(self) -> "CompareConfig":
        if self.reference not in self.grid.optimizers:
            raise ValueError(f"reference {self.reference!r} is not among grid.optimizers {self.grid.optimizers}")
        if (self.score.startswith("zeroshot") and isinstance(self.data, EmbedConfig)  # caches: from their manifests
                and self.data.dataset.kind not in LABELLED_KINDS):
            raise ValueError(f"score {self.score} needs a labelled dataset ({', '.join(LABELLED_KINDS)}), not kind "
                             f"{self.data.dataset.kind!r}")
        self._cells_fit_their_methods()
        for c in self.grid.rescales:  # a head the rescaling would change is refused at load, in its own words
            HeadConfig.model_validate({**self.head.model_dump(), "rescale": c})
        return self

    def _cells_fit_their_methods(self) -> None:
        """Each cell's optimizer section is valid for its method (a shared key in its range, GSAM's ρ_min ≤ ρ of
        each cell, a local perturbation where implemented): at load, not when the cell's turn comes."""
        shared, seen = self.optim.model_dump(), set()
        for cell in grid_cells(self.grid):
            if cell.config_key in seen:
                continue
            seen.add(cell.config_key)
            try:
                OptimConfig.model_validate(cell_optim(shared, cell))
            except ValidationError as err:
                where = f"{cell.optimizer} at lr {cell.lr:g}" + ("" if cell.rho is None else f", rho {cell.rho:g}")
                raise ValueError(f"grid cell {where}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def grid_cells(grid: GridConfig) -> list[Cell]:
    """Every cell, in a fixed order (optimizer order as configured, then lr, ρ, method axes, rescaling, seed)."""
    cells = []
    for name in grid.optimizers:
        two_pass = optimizer_info(name).two_pass
        rhos: list[float | None] = list(grid.rho_overrides.get(name, grid.rhos)) if two_pass else [None]
        combos = _method_combos(grid.method_axes.get(name, {}))
        for lr in grid.lr_overrides.get(name, grid.lrs):
            for rho in rhos:
                for method in combos:
                    for c, seed in itertools.product(grid.rescale_axis, grid.seeds):
                        cells.append(Cell(name, float(lr), None if rho is None else float(rho), int(seed), method, c))
    return cells


def _method_combos(spec: dict[str, list[float]]) -> list[tuple[tuple[str, float], ...]]:
    """Every combination of one optimizer's method-axis values, axes in ``METHOD_AXES`` order ([()] for none)."""
    names = [a for a in METHOD_AXES if a in spec]
    return [tuple(zip(names, map(float, values))) for values in itertools.product(*(spec[a] for a in names))]


def cell_config(cfg: CompareConfig, cell: Cell, run_dir: Path) -> TrainConfig:
    """The training config of one cell: the study's shared settings with this cell's optimizer, lr, ρ, seed.

    Method hyper-parameters of the shared section that this cell's optimizer does not have (M-SAM's alpha in a
    SAM cell, η in an M-SAM cell) are dropped: a study sets them once for the methods that take them. The cell's
    method-axis values override the shared ones.
    """
    shared = cfg.model_dump(exclude={"name", "study_dir", "workers", "reference", "bootstrap_samples", "score",
                                     "beside", "grid"})
    if cell.rescale is not None:
        shared["head"]["rescale"] = cell.rescale
    shared.update(optim=cell_optim(shared["optim"], cell), seed=cell.seed,
                  out_dir=relative_to_data_root(run_dir),  # as align train names it
                  report_group=cfg.report_group or cfg.name)  # a tracker groups the study's cells
    return TrainConfig.model_validate(shared)


def cell_optim(shared: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """A cell's ``optim:`` section from the study's shared one (a dict): its optimizer, lr, ρ and method-axis
    values, without the shared method keys its optimizer lacks."""
    own = optimizer_info(cell.optimizer).defaults
    optim = {k: v for k, v in shared.items() if k not in METHOD_HPARAMS or k in own}
    optim.update(name=cell.optimizer, lr=cell.lr, **dict(cell.method))
    if cell.rho is not None:
        optim["rho"] = cell.rho
    return optim


def cell_hparams(cfg: CompareConfig, cell: Cell) -> dict[str, Any]:
    """The method hyper-parameters a cell's run sets (the rest take its method's defaults)."""
    return OptimConfig.model_validate(cell_optim(cfg.optim.model_dump(), cell)).method_hparams()
