"""The study's files: results.csv, the tables as CSV, the plots (PNG) and report.md that shows them all."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from align import runs, study_stats


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _hp(value: Any) -> str:
    """A hyper-parameter (lr, ρ) as written in configs: 0.003, 1e-05; None as —."""
    return "—" if value is None or value == "" else f"{float(value):g}"


def _pct(mean: float, std: float | None = None) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV (columns in first-seen order), written atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    runs.atomic_write_text(path, buf.getvalue())


def summary_lines(summary: list[dict[str, Any]], reference: str) -> list[str]:
    """The summary as a markdown table."""
    lines = [f"| optimizer | lr | ρ | seeds | test mean R@1 (%) | i2t R@1 | t2i R@1 | mutual-kNN | CKNNA | Δ vs {reference} (95% CI) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        diff = "—" if math.isnan(s["diff_vs_ref"]) else (
            f"{100 * s['diff_vs_ref']:+.1f} [{100 * s['diff_ci_low']:+.1f}, {100 * s['diff_ci_high']:+.1f}]")
        div = f" ({s['diverged_seeds']} diverged)" if s["diverged_seeds"] else ""
        lines.append(f"| {s['optimizer']} | {_hp(s['lr'])} | {_hp(s['rho'])} | {s['seeds']}{div} | "
                     f"{_pct(s['mean_R@1_mean'], s['mean_R@1_std'])} | {_pct(s['i2t_R@1_mean'])} | "
                     f"{_pct(s['t2i_R@1_mean'])} | {_fmt(s['mutual_knn_mean'])} ± {_fmt(s['mutual_knn_std'])} | "
                     f"{_fmt(s['cknna_mean'])} | {diff} |")
    return lines


def robustness_lines(rob: list[dict[str, Any]]) -> list[str]:
    lines = ["| optimizer | configs | within 95% of its best | best config's test mean R@1 | worst config (lr, ρ) | diverged configs |",
             "|---|---|---|---|---|---|"]
    for r in rob:
        lines.append(f"| {r['optimizer']} | {r['configs']} | {100 * r['within_95pct']:.0f}% | {_pct(r['best'])} | "
                     f"{_pct(r['worst'])} ({_hp(r['worst_lr'])}, {_hp(r['worst_rho'])}) | {r['diverged_configs']} |")
    return lines


def table3_lines(rows3: list[dict[str, Any]], loss_step: int) -> list[str]:
    """lr × ρ cells: best alignment / loss at step T / final loss, † for diverged seeds."""
    rhos = sorted({r["rho"] for r in rows3}, key=lambda x: -1 if x is None else x)
    lrs = sorted({r["lr"] for r in rows3})
    cell = {(r["lr"], r["rho"]): r for r in rows3}
    lines = ["| lr \\ ρ | " + " | ".join(_hp(r) for r in rhos) + " |", "|---" * (len(rhos) + 1) + "|"]
    for lr in lrs:
        parts = []
        for rho in rhos:
            r = cell.get((lr, rho))
            if r is None:
                parts.append("")
                continue
            mark = f" †{r['diverged']}/{r['seeds']}" if r["diverged"] else ""
            parts.append(f"{_fmt(r['best_alignment'])} / {_fmt(r['loss_at_step'])} / {_fmt(r['final_loss'])}{mark}")
        lines.append(f"| {_hp(lr)} | " + " | ".join(parts) + " |")
    return lines


def clear_temp_files(root: Path) -> list[Path]:
    """Remove the temporary files a killed study left in its folder (tables, report, plots); returns them.
    Only call it holding the study's lock: then no other process is writing them."""
    stale = [p for pattern in (".*.tmp", ".*.tmp.png") for p in Path(root).glob(pattern)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_study_config(root: Path, cfg: Any) -> Path:
    """The study's resolved config (an ``align.compare.CompareConfig``) as ROOT/config.yaml, headed by its command."""
    from align.config import dump_config

    path = Path(root) / "config.yaml"
    runs.atomic_write_text(path, f"# align compare --config {path}\n" + dump_config(cfg))
    return path


def write_report(root: Path, cfg: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write results.csv, summary.csv, robustness.csv, table3.csv, the plots and report.md into ``root``.

    ``cfg`` is the study's ``align.compare.CompareConfig``; returns what was computed.
    """
    from align import plots

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "results.csv", rows)
    summ = study_stats.summary(rows, cfg.reference, cfg.bootstrap_samples)
    rob = study_stats.robustness(rows)
    write_csv(root / "summary.csv", summ)
    write_csv(root / "robustness.csv", rob)
    t3 = {name: study_stats.table3(rows, name) for name in dict.fromkeys(r["optimizer"] for r in rows)}
    write_csv(root / "table3.csv", [dict(optimizer=name, **r) for name, rs in t3.items() for r in rs])

    figures = plots.study_plots(rows, summ, root, run_root=root / "runs", best=study_stats.best_configs(rows))
    md = [f"# Optimizer study `{cfg.name}`", "",
          f"Data: `{cfg.data.dataset.kind}` set; image encoder `{cfg.data.image_encoder.backend}:{cfg.data.image_encoder.model}`, "
          f"text encoder `{cfg.data.text_encoder.backend}:{cfg.data.text_encoder.model}`. Head `{cfg.head.kind}` → "
          f"{cfg.head.out_dim}-d, {cfg.loss.kind} loss, {cfg.schedule.steps} steps at batch {cfg.schedule.batch_size}, "
          f"base optimizer of the SAM family `{cfg.optim.base}`.",
          f"{len(rows)} runs: optimizers {', '.join(cfg.grid.optimizers)}; seeds {cfg.grid.seeds}. The best "
          f"configuration of each optimizer is chosen on the validation split (mean R@1); test figures below.", "",
          "## Summary (best configuration per optimizer, mean ± std over seeds)", "",
          *summary_lines(summ, cfg.reference), "",
          f"Δ: difference in test mean R@1 (points) to `{cfg.reference}`, paired by seed, percentile bootstrap "
          f"95% interval over seeds ({cfg.bootstrap_samples} resamples).", "",
          "## Robustness to ρ and the learning rate", "",
          "Share of an optimizer's grid configurations (seed means) whose test mean R@1 is within 95% of its best.", "",
          *robustness_lines(rob), ""]
    md += ["## The paper's Table 3 shape", "",
           f"Each cell: best validation mutual-k-NN (k = {cfg.eval.knn_k}) over training / training loss at step "
           f"{cfg.loss_at_step} / final training loss (means over seeds); † diverged seeds.", ""]
    for name, rs in t3.items():
        md += [f"**{name}**", "", *table3_lines(rs, cfg.loss_at_step), ""]
    md += ["## Plots", ""]
    for title, path in figures.items():
        md += [f"### {title}", "", f"![{title}]({path.name})", ""]
    md += ["## Files", "", "`results.csv` (a row per run), `summary.csv`, `robustness.csv`, `table3.csv`, "
           "`runs/<run>/` (config.yaml to re-run, metrics.jsonl, checkpoints, results.json).", ""]
    runs.atomic_write_text(root / "report.md", "\n".join(md))
    return {"summary": summ, "robustness": rob, "table3": t3, "figures": figures}
