"""A cell of a study's grid (core): one run, named by its optimizer, lr, ρ, method-axis values, head rescaling and
seed. The grid
makes them (``align.study.config``), packing groups them, and the study folder keeps a run directory and a
results.csv row for each (``align.study.studies``).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    """One run of the grid. ``method`` holds its method-axis values as (name, value) in ``METHOD_AXES`` order."""

    optimizer: str
    lr: float
    rho: float | None
    seed: int
    method: tuple[tuple[str, float], ...] = ()
    rescale: float | None = None  # head.rescale from the grid's rescales axis; None: the grid has no such axis

    @property
    def key(self) -> str:
        """The run folder's name; without method axes the same as before they existed (old studies resume)."""
        rho = "" if self.rho is None else f"_rho{self.rho:g}"
        extra = "".join(f"_{name}{value:g}" for name, value in self.method)
        scale = "" if self.rescale in (None, 1.0) else f"_c{self.rescale:g}"  # c = 1: the plain run's folder
        return f"{self.optimizer}_lr{self.lr:g}{rho}{extra}{scale}_s{self.seed}"

    @property
    def config_key(self) -> tuple:
        """(optimizer, lr, ρ, *method): the configuration, seeds and rescalings aside (as ``study_stats.config_key``)."""
        return (self.optimizer, self.lr, self.rho, *self.method)
