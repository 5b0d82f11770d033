"""A study's headline metric (``score``) and its ranking beside another study: Kendall's τ-b against scipy, the
summary on zero-shot accuracy, and report.md's side-by-side section from a hand-written summary.csv."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from align.study import stats as study_stats
from align.study.report import beside_section, summary_lines, write_csv

NAN = math.nan


@pytest.mark.parametrize("seed", range(6))
def test_rank_agreement_is_scipys_kendall_tau_b(seed):
    from scipy.stats import kendalltau

    rng = np.random.default_rng(seed)
    names = [f"o{i}" for i in range(7)]
    first = dict(zip(names, rng.integers(0, 4, size=7).astype(float)))  # with ties
    second = dict(zip(names, rng.integers(0, 4, size=7).astype(float)))
    second.pop("o6")
    first["o5"] = NAN  # left out: NaN on one side
    tau, n = study_stats.rank_agreement(first, second)
    common = [k for k in names[:5]]
    expected = kendalltau([first[k] for k in common], [second[k] for k in common], variant="b").statistic
    assert n == 5
    assert (math.isnan(tau) and math.isnan(expected)) or tau == pytest.approx(expected, abs=1e-12)
    assert study_stats.rank_agreement({"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 5.0}) == (1.0, 2)
    assert study_stats.rank_agreement({"a": 1.0, "b": 2.0}, {"a": 5.0, "b": 3.0}) == (-1.0, 2)


def _rows(score: str) -> list[dict]:
    """Three seeds of sam and msam (one configuration each); msam better on `score` by 2 points every seed."""
    rows = []
    for name, shift in (("sam", 0.0), ("msam", 0.02)):
        for seed in range(3):
            value = 0.5 + 0.01 * seed + shift
            rows.append({"run": f"{name}_s{seed}", "optimizer": name, "lr": 0.003, "rho": 0.05, "seed": seed,
                         "status": "ok", f"best_val_{score}": value, f"best_test_{score}": value,
                         "best_val_mean_R@1": 0.1 - shift, "best_test_mean_R@1": 0.1 - shift,
                         "best_test_mutual_knn": 0.3, "best_test_cknna": 0.2})
    return rows


def test_the_summary_compares_on_the_studys_score():
    summ = study_stats.summary(_rows("zeroshot_top1"), "sam", score="zeroshot_top1")
    msam = next(s for s in summ if s["optimizer"] == "msam")
    assert msam["score"] == "zeroshot_top1" and msam["diff_vs_ref"] == pytest.approx(0.02)
    assert msam["verdict"] == "better" and msam["zeroshot_top1_mean"] == pytest.approx(0.53)
    by_recall = study_stats.summary(_rows("zeroshot_top1"), "sam")  # the default score: mean R@1, lower for msam
    assert next(s for s in by_recall if s["optimizer"] == "msam")["verdict"] == "worse"
    table = summary_lines(summ, "sam", score="zeroshot_top1")
    assert table[0].startswith("| optimizer | lr | ρ | seeds | test zero-shot top-1 (%) | mean R@1 |")
    assert "| 53.0 ± 1.0 |" in table[-1] and all(line.count("|") == table[0].count("|") for line in table)


def test_beside_puts_both_rankings_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path))
    summ = study_stats.summary(_rows("zeroshot_top1"), "sam", score="zeroshot_top1")
    assert "does not exist yet" in " ".join(beside_section("default", summ, "zeroshot_top1"))
    other = study_stats.summary(_rows("mean_R@1"), "sam")  # there msam is ahead on mean R@1 ... reversed here
    for entry in other:
        entry.pop("score")  # a summary.csv written before studies had a score column: mean R@1
    (tmp_path / "studies" / "default").mkdir(parents=True)
    write_csv(tmp_path / "studies" / "default" / "summary.csv", other)
    lines = beside_section("default", summ, "zeroshot_top1")
    text = "\n".join(lines)
    assert lines[0] == "## Beside study `default`"
    assert "here: test zero-shot top-1 (%)" in text and "there: test mean R@1 (%)" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines
            if line.startswith("| sam") or line.startswith("| msam")}
    assert rows["msam"][1] == "53.0 ± 1.0" and rows["msam"][3:5] == ["better", "1"]
    assert rows["msam"][5] == "8.0 ± 0.0" and rows["msam"][7:9] == ["worse", "2"]
    assert "Kendall's τ between the two rankings of the best-configuration means: -1.00 over 2" in text
    with open(tmp_path / "studies" / "default" / "summary.csv", newline="") as fh:
        assert "score" not in next(csv.reader(fh))
