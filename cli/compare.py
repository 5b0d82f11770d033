"""`align compare`: the optimizer study (grid × seeds), its tables, plots and report."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from align.cli.common import console, user_errors

CONFIG_HELP = "study YAML: a path or a packaged name (`align configs`); default: the embedded offline study"


def _pct(mean: float, std: float | None = None) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _print_tables(result: dict, reference: str) -> None:
    """The summary and robustness tables, compact enough for an 80-column terminal."""
    from rich import box
    from rich.table import Table

    def hp(value) -> str:
        return "—" if value is None else f"{value:g}"

    seeds = max((s["seeds"] for s in result["summary"]), default=0)
    table = Table(title=f"Best configuration per optimizer (test, mean ± std over {seeds} seeds)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("optimizer", "lr", "ρ", "mean R@1 %", "i2t", "t2i", "mkNN", f"Δ vs {reference} [CI]"):
        table.add_column(col, justify="left" if col == "optimizer" else "right", no_wrap=True)
    for s in result["summary"]:
        diff = "—" if math.isnan(s["diff_vs_ref"]) else (
            f"{100 * s['diff_vs_ref']:+.1f} [{100 * s['diff_ci_low']:+.1f},{100 * s['diff_ci_high']:+.1f}]")
        name = s["optimizer"] + (f" ({s['diverged_seeds']} div)" if s["diverged_seeds"] else "")
        table.add_row(name, hp(s["lr"]), hp(s["rho"]), _pct(s["mean_R@1_mean"], s["mean_R@1_std"]),
                      _pct(s["i2t_R@1_mean"]), _pct(s["t2i_R@1_mean"]), f"{s['mutual_knn_mean']:.3f}", diff)
    console.print(table)
    rob = Table(title="Robustness: grid configurations within 95% of each optimizer's best", box=box.SIMPLE_HEAD,
                pad_edge=False)
    for col in ("optimizer", "configs", "within 95%", "best %", "worst % (lr, ρ)", "diverged"):
        rob.add_column(col, justify="left" if col == "optimizer" else "right", no_wrap=True)
    for r in result["robustness"]:
        rob.add_row(r["optimizer"], str(r["configs"]), f"{100 * r['within_95pct']:.0f}%", _pct(r["best"]),
                    f"{_pct(r['worst'])} ({hp(r['worst_lr'])}, {hp(r['worst_rho'])})", str(r["diverged_configs"]))
    console.print(rob)


def _whole_number(text: str, option: str) -> int:
    from align.errors import AlignError

    try:
        return int(text)
    except ValueError:
        raise AlignError(f"{option} must be auto or a whole number >= 1, got {text[:40]!r}") from None


def register(app: typer.Typer) -> None:
    @app.command("compare")
    @user_errors
    def compare_cmd(
        config: Optional[str] = typer.Option(None, "--config", "-c", metavar="FILE|NAME", help=CONFIG_HELP),
        set_: list[str] = typer.Option([], "--set", help="override a key: --set grid.seeds=[0,1,2]"),
        dry_run: bool = typer.Option(False, "--dry-run", help="validate the config and print the plan; no download, no training"),
        workers: Optional[int] = typer.Option(None, "--workers", help="packs trained at once, in parallel processes (default: from the config)"),
        pack: str = typer.Option("auto", "--pack", metavar="auto|N", help="heads trained as one computation: auto (as many as the memory budget holds) or N; 1: one cell at a time"),
        memory_budget: Optional[str] = typer.Option(None, "--memory-budget", metavar="SIZE", help="memory the packs may take, e.g. 8G (default: 80% of free GPU memory, else half the free RAM)"),
        out: Optional[Path] = typer.Option(None, "--out", help="study folder (default: $ALIGN_HOME/studies/<name>, else data/studies/<name>)"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Compare optimizers over a grid of ρ × learning rate × seeds on one cached embedding set."""
        import json

        from align.compare import CompareConfig, plan, run_compare
        from align.config import load_config
        from align.config_files import packaged_config, resolve_config
        from align.errors import AlignError

        path = resolve_config(config, ("compare",)) if config is not None else packaged_config("compare", "default")
        if path is None:
            raise AlignError("the embedded default config compare/default is missing from this install: "
                             "pass --config FILE")
        overrides = list(set_)
        if workers is not None:
            overrides.append(f"workers={workers}")
        if out is not None:
            overrides.append(f"study_dir={out}")
        cfg = load_config(CompareConfig, path, overrides)
        if dry_run:
            console.print_json(json.dumps(plan(cfg)))
            return
        packs = pack if pack == "auto" else _whole_number(pack, "--pack")
        result = run_compare(cfg, log=lambda m: console.print(m, highlight=False), progress=progress, pack=packs,
                             memory_budget=memory_budget)
        root = result["study_dir"]
        _print_tables(result, cfg.reference)
        console.print(f"wrote {root / 'results.csv'}, {root / 'report.md'} and {len(result['figures'])} plots in {root}")
