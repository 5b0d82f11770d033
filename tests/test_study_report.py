"""report.md's summary, verdict prose, robustness and Table 3 text, from hand-made statistics."""
from __future__ import annotations

import math

import pytest

from align.common.config import validate
from align.study.config import CompareConfig
from align.study.report import (diff_text, fisher_note, fixed_hparams_text, robustness_lines, summary_lines,
                                table3_section, verdict_sentences, with_axis_columns)

NAN = math.nan


def _entry(name, diff=NAN, low=NAN, high=NAN, pairs=None, verdict=None, **extra):
    return {"optimizer": name, "lr": 0.003, "rho": 0.05, "seeds": pairs or 5, "diverged_seeds": 0,
            "mean_R@1_mean": 0.62, "mean_R@1_std": 0.01, "i2t_R@1_mean": 0.6, "t2i_R@1_mean": 0.64,
            "mutual_knn_mean": 0.35, "mutual_knn_std": 0.01, "cknna_mean": 0.2, "pairs": pairs,
            "diff_vs_ref": diff, "diff_ci_low": low, "diff_ci_high": high, "verdict": verdict, **extra}


def test_two_seeds_print_no_interval_and_five_print_it_with_n():
    two = _entry("msam", diff=0.0123, pairs=2, verdict="n < 3: no test")
    five = _entry("asam", diff=-0.011, low=-0.0125, high=-0.0095, pairs=5, verdict="worse")
    assert diff_text(two) == "+1.2 (n = 2: no interval)"
    assert diff_text(five) == "-1.1 [-1.2, -0.9] (n = 5)"
    assert diff_text(_entry("sam", verdict="reference")) == "—"
    table = summary_lines([_entry("sam", pairs=None, verdict="reference"), two], "sam")
    assert "n = 2: no interval" in table[-1] and "[" not in table[-1] and "n < 3: no test" in table[-1]
    assert "95% t-interval, n" in table[0] and all(line.count("|") == table[0].count("|") for line in table)


def test_verdict_sentences_say_only_what_the_verdicts_support():
    summ = [_entry("sam", verdict="reference"),
            _entry("msam", 0.02, 0.01, 0.03, 5, "better"),
            _entry("asam", -0.011, -0.0125, -0.0095, 5, "worse"),
            _entry("fsam", 0.001, -0.004, 0.006, 5, "no detectable difference"),
            _entry("sgd", 0.002, -0.031, 0.035, 5, "no detectable difference"),
            _entry("adamw", 0.004, NAN, NAN, 2, "n < 3: no test")]
    text = " ".join(verdict_sentences(summ, "sam"))
    assert "Holm-adjusted over 4 comparisons" in text  # the untested one is not in the family
    assert "Better than `sam`: `msam` (+2.0 [+1.0, +3.0] (n = 5))." in text
    assert "Worse than `sam`: `asam`" in text
    assert "No detectable difference from `sam`: `fsam`, `sgd`." in text
    assert "differences of up to 3.5 points" in text  # the widest bound among them: sgd's +3.5
    assert "Not tested (n = 2 paired seeds, fewer than 3): `adamw`" in text
    two_seeds = [_entry("sam", verdict="reference"), _entry("msam", 0.01, NAN, NAN, 2, "n < 3: no test")]
    only = " ".join(verdict_sentences(two_seeds, "sam"))
    assert "Holm" not in only and "Better" not in only and "No detectable" not in only and "Not tested" in only


def test_axis_columns_sit_after_rho_and_only_when_used():
    rows = [{"run": "a", "optimizer": "sam", "lr": 0.1, "rho": 0.05, "seed": 0},
            {"run": "b", "optimizer": "fsam", "lr": 0.1, "rho": 0.05, "eta": 1000.0, "seed": 0}]
    assert with_axis_columns(rows, []) is rows
    out = with_axis_columns(rows, ["eta"])
    assert [list(r) for r in out] == [["run", "optimizer", "lr", "rho", "eta", "seed"]] * 2
    assert out[0]["eta"] is None and out[1]["eta"] == 1000.0


def test_table3_has_one_table_per_axis_value_and_robustness_names_val_and_test():
    cell = {"best_alignment": 0.3, "loss_at_step": 2.0, "final_loss": 1.5, "diverged": 0, "seeds": 5}
    t3 = {"sam": [{"lr": 0.01, "rho": 0.05, "eta": None, **cell}],
          "fsam": [{"lr": 0.01, "rho": 0.05, "eta": e, **cell} for e in (1000.0, 1e5)]}
    md = table3_section(t3, ["eta"], 200)
    assert [line for line in md if line.startswith("**")] == ["**sam**", "**fsam** (η 1000)", "**fsam** (η 100000)"]
    rob = [{"optimizer": "fsam", "configs": 27, "within_95pct_val": 2 / 3, "best_val": 0.7, "best_test": 0.61,
            "worst_val": 0.2, "worst_test": 0.25, "worst_lr": 0.001, "worst_rho": 1.0, "worst_eta": 1e5,
            "diverged_configs": 0, "runs": 135, "diverged_runs": 0, "collapsed_runs": 4, "collapse_measured": 135}]
    header, _, line = robustness_lines(rob, ["eta"])
    assert "(val)" in header and "its test" in header and "lr, ρ, η" in header
    assert header.endswith("| diverged configs | diverged runs | collapsed runs |")
    assert line == "| fsam | 27 | 67% | 70.0 | 61.0 | 20.0 (0.001, 1, 100000) | 25.0 | 0 | 0/135 | 4/135 |"


def test_fisher_note_reports_this_studys_gap_at_eta_one():
    rows = [{"optimizer": "sam", "lr": 0.01, "rho": 0.05, "seed": s, "best_test_mean_R@1": 0.5} for s in (0, 1, 2)]
    rows += [{"optimizer": "fsam", "lr": 0.01, "rho": 0.05, "seed": s, "eta": 1.0,
              "best_test_mean_R@1": 0.5 + 0.0004 * s} for s in (0, 1, 2)]
    (note, _) = fisher_note(rows, "sam", default_eta=1.0)
    assert "1/(1 + η gᵢ²)" in note and "at most 0.08 points of test mean R@1 (3 pairs)" in note
    assert fisher_note(rows[:3], "sam", 1.0) == []  # no Fisher SAM, no note
    no_axis = [{k: v for k, v in r.items() if k != "eta"} for r in rows]
    assert "differ by at most" not in fisher_note(no_axis, "sam", default_eta=10.0)[0]  # η = 10: no η = 1 runs
    assert "at most 0.08 points" in fisher_note(no_axis, "sam", default_eta=1.0)[0]


DATA = {"dataset": {"kind": "synthetic"}, "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
        "text_encoder": {"backend": "open_clip", "model": "ViT-S-16"}, "cache_root": "/nonexistent", "device": "cpu"}


def test_the_report_says_at_which_unswept_method_settings_gsam_and_friendly_sam_ran():
    """A summary row gives lr, ρ and the swept axes only: without this line a reader could not tell the α of a GSAM
    row or the σ, λ of a Friendly SAM row. Values: GSAM α 0.4, ρ_min 0 and Friendly SAM σ 1, λ 0.9 are the
    papers' (tests/test_peer_oracles.py); the config's σ 0.5 replaces Friendly SAM's, a swept axis (M-SAM's β)
    and ρ are left out, and base optimizers and SAM (no numeric knob besides ρ) say nothing."""
    cfg = validate(CompareConfig, {"data": DATA, "optim": {"sigma": 0.5}, "grid": {
        "optimizers": ["sgd", "sam", "msam", "gsam", "friendly_sam"], "lrs": [0.003], "rhos": [0.05], "seeds": [0],
        "method_axes": {"msam": {"metric_beta": [0.0, 0.9]}}}})
    assert fixed_hparams_text(cfg) == "msam: α 1; gsam: α 0.4, ρ_min 0; friendly_sam: σ 0.5, λ 0.9"


def test_the_bar_chart_labels_of_eight_optimizers_do_not_overlap(tmp_path, monkeypatch):
    """With GSAM and Friendly SAM in the default study the horizontal labels ran into each other ("ASAMFisher SAM",
    "GSAMFriendly SAM"). Measured on the drawn figure: no two tick labels of a panel share a pixel."""
    from align.study import plots  # the plotting module, for its figure saver only

    drawn = []

    def keep(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        drawn.append([[t.get_window_extent(renderer) for t in ax.get_xticklabels()] for ax in fig.axes])
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    names = ["sgd", "adamw", "sam", "msam", "asam", "fsam", "gsam", "friendly_sam"]
    summary = [{"optimizer": n, "mean_R@1_mean": 0.6, "mean_R@1_std": 0.01, "mutual_knn_mean": 0.34,
                "mutual_knn_std": 0.005} for n in names]
    plots.bar_chart(summary, tmp_path / "bars.png")
    for boxes in drawn[0]:
        assert len(boxes) == len(names)
        for a, b in zip(boxes, boxes[1:]):
            assert not a.overlaps(b), (a, b)
