"""The study's report (edge layer): results.csv, the tables as CSV, the plots (PNG) and report.md that shows them
all, and the text of its tables (the terminal's tables in ``align compare`` take their summary columns from here)."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from align.cache.key import CachesConfig
from align.common.errors import AlignError
from align.common.files import atomic_write_text
from align.eval.plots import confusion_grid
from align.optim import default_hparams
from align.optim.registry import AXIS_SYMBOLS, optimizer_info, resolve_hparams
from align.study import invariance, plots
from align.study.invariance_report import invariance_section
from align.study import stats as study_stats
from align.study.beside import SUMMARY, beside_folder, read_beside
from align.study.seed_noise import MIN_SIGN_FLIP_PAIRS, NORMALITY_ALPHA
from align.train import run_dir
from align.train.collapse import collapse_steps, uniform_loss


def _missing(value: Any) -> bool:
    """Whether a figure is absent: None (not measured; a non-finite value is stored as null), blank or NaN."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _fixed(value: Any, digits: int) -> str:
    return "—" if _missing(value) else f"{value:.{digits}f}"


def _fmt(value: Any, digits: int = 3) -> str:
    if _missing(value):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def hp_text(value: Any) -> str:
    """A hyper-parameter (lr, ρ) as written in configs: 0.003, 1e-05; None as —."""
    return "—" if value is None or value == "" else f"{float(value):g}"


def pct_text(mean: float, std: float | None = None) -> str:
    """A share as percent: '61.2', with its std '61.2 ± 0.4'; None or NaN as — (a missing std: the mean alone)."""
    if _missing(mean):
        return "—"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if not _missing(std) else "")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV (columns in first-seen order), written atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    atomic_write_text(path, buf.getvalue())


AXIS_LABELS = AXIS_SYMBOLS  # the grid's method axes as the tables name them (the registry's symbols)


def with_axis_columns(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """Rows with every method-axis column right after ``rho`` (None where a row's method lacks it), so a CSV
    has them in one place; rows are returned unchanged when no axis is used (results.csv as before)."""
    if not axes:
        return rows
    out = []
    for r in rows:
        row: dict[str, Any] = {}
        for key, value in r.items():
            if key not in axes:
                row[key] = value
            if key == "rho":
                row.update({a: r.get(a) for a in axes})
        out.append(row)
    return out


def axes_text(values: dict[str, Any]) -> str:
    """Method-axis values as a label: 'η 1000, α 0.5' ('' when there are none)."""
    return ", ".join(f"{AXIS_LABELS.get(a, a)} {hp_text(v)}" for a, v in values.items() if v not in (None, ""))


def share_text(value: Any) -> str:
    """A share as a whole percent: '67%'; None or NaN as —."""
    return "—" if _missing(value) else f"{100 * value:.0f}%"


def diff_text(entry: dict[str, Any]) -> str:
    """A summary entry's Δ vs the reference in points: '+0.4 [−0.3, +1.1] (n = 5)', or '+0.4 (n = 2: no
    interval)' below 3 paired seeds, or '—' (the reference itself, or nothing paired)."""
    pairs, diff = entry.get("pairs"), entry.get("diff_vs_ref")
    if _missing(pairs) or _missing(diff):
        return "—"
    low, high = entry.get("diff_ci_low"), entry.get("diff_ci_high")
    if _missing(low) or _missing(high):
        return f"{100 * diff:+.1f} (n = {pairs}: no interval)"
    return f"{100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] (n = {pairs})"


def score_label(score: str) -> str:
    """A headline metric as the tables name it: 'mean R@1', 'zero-shot top-1'."""
    return study_stats.SCORES.get(score, score)


def _has_zeroshot(summary: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(s.get("zeroshot_top1_mean", math.nan)) for s in summary)


CellText = Callable[[dict[str, Any]], str]  # a summary entry → the text of one cell


@dataclass(frozen=True)
class SummaryColumn:
    """One metric column of the summary: its header and cell in report.md, and in the narrow table that
    ``align compare`` prints (``short`` None: left out there, to fit 80 columns; ``short_cell``: its cell there
    when it differs)."""

    header: str
    cell: CellText
    short: str | None = None
    short_cell: CellText | None = None


def summary_columns(summary: list[dict[str, Any]], score: str = study_stats.SCORE,
                    terminal: bool = False) -> list[tuple[str, CellText]]:
    """(header, cell of a summary entry) of the summary's metric columns, the headline first with its std:
    report.md's, or with ``terminal`` the narrow set the command prints."""
    def pct(metric: str) -> CellText:
        return lambda s: pct_text(s.get(f"{metric}_mean", math.nan))

    recall_short = score == "mean_R@1"  # the terminal shows i2t and t2i only beside a mean R@1 headline
    columns = [SummaryColumn(f"test {score_label(score)} (%)",
                             lambda s: pct_text(s[f"{score}_mean"], s[f"{score}_std"]), f"{score_label(score)} %")]
    if score != "mean_R@1":
        columns.append(SummaryColumn("mean R@1", pct("mean_R@1"), "mean R@1"))
    columns += [SummaryColumn("i2t R@1", pct("i2t_R@1"), "i2t" if recall_short else None),
                SummaryColumn("t2i R@1", pct("t2i_R@1"), "t2i" if recall_short else None)]
    if _has_zeroshot(summary):
        columns += [SummaryColumn(h, pct(m)) for h, m in (("zero-shot top-1", "zeroshot_top1"),
                                                           ("top-5", "zeroshot_top5"),
                                                           ("balanced acc.", "zeroshot_balanced_accuracy"))
                    if m != score]
    columns += [SummaryColumn("mutual-kNN", lambda s: f"{_fmt(s['mutual_knn_mean'])} ± {_fmt(s['mutual_knn_std'])}",
                              "mkNN", lambda s: _fixed(s["mutual_knn_mean"], 3)),
                SummaryColumn("CKNNA", lambda s: _fmt(s["cknna_mean"]))]
    if terminal:
        return [(c.short, c.short_cell or c.cell) for c in columns if c.short is not None]
    return [(c.header, c.cell) for c in columns]


def offers_sign_flip(summary: list[dict[str, Any]]) -> bool:
    """Whether any comparison has the pairs for a sign-flip test (``MIN_SIGN_FLIP_PAIRS``)."""
    return any((s.get("pairs") or 0) >= MIN_SIGN_FLIP_PAIRS for s in summary)


def p_text(p: Any) -> str:
    """A p-value: '0.031', '<0.001', '—' for none."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def summary_lines(summary: list[dict[str, Any]], reference: str, axes: list[str] = (),
                  score: str = study_stats.SCORE) -> list[str]:
    """The summary as a markdown table (one column per method axis the grid uses; zero-shot columns on a
    labelled set; the sign-flip test's Holm-adjusted p from ``MIN_SIGN_FLIP_PAIRS`` paired seeds on)."""
    heads = [AXIS_LABELS.get(a, a) for a in axes]
    columns = summary_columns(summary, score)
    flip = offers_sign_flip(summary)
    lines = ["| optimizer | lr | ρ | " + "".join(f"{h} | " for h in heads) + "seeds | "
             + "".join(f"{h} | " for h, _ in columns)
             + f"Δ vs {reference} (points, 95% t-interval, n) | verdict (Holm) |"
             + (" sign-flip p (Holm) |" if flip else ""),
             "|---" * (6 + len(axes) + len(columns) + flip) + "|"]
    for s in summary:
        div = f" ({s['diverged_seeds']} diverged)" if s["diverged_seeds"] else ""
        lines.append(f"| {s['optimizer']} | {hp_text(s['lr'])} | {hp_text(s['rho'])} | "
                     + "".join(f"{hp_text(s.get(a))} | " for a in axes) + f"{s['seeds']}{div} | "
                     + "".join(f"{cell(s)} | " for _, cell in columns)
                     + f"{diff_text(s)} | {s.get('verdict') or '—'} |"
                     + (f" {p_text(s.get('p_sign_flip_holm'))} |" if flip else ""))
    return lines


def far_from_normal(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparisons whose paired differences Shapiro–Wilk finds far from normal (p < ``NORMALITY_ALPHA``)."""
    return [s for s in summary if s.get("normality_p", math.nan) < NORMALITY_ALPHA]


def seed_noise_note(summary: list[dict[str, Any]], reference: str) -> list[str]:
    """report.md's paragraph on what the shape of the seed noise allows ([] when nothing was tested): the
    comparisons whose paired differences Shapiro–Wilk finds far from normal (their t-interval's level is not
    guaranteed), and the sign-flip test beside the t-test."""
    tested = [s for s in summary if not math.isnan(s.get("normality_p", math.nan))]
    if not tested:
        return []
    far = far_from_normal(summary)
    test = f"Shapiro–Wilk on each comparison's paired differences (n = {max(s['pairs'] for s in tested)} at most)"
    if far:
        names = ", ".join(f"`{s['optimizer']}` (p = {p_text(s['normality_p'])})" for s in far)
        out = [f"Seed noise far from normal ({test}, p < {NORMALITY_ALPHA:g}): {names}. For "
               f"{'these comparisons' if len(far) > 1 else 'this comparison'} the 95% level of the t-interval and "
               "of the t-test is not guaranteed (with 5 seeds of skewed noise, centred exponential or χ²₁, a 95% "
               "t-interval covers 88% or 82%)."]
    else:
        lowest = min(s["normality_p"] for s in tested)
        out = [f"{test} finds no departure from normality at the {100 * NORMALITY_ALPHA:g}% level (smallest p = "
               f"{p_text(lowest)}); with a handful of seeds it detects only gross departures."]
    if offers_sign_flip(summary):
        out.append(f"Beside the t-test: the sign-flip permutation test of the same paired differences against "
                   f"`{reference}` (every one of the 2^n sign patterns; it assumes noise symmetric about 0, not "
                   f"normal), Holm-adjusted over the comparisons with at least {MIN_SIGN_FLIP_PAIRS} pairs, in the "
                   "last column.")
    elif far:
        out.append(f"The sign-flip permutation test, which assumes symmetric noise but not normal, is offered from "
                   f"{MIN_SIGN_FLIP_PAIRS} paired seeds on (below, its p cannot reach 0.05): add seeds (grid.seeds).")
    return [" ".join(out), ""]


def _names(entries: list[dict[str, Any]], with_diff: bool = False) -> str:
    return ", ".join(f"`{s['optimizer']}`" + (f" ({diff_text(s)})" if with_diff else "") for s in entries)


def verdict_sentences(summary: list[dict[str, Any]], reference: str, score: str = study_stats.SCORE) -> list[str]:
    """What the comparison with the reference supports, in sentences generated from the verdicts: which
    optimizers are better or worse after Holm's adjustment, which show no detectable difference (and how large a
    difference their intervals still allow), and which were not tested for lack of seeds."""
    by = {v: [s for s in summary if s.get("verdict") == v] for v in study_stats.VERDICTS}
    better, worse, none, untested = (by[v] for v in study_stats.VERDICTS)
    family = len(better) + len(worse) + len(none)
    out = []
    if family:
        out.append(f"Tested against `{reference}` on test {score_label(score)}: paired t-tests over seeds, "
                   f"Holm-adjusted over "
                   f"{family} comparison{'s' if family > 1 else ''} at the 5% level.")
    if better:
        out.append(f"Better than `{reference}`: {_names(better, True)}.")
    if worse:
        out.append(f"Worse than `{reference}`: {_names(worse, True)}.")
    if none:
        widest = max(100 * max(abs(s["diff_ci_low"]), abs(s["diff_ci_high"])) for s in none)
        out.append(f"No detectable difference from `{reference}`: {_names(none)}. That is not evidence that they "
                   f"are equal: their 95% intervals still include differences of up to {widest:.1f} points.")
    if untested:
        n = sorted({s["pairs"] for s in untested if s.get("pairs") is not None})
        out.append(f"Not tested (n = {', '.join(map(str, n)) or 0} paired seeds, fewer than 3): {_names(untested)}. "
                   f"Their Δ is a mean of so few seeds that it supports no conclusion either way; more seeds "
                   f"(grid.seeds) give intervals and tests.")
    return out


def collapsed_text(collapsed: int | None, measured: int) -> str:
    """Collapsed runs of those whose collapse was measured: '14/15'; '—' when none was (older results)."""
    return "—" if collapsed is None else f"{collapsed}/{measured}"


def robustness_lines(rob: list[dict[str, Any]], axes: list[str] = (), score: str = study_stats.SCORE) -> list[str]:
    """The robustness table: best, worst and the share within 95% judged on validation; test means beside; then
    configurations with a diverged seed, and diverged and collapsed runs."""
    worst = "lr, ρ" + "".join(f", {AXIS_LABELS.get(a, a)}" for a in axes)
    lines = [f"| optimizer | configs | within 95% of its best (val) | best config: val {score_label(score)} | "
             "its test | "
             f"worst config ({worst}): val | its test | diverged configs | diverged runs | collapsed runs |",
             "|---" * 10 + "|"]
    for r in rob:
        where = ", ".join([hp_text(r["worst_lr"]), hp_text(r["worst_rho"]),
                           *(hp_text(r.get(f"worst_{a}")) for a in axes)])
        lines.append(f"| {r['optimizer']} | {r['configs']} | {share_text(r['within_95pct_val'])} | "
                     f"{pct_text(r['best_val'])} | {pct_text(r['best_test'])} | {pct_text(r['worst_val'])} ({where}) | "
                     f"{pct_text(r['worst_test'])} | {r['diverged_configs']} | {r['diverged_runs']}/{r['runs']} | "
                     f"{collapsed_text(r['collapsed_runs'], r['collapse_measured'])} |")
    return lines


def collapse_rule(cfg: Any) -> str:
    """What "collapsed" and "diverged" mean in a study of ``cfg`` (its ``TrainConfig`` settings), in numbers."""
    uniform = uniform_loss(cfg.loss.kind, cfg.schedule.batch_size)
    where = (f"ln {cfg.schedule.batch_size} = {uniform:.3f}" if cfg.loss.kind == "clip" else
             f"{uniform:.3f}, the {cfg.loss.kind} loss at its best constant logit")
    return (f"A run **collapsed** when its training loss L lay on the uniform plateau, |L − L_u| ≤ "
            f"{cfg.uniform_plateau_tol:g} · L_u (L_u: the uniform-prediction loss, {where}; within "
            f"{100 * cfg.uniform_plateau_tol:g}% of it), for at least "
            f"{collapse_steps(cfg.collapse_fraction, cfg.schedule.steps)} consecutive steps "
            f"(collapse_fraction {cfg.collapse_fraction:g} of its {cfg.schedule.steps} steps; uniform_plateau_tol "
            "and collapse_fraction set them): the paper's divergence pattern, a logit scale collapsed to chance. "
            "Such a run goes on and may recover, so its scores count as any other's; it is counted beside the runs "
            f"that **diverged**, which ended early: a non-finite loss, or the loss within {cfg.diverge_tol:g} of L_u "
            f"with ‖g‖ < {cfg.diverge_grad_tol:g} for {cfg.diverge_patience} steps in a row. — : results written "
            "before collapse was counted.")


def table3_lines(rows3: list[dict[str, Any]], loss_step: int) -> list[str]:
    """lr × ρ cells: best alignment / loss at step T / final loss, † with the seeds that diverged or collapsed."""
    rhos = sorted({r["rho"] for r in rows3}, key=lambda x: -1 if x is None else x)
    lrs = sorted({r["lr"] for r in rows3})
    cell = {(r["lr"], r["rho"]): r for r in rows3}
    lines = ["| lr \\ ρ | " + " | ".join(hp_text(r) for r in rhos) + " |", "|---" * (len(rhos) + 1) + "|"]
    for lr in lrs:
        parts = []
        for rho in rhos:
            r = cell.get((lr, rho))
            if r is None:
                parts.append("")
                continue
            parts.append(f"{_fmt(r['best_alignment'])} / {_fmt(r['loss_at_step'])} / {_fmt(r['final_loss'])}"
                         + table3_mark(r))
        lines.append(f"| {hp_text(lr)} | " + " | ".join(parts) + " |")
    return lines


def table3_mark(cell: dict[str, Any]) -> str:
    """A Table 3 cell's mark: ' †1/5 diverged, 4/5 collapsed', '' for none, ' (collapse —)' where no seed's
    collapse was measured (older results)."""
    seeds, collapsed = cell["seeds"], cell.get("collapsed")
    marks = [f"{cell['diverged']}/{seeds} diverged"] if cell["diverged"] else []
    if collapsed:
        marks.append(f"{collapsed}/{cell['collapse_measured']} collapsed")
    text = f" †{', '.join(marks)}" if marks else ""
    return text + (" (collapse —)" if collapsed is None else "")


def table3_section(t3: dict[str, list[dict[str, Any]]], axes: list[str], loss_step: int) -> list[str]:
    """One lr × ρ table per optimizer and per value of its method axes (Fisher SAM η = 1000, ...)."""
    md: list[str] = []
    for name, rs in t3.items():
        parts: dict[tuple, list[dict[str, Any]]] = {}
        for r in rs:
            parts.setdefault(tuple((a, r.get(a)) for a in axes), []).append(r)
        for values, part in parts.items():
            label = axes_text(dict(values))
            md += [f"**{name}**" + (f" ({label})" if label else ""), "", *table3_lines(part, loss_step), ""]
    return md


# Measured by bench/study_knobs.py on the embedded default study's head (SAM's best cell: lr 0.003, ρ 0.05, seed 0):
# the squared gradient coordinates, Fisher SAM's δ against SAM's on the same gradient, and the trained weights.
FISHER_NOTE = (
    "Fisher SAM and its η: the perturbation is SAM's direction with coordinate i scaled by 1/(1 + η gᵢ²) and "
    "renormalised to radius ρ, so it departs from SAM only where η gᵢ² is not small against 1. An alignment head's "
    "gradient is small per coordinate: on the embedded default study's head max gᵢ² is 0.021 at the first step and "
    "below 3e-4 from step 50 on, so at η = 1 every factor 1 + η gᵢ² lies in [1, 1.021] at the first step and in "
    "[1, 1.0003] later. There ‖δ_F − δ_S‖/‖δ_S‖ is 0.3% at the first step and below 3e-5 from step 50 on, and after "
    "400 steps the weights differ from SAM's by 1.4e-4: at η = 1 Fisher SAM is SAM to the printed precision. It "
    "differs once η nears 1/gᵢ²: over steps 50–400 ‖δ_F − δ_S‖/‖δ_S‖ is 0.3–2.5% at η = 1e3, 2–15% at 1e4 and "
    "14–44% at 1e5, and the trained weights differ by 2.7%, 6.3% and 9.6%; hence the η axis of the default study.")


def fisher_note(rows: list[dict[str, Any]], reference: str, default_eta: float,
                score: str = study_stats.SCORE) -> list[str]:
    """The report's paragraph on Fisher SAM's η, with this study's own gap to the reference at η = 1."""
    if not any(r["optimizer"] == "fsam" for r in rows):
        return []
    text = FISHER_NOTE
    axis = "eta" in study_stats.used_axes([r for r in rows if r["optimizer"] == "fsam"])
    if axis or default_eta == 1.0:
        gap, pairs = study_stats.max_paired_gap(rows, "fsam", reference, {"eta": 1.0} if axis else {},
                                                column=f"best_test_{score}")
        if pairs:
            text += (f" In this study Fisher SAM at η = 1 and `{reference}` at the same lr, ρ and seed differ by at "
                     f"most {100 * gap:.2f} points of test {score_label(score)} ({pairs} pairs).")
    return [text, ""]


def write_report(root: Path, cfg: Any, rows: list[dict[str, Any]], run_root: Path) -> dict[str, Any]:
    """Write results.csv, summary.csv, robustness.csv, table3.csv, the plots and report.md into ``root``.

    ``cfg`` is the study's ``align.study.config.CompareConfig``, ``run_root`` the folder of its cells' run
    directories (``StudyDir.write_report`` calls this); returns what was computed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    score = getattr(cfg, "score", study_stats.SCORE)
    axes = study_stats.used_axes(rows)
    write_csv(root / "results.csv", with_axis_columns(rows, axes))
    every, rows = rows, invariance.at_unit_scale(rows)  # the plain head's runs; the others in the Invariance section
    summ = study_stats.summary(rows, cfg.reference, score=score)
    rob = study_stats.robustness(rows, select=f"best_val_{score}", test=f"best_test_{score}")
    write_csv(root / "summary.csv", summ)
    write_csv(root / "robustness.csv", rob)
    t3 = {name: study_stats.table3(rows, name) for name in dict.fromkeys(r["optimizer"] for r in rows)}
    write_csv(root / "table3.csv", [dict(optimizer=name, **r) for name, rs in t3.items() for r in rs])

    best = study_stats.best_configs(rows, f"best_val_{score}")
    figures = plots.study_plots(rows, summ, root, run_root=run_root, best=best, score=score)
    confusion = _confusion_figure(root, run_root, rows, best)
    if confusion is not None:
        figures["Zero-shot confusion of each optimizer's best configuration (test, summed over seeds)"] = confusion
    md = _report_head(cfg, rows, summ, axes, score)
    md += beside_section(getattr(cfg, "beside", None), summ, score)
    md += invariance_section(cfg, every, run_root, score, score_label(score), _config_text)
    md += ["## Robustness to ρ, the learning rate and the method axes", "",
           f"Judged on VALIDATION seed means ({score_label(score)}), as the best configuration is: the share of an "
           "optimizer's grid configurations within 95% of its best, and its best and worst configuration. The test "
           "means of those two configurations sit beside them, labelled; nothing is chosen on test scores.", "",
           collapse_rule(cfg), "", *robustness_lines(rob, axes, score), ""]
    md += ["## The paper's Table 3 shape", "",
           f"Each cell: best validation mutual-k-NN (k = {cfg.eval.knn_k}) over training / training loss at step "
           f"{cfg.loss_at_step} / final training loss (means over seeds); † the seeds that diverged or collapsed (as "
           "defined above the robustness table).", "",
           *table3_section(t3, axes, cfg.loss_at_step)]
    md += ["## Plots", ""]
    for title, path in figures.items():
        md += [f"### {title}", "", f"![{title}]({path.name})", ""]
    md += ["## Files", "", "`results.csv` (a row per run), `summary.csv`, `robustness.csv`, `table3.csv`, "
           "`runs/<run>/` (config.yaml to re-run, metrics.jsonl, checkpoints, results.json).", ""]
    atomic_write_text(root / "report.md", "\n".join(md))
    return {"summary": summ, "robustness": rob, "table3": t3, "figures": figures}


def _config_text(key: tuple) -> str:
    """A configuration key as 'lr 0.003, ρ 0.05, η 1e+04'."""
    rho = "" if key[2] is None else f", ρ {hp_text(key[2])}"
    axes = axes_text(study_stats.key_axes(key))
    return f"lr {hp_text(key[1])}{rho}" + (f", {axes}" if axes else "")


def _confusion_figure(root: Path, run_root: Path, rows: list[dict[str, Any]],
                      best: dict[str, tuple]) -> Path | None:
    """One zero-shot confusion matrix per optimizer (its best configuration, test, summed over seeds), read from
    the runs' results.json; None when the study's test split has no labels."""
    panels: dict[str, Any] = {}
    classes: list[str] = []
    for name, key in best.items():
        for r in rows:
            if study_stats.config_key(r) != key:
                continue
            record = (run_dir.read_results(run_root / r["run"]) or {}).get("zeroshot")
            if record:
                classes = record["classes"]
                panels[name] = panels.get(name, 0) + np.asarray(record["confusion"])
    if not panels:
        return None
    return confusion_grid(root / "zeroshot_confusion.png", panels, classes,
                          "zero-shot confusion (test; rows: true class)")


def _ranks(summary: list[dict[str, Any]], score: str) -> dict[str, int]:
    order = sorted(summary, key=lambda s: -s.get(f"{score}_mean", math.nan)
                   if not math.isnan(s.get(f"{score}_mean", math.nan)) else math.inf)
    return {s["optimizer"]: i + 1 for i, s in enumerate(order)}


def beside_section(beside: str | None, summ: list[dict[str, Any]], score: str) -> list[str]:
    """report.md's side-by-side ranking with another study (``beside``: its name under the studies folder, or its
    folder): each optimizer's headline, Δ to the reference and verdict in both, and Kendall's τ of the rankings."""
    if not beside:
        return []
    summary_csv = beside_folder(beside) / SUMMARY
    head = [f"## Beside study `{Path(beside).name}`", ""]
    try:  # checked before the study began (align compare); it may have changed since
        other = read_beside(beside)
    except AlignError as exc:
        return head + [f"Left out: {exc}.", ""]
    if other is None:
        return head + [f"{summary_csv} does not exist yet: run that study (`align compare`) and then "
                       "this one again (finished cells are kept) to see both rankings side by side.", ""]
    theirs = {s["optimizer"]: s for s in other}
    their_score = other[0]["score"] if other else study_stats.SCORE
    here_rank, there_rank = _ranks(summ, score), _ranks(other, their_score)
    lines = [f"| optimizer | here: test {score_label(score)} (%) | Δ (n) | verdict | rank | there: test "
             f"{score_label(their_score)} (%) | Δ (n) | verdict | rank |", "|---" * 9 + "|"]
    for s in summ:
        t = theirs.get(s["optimizer"])
        there = ([pct_text(t[f"{their_score}_mean"], t.get(f"{their_score}_std")), diff_text(t),
                  t.get("verdict") or "—", str(there_rank[s["optimizer"]])] if t else ["—"] * 4)
        lines.append(f"| {s['optimizer']} | {pct_text(s[f'{score}_mean'], s[f'{score}_std'])} | {diff_text(s)} | "
                     f"{s.get('verdict') or '—'} | {here_rank[s['optimizer']]} | " + " | ".join(there) + " |")
    tau, n = study_stats.rank_agreement({s["optimizer"]: s[f"{score}_mean"] for s in summ},
                                        {s["optimizer"]: s[f"{their_score}_mean"] for s in other})
    agreement = (f"Kendall's τ between the two rankings of the best-configuration means: {tau:+.2f} over {n} "
                 f"optimizers (+1: the same order, −1: reversed)." if n >= 2 and not math.isnan(tau) else
                 "Too few optimizers in common to compare the rankings.")
    return head + [f"Ranked by seed means of each study's own headline metric; the intervals and verdicts say "
                   f"which differences the seeds support. {agreement}", "", *lines, ""]


def _report_head(cfg: Any, rows: list[dict[str, Any]], summ: list[dict[str, Any]], axes: list[str],
                 score: str = study_stats.SCORE) -> list[str]:
    """report.md's title, setup, summary table and what its comparisons support."""
    sweeps = "; ".join(f"{name}: " + ", ".join(f"{AXIS_LABELS.get(a, a)} ∈ {{{', '.join(map(hp_text, values))}}}"
                                               for a, values in spec.items())
                       for name, spec in cfg.grid.method_axes.items())
    eta = cfg.optim.eta if cfg.optim.eta is not None else default_hparams("fsam")["eta"]
    label = score_label(score)
    return [f"# Optimizer study `{cfg.name}`", "",
            f"{_data_text(cfg)} Head `{cfg.head.kind}` → "
            f"{cfg.head.out_dim}-d, {cfg.loss.kind} loss, {cfg.schedule.steps} steps at batch {cfg.schedule.batch_size}, "
            f"base optimizer of the SAM family `{cfg.optim.base}`.",
            f"{len(rows)} runs: optimizers {', '.join(cfg.grid.optimizers)}; seeds {cfg.grid.seeds}"
            + (f"; method axes {sweeps}" if sweeps else "")
            + (f"; held fixed {fixed}" if (fixed := fixed_hparams_text(cfg)) else "")
            + ". The best configuration of each optimizer is "
            f"chosen on the validation split ({label}); test figures below.", "",
            *zero_shot_note(cfg, score),
            "## Summary (best configuration per optimizer, mean ± std over seeds)", "",
            *summary_lines(summ, cfg.reference, axes, score), "",
            f"Δ: difference in test {label} (points) to `{cfg.reference}`, paired by seed, with n paired seeds and "
            "its Student-t 95% interval (per comparison); below 3 pairs no interval is given, because none keeps its "
            "level there. Verdict: the paired t-test, Holm-adjusted over all comparisons with the reference.", "",
            *verdict_sentences(summ, cfg.reference, score), "",
            *seed_noise_note(summ, cfg.reference),
            *fisher_note(rows, cfg.reference, eta, score)]


def fixed_hparams_text(cfg: Any) -> str:
    """The numeric method hyper-parameters besides ρ that the grid does not sweep, at the values its cells train
    with (the config's optim section, else the registry's defaults): 'gsam: α 0.4, ρ_min 0; friendly_sam: σ 1,
    λ 0.9'. Without it a row of GSAM or Friendly SAM would not say at which α, σ or λ it ran."""
    parts = []
    for name in dict.fromkeys(cfg.grid.optimizers):
        info = optimizer_info(name)
        swept = {"rho", *cfg.grid.method_axes.get(name, {})}
        values = resolve_hparams(name, {h.name: getattr(cfg.optim, h.name, None) for h in info.hparams})
        fixed = [f"{h.symbol} {hp_text(values[h.name])}" for h in info.hparams if h.name not in swept
                 and isinstance(values[h.name], (int, float)) and not isinstance(values[h.name], bool)]
        if fixed:
            parts.append(f"{name}: {', '.join(fixed)}")
    return "; ".join(parts)


def _data_text(cfg: Any) -> str:
    """What the study trained on: an embed section's set and encoders, or the caches a caches section names."""
    if isinstance(cfg.data, CachesConfig):
        return "Data: caches " + ", ".join(f"{split} `{entry}`" for split, entry in cfg.data.caches.items()) + "."
    return (f"Data: `{cfg.data.dataset.kind}` set; image encoder `{cfg.data.image_encoder.backend}:"
            f"{cfg.data.image_encoder.model}`, text encoder `{cfg.data.text_encoder.backend}:"
            f"{cfg.data.text_encoder.model}`.")


def zero_shot_note(cfg: Any, score: str) -> list[str]:
    """What zero-shot means here and why recall is not the headline on a set whose captions name only the class."""
    if cfg.data.dataset.kind != "mnist":
        return []
    templates = "; ".join(f"“{t}”" for t in cfg.data.dataset.mnist.prompt_templates)
    return [f"Zero-shot: each image through the image head, each class as CLIP's prompt ensemble of its prompts "
            f"through the text head (templates {templates}; the training captions use other templates), the nearest "
            f"class is the prediction. Top-1, top-5 and balanced accuracy (mean per-class recall) on the test split. "
            f"Headline: {score_label(score)}. Retrieval recall is reported too, in CLIP_benchmark's convention: a "
            "caption's hit is its own image only, an image's hit any of its own captions (any-hit). Every caption "
            "here names only the digit, so all images of a class share the same few caption texts: a caption's own "
            "image competes with every digit of its class, an image's own caption with the identical captions of "
            "the others. Recall then measures near-chance identification of one image among its class, not "
            "alignment.", ""]
