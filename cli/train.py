"""`align train --config FILE|NAME [--set key.sub=value ...] [--resume] [--out DIR]`, alone or under
`torchrun --nproc-per-node N --no-python align train ...` (data-parallel; rank 0 writes and reports)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import typer
from rich.table import Table

from align.cli.common import REPORT_HELP, console, err_console, joined, report_override, user_errors
from align.common.config import load_config, parse_override
from align.common.config_files import resolve_config

TABLE_COLUMNS = {"best_val": "best val", "best_test": "best test", "final_test": "final test"}  # results' sections
SHARPNESS_FIGURES = (("first-order", "worst_case_first_order"), ("ascent", "worst_case_ascent"),
                     ("λ_max", "hessian_top_eigenvalue"), ("tr(H)", "hessian_trace"))  # printed after the table

# what each rank still alive says when a rank of a torchrun job dies
RESUME = "finished checkpoints are kept: run the same command with --resume"

def figure_text(value: Any, spec: str) -> str:
    """A figure as ``format(value, spec)``; None (a value that was not measured, or not finite) and NaN as —."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def print_results(results: dict[str, Any], title: str, ks: Sequence[int] = (1, 5, 10)) -> None:
    """The headline figures of a results dict as a rich table: every metric of the registry
    (``align.metrics.measure.metric_names`` at recall cut-offs ``ks``, the run's eval.ks) that the run measured,
    but the rank statistics (counts, not fractions: they stay in results.json)."""
    from align.metrics.measure import RANK_KEYS, metric_names  # loads torch: not for --help

    console.print(f"[bold]{title}[/]", highlight=False)
    table = Table(show_header=True, header_style="bold")
    table.add_column("metric")
    for column in TABLE_COLUMNS.values():
        table.add_column(column, justify="right")
    sections = [results.get(s) or {} for s in TABLE_COLUMNS]
    for key in [k for k in metric_names(ks) if k not in RANK_KEYS and any(k in s for s in sections)]:
        table.add_row(key, *(figure_text(s.get(key), ".4f") for s in sections))
    console.print(table)
    sharp = (results.get("sharpness") or {}).get("best")
    if sharp:  # a figure the measurement could not give (non-finite: stored as null) prints as —
        figures = ", ".join(f"{label} {figure_text(sharp.get(key), '.4g')}" for label, key in SHARPNESS_FIGURES)
        console.print(f"sharpness of the best head (ρ={figure_text(sharp.get('rho'), 'g')}): {figures}",
                      highlight=False)
    console.print(f"status {results['status']}, steps {results['steps_done']}, best step {results['best_step']}, "
                  f"final loss {figure_text(results.get('final_loss'), '.4f')}, "
                  f"{figure_text(results.get('wall_time_s'), '.1f')} s", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `align train`."""

    @app.command("train")
    @user_errors
    def train_command(
        config: str = typer.Option(..., "--config", "-c", metavar="FILE|NAME",
                                   help="Training config YAML: a path or a packaged train/ name (`align configs`)."),
        overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value: key.sub=value."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint (with "
                                    "--config RUN/config.yaml: the run in RUN, wherever it is)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run directory, relative to this folder (default: "
                                           "a run's own folder for its RUN/config.yaml, else out_dir of the config, "
                                           "under $ALIGN_HOME (else data/) when relative, else "
                                           "$ALIGN_HOME/runs/<config name>)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
        report_to: Optional[str] = typer.Option(None, "--report-to", metavar="LIST", help=REPORT_HELP),
    ) -> None:
        """Train an alignment head on cached embeddings; writes config.yaml, metrics.jsonl, checkpoints/, results.json."""
        from align.train.config import TrainConfig  # loads torch: not for --help
        from align.train.loop import train
        from align.train.run_dir import locate_run

        path = resolve_config(config, ("train",))
        cfg = load_config(TrainConfig, path, [*(overrides or []), *report_override(report_to)])
        out_dir_set = any(parse_override(text)[0] == ["out_dir"] for text in overrides or [])
        with joined(cfg.device, RESUME) as me:  # under torchrun the ranks train the run data-parallel; rank 0 writes it
            where = locate_run(path, cfg.out_dir, out=out, out_dir_set=out_dir_set, resume=resume)
            run_dir = where.path
            cfg = cfg.model_copy(update={"out_dir": where.out_dir})
            results = train(cfg, run_dir, resume=resume, log=lambda m: err_console.print(m, highlight=False),
                            progress=progress)
        if not me.is_main:
            return  # rank 0 reports for the job
        print_results(results, f"{run_dir}", cfg.eval.ks)
        if results["status"] == "diverged":
            err_console.print(f"[bold yellow]diverged[/] at step {results['diverged_at']}: {results['diverge_reason']}",
                              highlight=False)
        console.print(f"results: {run_dir / 'results.json'}", highlight=False)
