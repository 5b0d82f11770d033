"""`align compare`: the optimizer study (grid × seeds), its tables, plots and report.

Under `torchrun --nproc-per-node N --no-python align compare ...` the N ranks share the study's packs of cells."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich import box
from rich.table import Table

from align.cli.common import REPORT_HELP, console, joined, rank_log, report_override, user_errors
from align.common.config import load_config, parse_override
from align.common.config_files import packaged_config, resolve_config
from align.common.errors import AlignError

CONFIG_HELP = "study YAML: a path or a packaged name (`align configs`); default: the embedded offline study"

# what each rank still alive says when a rank of a torchrun job dies
RESUME = "finished cells are kept: run the same command again to resume"

def _print_tables(result: dict[str, Any], reference: str, score: str = "mean_R@1") -> None:
    """The summary, the comparison with the reference and robustness, each narrow enough for 80 columns."""
    from align.study.report import (AXIS_LABELS, diff_text, far_from_normal, hp_text, offers_sign_flip, p_text,
                                    score_label, seed_noise_note, summary_columns)  # loads torch: not for --help
    from align.study.stats import METHOD_AXES  # loads torch: not for --help

    summary = result["summary"]
    axes = [a for a in METHOD_AXES if any(s.get(a) is not None for s in summary)]
    seeds = max((s["seeds"] for s in summary), default=0)
    table = Table(title=f"Best configuration per optimizer (test, mean ± std over {seeds} seeds)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    columns = summary_columns(summary, score, terminal=True)
    for col in ("optimizer", "lr", "ρ", *(AXIS_LABELS[a] for a in axes), *(head for head, _ in columns)):
        table.add_column(col, justify="left" if col == "optimizer" else "right", no_wrap=True)
    versus = Table(title=f"Δ test {score_label(score)} vs {reference} (points, paired by seed; 95% Student-t "
                         "interval; verdict: paired t-test, Holm-adjusted)", box=box.SIMPLE_HEAD, pad_edge=False)
    versus.add_column("optimizer", no_wrap=True)
    versus.add_column("Δ [95% CI] (n)", justify="right", no_wrap=True)
    versus.add_column("verdict")
    flip = offers_sign_flip(summary)
    if flip:
        versus.add_column("sign-flip p (Holm)", justify="right")
    for s in summary:
        name = s["optimizer"] + (f" ({s['diverged_seeds']} div)" if s["diverged_seeds"] else "")
        table.add_row(name, hp_text(s["lr"]), hp_text(s["rho"]), *(hp_text(s.get(a)) for a in axes),
                      *(cell(s) for _, cell in columns))
        versus.add_row(s["optimizer"], diff_text(s), s.get("verdict") or "—",
                       *([p_text(s.get("p_sign_flip_holm"))] if flip else []))
    console.print(table)
    console.print(versus)
    if far_from_normal(summary):  # the intervals above do not keep their level: say so here too
        console.print(seed_noise_note(summary, reference)[0].replace("`", ""), highlight=False)
    _print_robustness(result["robustness"], axes, score_label(score))


def _print_robustness(robustness: list[dict[str, Any]], axes: list[str], label: str = "mean R@1") -> None:
    """Best, worst and the share within 95% of the best, judged on validation; test means beside, labelled; then
    the configurations with a diverged seed and the collapsed runs (report.md says what collapsed means)."""
    from align.study.report import AXIS_LABELS, collapsed_text, hp_text, pct_text, share_text  # loads torch: not for --help

    rob = Table(title=f"Robustness on VALIDATION {label} %: share of configs within 95% of the best, the best and "
                      "the worst (test: the same configs' test means); div: configs with a diverged seed; coll: "
                      "collapsed runs (on the uniform loss, see report.md)", box=box.SIMPLE_HEAD, pad_edge=False)
    where = ", ".join(["lr", "ρ", *(AXIS_LABELS[a] for a in axes)])
    for col in ("optimizer", "cfgs", "≥95%", "best", "test", f"worst ({where})", "test", "div", "coll"):
        rob.add_column(col, justify="left" if col == "optimizer" else "right", no_wrap=not col.startswith("worst"))
    for r in robustness:
        worst = ", ".join([hp_text(r["worst_lr"]), hp_text(r["worst_rho"]),
                           *(hp_text(r.get(f"worst_{a}")) for a in axes)])
        rob.add_row(r["optimizer"], str(r["configs"]), share_text(r["within_95pct_val"]),
                    pct_text(r["best_val"]), pct_text(r["best_test"]), f"{pct_text(r['worst_val'])} ({worst})",
                    pct_text(r["worst_test"]), str(r["diverged_configs"]),
                    collapsed_text(r.get("collapsed_runs"), r.get("collapse_measured", 0)))
    console.print(rob)


def _whole_number(text: str, option: str) -> int:
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
        workers: Optional[int] = typer.Option(None, "--workers", help="packs trained at once, in parallel processes (default: from the config; per rank under torchrun)"),
        pack: str = typer.Option("auto", "--pack", metavar="auto|N", help="heads trained as one computation: auto (as many as the memory budget holds) or N; 1: one cell at a time"),
        memory_budget: Optional[str] = typer.Option(None, "--memory-budget", metavar="SIZE", help="memory the packs may take, e.g. 8G (default: 80% of free GPU memory, else half the free RAM)"),
        out: Optional[Path] = typer.Option(None, "--out", help="study folder, relative to this folder (default: a study's own folder for its STUDY/config.yaml, else study_dir of the config, under $ALIGN_HOME (else data/) when relative, else $ALIGN_HOME/studies/<name>)"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
        report_to: Optional[str] = typer.Option(None, "--report-to", metavar="LIST", help=REPORT_HELP + " Each "
                                                "cell is its own tracker run, grouped by the study; tensorboard also "
                                                "writes the summary table to STUDY/hparams/ (HParams view)."),
    ) -> None:
        """Compare optimizers over a grid of ρ × learning rate (× method axes) × seeds on one cached embedding set."""
        from align.study.compare import check_study, plan, run_compare  # loads torch: not for --help
        from align.study.config import CompareConfig
        from align.study.studies import locate_study

        path = resolve_config(config, ("compare",)) if config is not None else packaged_config("compare", "default")
        if path is None:
            raise AlignError("the embedded default config compare/default is missing from this install: "
                             "pass --config FILE")
        overrides = [*set_, *report_override(report_to)]
        if workers is not None:
            overrides.append(f"workers={workers}")
        if out is not None:  # where the command is typed, as every path option (a config's study_dir: the data root)
            overrides.append(f"study_dir={out.expanduser().absolute()}")
        cfg = load_config(CompareConfig, path, overrides)
        chosen = out is not None or any(parse_override(text)[0] == ["study_dir"] for text in set_)
        packs = pack if pack == "auto" else _whole_number(pack, "--pack")
        check_study(cfg, packs, memory_budget)  # every check before the work, --dry-run included
        if dry_run:
            console.print_json(json.dumps(plan(locate_study(path, cfg, chosen))))
            return
        with joined(cfg.device, RESUME) as me:  # under torchrun the ranks share the cells; rank 0 writes and reports
            cfg = locate_study(path, cfg, chosen)
            result = run_compare(cfg, log=rank_log(me), progress=progress and me.is_main, pack=packs,
                                 memory_budget=memory_budget)
        if not me.is_main:
            return
        root = result["study_dir"]
        _print_tables(result, cfg.reference, cfg.score)
        console.print(f"wrote {root / 'results.csv'}, {root / 'report.md'} and {len(result['figures'])} plots in {root}")
