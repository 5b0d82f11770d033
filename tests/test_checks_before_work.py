"""Checks that ran after the work, or not at all, now run before it, ``--dry-run`` included (issue 21): one line,
exit 2, and the study folder never made. And a figure that was not measured prints as "—", never a crash.

Each case was found by an audit: a ``beside:`` study whose summary.csv is malformed crashed ``write_report`` after
every cell had trained (and every rerun crashed at the same point); ``--pack`` and ``--memory-budget`` were checked
after config.yaml and .lock were written, and never under ``--dry-run``; an mnist split of size 0 passed
``--dry-run`` and failed at embed; overrides for optimizers outside the grid were ignored and echoed by the plan;
``align train`` finished and crashed printing a sharpness figure that was None.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from align.cli.main import app
from align.common.errors import AlignError
from align.common.files import json_text
from faults import one_error_line
from helpers import make_cache, train_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A cache and a one-cell study config on it: nothing is wrong with them but the input each test adds."""
    root = tmp_path_factory.mktemp("checks")
    data = make_cache(root / "cache")
    cfg = train_config(data, schedule={"steps": 20, "batch_size": 64, "warmup_steps": 2},
                       eval={"every": 10, "sharpness": False}, checkpoint_every=10)
    cfg.update(name="checked", workers=1, grid={"optimizers": ["sam"], "lrs": [0.01], "rhos": [0.05], "seeds": [0]})
    (root / "study.yaml").write_text(yaml.safe_dump(cfg))
    return {"root": root, "study": root / "study.yaml"}


def compare(world: dict, out: Path, *args: str, dry_run: bool) -> str:
    """`align compare` of the world's study into ``out`` with ``args``: its one error line; ``out`` never made."""
    argv = ["compare", "--config", str(world["study"]), "--out", str(out), "--no-progress", *args]
    line = one_error_line(runner.invoke(app, argv + ["--dry-run"] * dry_run))
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return line


# -- --pack and --memory-budget ---------------------------------------------------------------------------

RUN_OPTIONS = {
    "--pack 0": (["--pack", "0"], "--pack must be auto or a whole number >= 1, got 0"),
    "--pack two": (["--pack", "two"], "--pack must be auto or a whole number >= 1, got 'two'"),
    "--pack -3": (["--pack", "-3"], "--pack must be auto or a whole number >= 1, got -3"),
    "--memory-budget 0": (["--memory-budget", "0"], "--memory-budget '0' is not a size"),
    "--memory-budget lots": (["--memory-budget", "lots"], "--memory-budget 'lots' is not a size"),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", list(RUN_OPTIONS))
def test_pack_and_memory_budget_are_refused_before_the_study_folder_is_made(world, case, dry_run, tmp_path):
    args, expected = RUN_OPTIONS[case]
    assert expected in compare(world, tmp_path / "study", *args, dry_run=dry_run)


@pytest.mark.parametrize("options", [{"pack": 0}, {"memory_budget": "lots"}])
def test_run_compare_checks_its_options_before_it_writes_config_and_lock(world, options, tmp_path):
    from align.common.config import load_config
    from align.study.compare import run_compare
    from align.study.config import CompareConfig

    cfg = load_config(CompareConfig, world["study"], [f"study_dir={tmp_path / 'study'}"])
    with pytest.raises(AlignError, match="--pack|--memory-budget"):
        run_compare(cfg, progress=False, **options)
    assert not (tmp_path / "study").exists()


# -- beside: the other study's summary.csv ---------------------------------------------------------------

HEADER = ("optimizer,lr,rho,seeds,diverged_seeds,score,mean_R@1_mean,mean_R@1_std,pairs,diff_vs_ref,diff_ci_low,"
          "diff_ci_high,verdict\n")
BESIDE_BAD = {  # summary.csv's bytes → what the line says
    "a value that is not a number": (HEADER + "sam,0.01,0.05,3,0,mean_R@1,0.61,0.01,,,,,reference\n"
                                     "msam,0.01,0.05,3,0,mean_R@1,lots,0.01,3,0.01,0.0,0.02,none\n",
                                     "line 3, column mean_R@1_mean: 'lots' is not a number"),  # was a ValueError
    "no optimizer column": ("name,mean_R@1_mean\nsam,0.61\n", "has no column optimizer"),  # was KeyError: 'optimizer'
    "no column of its score": ("optimizer,score,zeroshot_top1_std\nsam,zeroshot_top1,0.1\n",
                               "has no column zeroshot_top1_mean"),
    "an unknown score": ("optimizer,score,mean_R@1_mean\nsam,top_7,0.5\n", "has an unknown score 'top_7'"),
    "a row longer than its header": ("optimizer,mean_R@1_mean\nsam,0.5,0.7\n",
                                     "a row with more fields than its header"),
    "pairs that are not a count": ("optimizer,mean_R@1_mean,pairs\nsam,0.5,inf\n", "column pairs: inf is not a count"),
    "not UTF-8": ("optimizer,mean_R@1_mean\nsam\xe9,0.5\n".encode("latin-1"), "is not UTF-8 text"),
}


def write_summary(folder: Path, content: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.csv"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", list(BESIDE_BAD))
def test_a_malformed_beside_summary_is_refused_before_any_cell_trains(world, case, dry_run, tmp_path):
    content, expected = BESIDE_BAD[case]
    path = write_summary(tmp_path / "other", content)
    line = compare(world, tmp_path / "study", "--set", f"beside={tmp_path / 'other'}", dry_run=dry_run)
    assert expected in line and str(path) in line, line


def test_a_beside_study_by_name_is_checked_under_the_studies_folder(world, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path))
    write_summary(tmp_path / "studies" / "default", BESIDE_BAD["no optimizer column"][0])
    line = compare(world, tmp_path / "study", "--set", "beside=default", dry_run=True)
    assert f"{tmp_path / 'studies' / 'default' / 'summary.csv'} has no column optimizer" in line


def sam_and_msam() -> list[dict]:
    """This study's summary: msam ahead of sam by 2 points on every one of 3 seeds."""
    from align.study import stats as study_stats

    rows = [{"run": f"{name}_s{seed}", "optimizer": name, "lr": 0.01, "rho": 0.05, "seed": seed, "status": "ok",
             "best_val_mean_R@1": v, "best_test_mean_R@1": v, "best_test_mutual_knn": 0.3, "best_test_cknna": 0.2}
            for name, shift in (("sam", 0.0), ("msam", 0.02)) for seed in range(3)
            for v in [0.5 + 0.01 * seed + shift]]
    return study_stats.summary(rows, "sam")


@pytest.mark.parametrize("case", list(BESIDE_BAD))
def test_a_beside_summary_that_breaks_after_the_check_is_left_out_of_the_report(case, tmp_path):
    from align.study.report import beside_section

    path = write_summary(tmp_path / "other", BESIDE_BAD[case][0])
    lines = beside_section(str(tmp_path / "other"), sam_and_msam(), "mean_R@1")
    assert lines[0] == "## Beside study `other`"
    assert lines[2].startswith(f"Left out: beside: {path}") and BESIDE_BAD[case][1] in lines[2], lines


def test_a_beside_summary_with_only_the_optimizer_and_its_mean_still_ranks(world, tmp_path):
    """The columns the ranking needs are the optimizer and its headline mean; a Δ or verdict left out reads —."""
    from align.study.report import beside_section

    write_summary(tmp_path / "other", "optimizer,mean_R@1_mean\nsam,0.70\nmsam,0.60\n")
    out = runner.invoke(app, ["compare", "--config", str(world["study"]), "--dry-run",
                              "--set", f"beside={tmp_path / 'other'}", "--set", f"study_dir={tmp_path / 's'}"])
    assert out.exit_code == 0, out.output
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in beside_section(str(tmp_path / "other"), sam_and_msam(), "mean_R@1") if line.startswith("| ")}
    # here msam (mean of 52, 53, 54: 53.0) ranks above sam (51.0); there sam (70.0) above msam (60.0)
    assert rows["msam"][1:] == ["53.0 ± 1.0", "+2.0 [+2.0, +2.0] (n = 3)", "better", "1", "60.0", "—", "—", "2"]
    assert rows["sam"][5:] == ["70.0", "—", "—", "1"]


# -- mnist split sizes, grid entries no cell uses ---------------------------------------------------------

@pytest.mark.parametrize("split", ["val", "test"])
def test_an_empty_mnist_split_is_refused_by_dry_run(split, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path))
    args = ["--config", "compare/mnist_offline", "--dry-run", "--set", f"data.dataset.mnist.{split}_per_class=0"]
    line = one_error_line(runner.invoke(app, ["compare", *args]))
    assert f"split '{split}' of the mnist set has no images (dataset.mnist.{split}_per_class is 0)" in line
    line = one_error_line(runner.invoke(app, ["embed", "--config", "embed/mnist_offline",
                                              "--set", f"dataset.mnist.{split}_per_class=0"]))
    assert f"dataset.mnist.{split}_per_class is 0" in line
    assert not any(tmp_path.iterdir())


def test_overrides_for_optimizers_left_out_of_the_grid_are_refused_not_echoed(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path))
    line = one_error_line(runner.invoke(app, ["compare", "--dry-run", "--set", "grid.optimizers=[sam,msam]"]))
    # the packaged default study has these six for sgd, fsam, gsam, friendly_sam and asam
    assert "lr_overrides.sgd, lr_overrides.fsam, lr_overrides.gsam, lr_overrides.friendly_sam, rho_overrides.asam, " \
           "method_axes.fsam: not in grid.optimizers (sam, msam)" in line
    emptied = ["--set", "grid.lr_overrides={}", "--set", "grid.rho_overrides={}", "--set", "grid.method_axes={}"]
    out = runner.invoke(app, ["compare", "--dry-run", "--set", "grid.optimizers=[sam,msam]", *emptied])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    grid = yaml.safe_load((REPO / "configs" / "compare" / "default.yaml").read_text())["grid"]
    assert plan["method_axes"] == {} and plan["optimizers"] == ["sam", "msam"]
    assert plan["runs"] == 2 * len(grid["lrs"]) * len(grid["rhos"]) * len(grid["seeds"])  # both take lr × ρ × seed


# -- a figure that was not measured -------------------------------------------------------------------------

def test_train_prints_a_sharpness_figure_that_is_not_finite_as_a_dash(capsys):
    from align.cli.train import print_results

    nan = math.nan  # what a measurement that overflowed gives; results.json stores it as null
    results = json.loads(json_text({
        "best_val": {"mean_R@1": 0.5}, "best_test": {"mean_R@1": nan}, "final_test": None, "status": "done",
        "steps_done": 20, "best_step": 20, "final_loss": nan, "wall_time_s": 1.5,
        "sharpness": {"best": {"rho": 0.05, "worst_case_first_order": nan, "worst_case_ascent": 0.25,
                               "hessian_top_eigenvalue": nan, "hessian_trace": None}}}))
    assert results["sharpness"]["best"]["worst_case_first_order"] is None
    print_results(results, "run")
    out = capsys.readouterr().out
    text = " ".join(out.split())
    assert "sharpness of the best head (ρ=0.05): first-order —, ascent 0.25, λ_max —, tr(H) —" in text
    assert "final loss —, 1.5 s" in text
    row = next(line for line in out.splitlines() if "mean_R@1" in line)
    assert [c.strip() for c in row.split("│")[1:-1]] == ["mean_R@1", "0.5000", "—", "—"]


def test_the_study_tables_print_a_missing_figure_as_a_dash():
    from align.study.report import diff_text, robustness_lines, share_text, summary_columns, summary_lines

    entry = {"optimizer": "sam", "lr": 0.01, "rho": 0.05, "seeds": 2, "diverged_seeds": 2, "score": "mean_R@1",
             "pairs": 2, "diff_vs_ref": 0.01, "diff_ci_low": None, "diff_ci_high": None, "verdict": None,
             **{f"{m}_{s}": None for m in ("mean_R@1", "i2t_R@1", "t2i_R@1", "mutual_knn", "cknna")
                for s in ("mean", "std")}}
    line = summary_lines([entry], "msam")[-1]
    assert line == ("| sam | 0.01 | 0.05 | 2 (2 diverged) | — | — | — | — ± — | — | +1.0 (n = 2: no interval) "
                    "| — |")
    assert [cell(entry) for _, cell in summary_columns([entry], terminal=True)] == ["—", "—", "—", "—"]
    assert diff_text({**entry, "diff_vs_ref": math.nan}) == "—" and share_text(None) == "—"
    rob = {"optimizer": "sam", "configs": 3, "within_95pct_val": math.nan, "best_val": None, "best_test": math.nan,
           "worst_val": None, "worst_test": None, "worst_lr": 0.01, "worst_rho": 1.0, "diverged_configs": 3,
           "runs": 6, "diverged_runs": 6, "collapsed_runs": None, "collapse_measured": 0}
    assert robustness_lines([rob])[-1] == "| sam | 3 | — | — | — | — (0.01, 1) | — | 3 | 6/6 | — |"
