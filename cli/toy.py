"""`align toy [banana|sinc|paraboloid|stability|grid|all]`: the paper's 2-D experiments (PNG + JSON + a table)."""
from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from align.cli.common import console, user_errors
from align.common.errors import AlignError
from align.common.files import require_writable
from align.common.paths import toy_dir


class Experiment(str, Enum):
    banana = "banana"
    sinc = "sinc"
    paraboloid = "paraboloid"
    stability = "stability"
    grid = "grid"
    all = "all"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _print_table(result: Any, seconds: float, paths: list[Path]) -> None:
    alpha = result.settings.get("msam_alpha")
    knob = "" if alpha is None or alpha == 1.0 else f", M-SAM with α = {alpha:g}"
    table = Table(title=f"{result.name}  ({seconds:.1f} s{knob})", title_justify="left")
    columns = list(result.summary[0])
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in result.summary:
        table.add_row(*(_fmt(row[c]) for c in columns))
    console.print(table)
    console.print("  wrote " + ", ".join(str(p) for p in paths), highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("toy")
    @user_errors
    def toy(
        experiment: Experiment = typer.Argument(Experiment.all, help="Which figure of the paper to reproduce."),
        out: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNG and JSON files (default: "
                                                          "$ALIGN_HOME/toy, else data/toy)."),
        max_steps: int = typer.Option(500, "--max-steps", min=1, help="grid: step cap per run (Fig. 5)."),
        sinc_half_width: float = typer.Option(
            1.0, "--sinc-half-width", min=0.0,
            help="sinc: starts uniform in [-h, h]^2 (see the sinc JSON settings for why 1.0)."),
        seed: int = typer.Option(0, "--seed", help="sinc: seed of the random starts."),
        alpha: Optional[float] = typer.Option(
            None, "--alpha", min=0.0,
            help="banana, grid: M-SAM's metric scale α, G = I + α² g gᵀ (0 = SAM, 1 = the paper's M-SAM, default)."),
        rescale: Optional[list[float]] = typer.Option(
            None, "--rescale", metavar="C",
            help="banana: run in coordinates θ1 = c·φ1, θ2 = φ2/c for each c given (repeat it; c = 1 is added) and "
                 "draw every method's paths in θ-space (banana_rescale.png)."),
    ) -> None:
        """Reproduce the paper's 2-D experiments (Figures 1-5) with the real optimizer classes."""
        from align.toy.experiments import EXPERIMENTS, run_experiment  # loads torch: not for --help
        from align.toy.plots import write_outputs

        if alpha is not None and experiment.value not in ("banana", "grid", "all"):
            raise AlignError(f"--alpha applies to banana and grid (M-SAM's metric scale), not {experiment.value}")
        if rescale and experiment is not Experiment.banana:
            raise AlignError(f"--rescale applies to banana only (align toy banana --rescale C), not {experiment.value}")
        if rescale and not all(0 < c < float("inf") for c in rescale):
            raise AlignError(f"--rescale takes finite numbers > 0, got {', '.join(f'{c:g}' for c in rescale)}")
        out = require_writable(toy_dir() if out is None else out, "toy output folder",
                               "use --out DIR, or set ALIGN_HOME")  # before the experiments run
        names = EXPERIMENTS if experiment is Experiment.all else (experiment.value,)
        options = {"grid": {"max_steps": max_steps, "alpha": alpha}, "banana": {"alpha": alpha},
                   "sinc": {"half_width": sinc_half_width, "seed": seed}}
        if rescale:  # the banana run under the reparameterization instead
            names, options["banana_rescale"] = ("banana_rescale",), {"alpha": alpha, "scales": rescale}
        for name in names:
            start = time.perf_counter()
            with console.status(f"running {name} ..."):
                result = run_experiment(name, **options.get(name, {}))
                paths = write_outputs(result, out)
            _print_table(result, time.perf_counter() - start, paths)
