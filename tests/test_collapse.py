"""Collapse counted as the paper counts divergence: a run's longest stretch of consecutive steps on the uniform
plateau (|L − L_u| ≤ uniform_plateau_tol · L_u), "collapsed" from collapse_fraction of its steps on, counted in a
pack head by head, resumed exactly, refused when out of range, out of the config hash at its defaults, and counted
by a study's robustness table and Table 3 (with "—" for results written before the count existed)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from align.study import stats
from align.study.report import collapse_rule, collapsed_text, robustness_lines, table3_lines
from align.train.checkpoint import LoopState
from align.train.config import TrainConfig
from align.train.collapse import collapse_steps
from align.train.run import Run
from helpers import data_section, make_cache, train_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def longest_plateau(losses: list[float], uniform: float, tol: float) -> int:
    """The longest stretch of consecutive losses with |L − uniform| ≤ tol · uniform, counted by hand."""
    best = current = 0
    for loss in losses:
        current = current + 1 if abs(loss - uniform) <= tol * uniform else 0
        best = max(best, current)
    return best


def train_losses(run: Path) -> list[float]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["kind"] == "train"]


class _Log:
    """A run directory that keeps the metrics records in memory."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def append_metrics(self, record: dict) -> None:
        self.records.append(record)


def _run(tmp_path: Path, **top) -> Run:
    cfg = TrainConfig.model_validate(train_config(data_section(tmp_path), **top))
    return Run(cfg, _Log(), sampler=None, model=None, rng={}, hparams={})


def test_a_step_counts_as_collapsed_only_within_the_tolerance_relative_to_the_uniform_loss(tmp_path):
    """The stretch breaks on a loss just outside 5% of ln B on either side, and the longest one is kept."""
    run = _run(tmp_path, schedule={"steps": 40, "warmup_steps": 0})
    u = math.log(64)
    factors = [1.0, 1.0499, 0.9501, 1.0501, 1.0, 1.0, 1.0, 1.0, 0.9499, 1.02, 3.0, 1.0] + [0.1] * 4
    losses = [u * f for f in factors]
    for loss in losses:
        run.log_step({"loss": loss, "lr": 1e-3, "log_scale": 2.0, "grad_norm": 0.3}, u)
    assert run.state.longest_plateau == longest_plateau(losses, u, 0.05) == 4  # steps 5–8
    assert run.state.plateau == 0 and run.state.diverged is None  # ‖g‖ = 0.3: the divergence detector stays quiet
    assert run.collapsed() is True  # 4 ≥ 0.1 · 40
    longer = run.cfg.model_copy(update={"schedule": run.cfg.schedule.model_copy(update={"steps": 41})})
    assert Run(longer, _Log(), None, None, {}, {}, state=run.state).collapsed() is False  # 4 < ⌈4.1⌉


def test_the_collapse_threshold_takes_the_fraction_as_written_not_as_its_binary_double():
    assert collapse_steps(0.1, 200) == 20
    assert collapse_steps(0.1, 300) == 30  # math.ceil(0.1 * 300) is 31
    assert collapse_steps(0.07, 100) == 7  # math.ceil(0.07 * 100) is 8
    assert collapse_steps(0.15, 10) == 2 and collapse_steps(1.0, 50) == 50 and collapse_steps(1e-9, 10) == 1


def test_a_checkpoint_written_before_plateaus_were_counted_resumes_with_an_unknown_plateau():
    """Its earlier steps cannot be recounted: the run reports None ('—'), never a count of the resumed part."""
    state = LoopState(step=30, plateau=7, longest_plateau=12)
    back = LoopState.from_json(state.to_json(1.0), None)
    assert (back.plateau, back.longest_plateau) == (7, 12)
    old = {k: v for k, v in state.to_json(1.0).items() if k not in ("plateau", "longest_plateau")}
    back = LoopState.from_json(old, None)
    assert back.longest_plateau is None and back.plateau == 0


def test_each_head_of_a_pack_counts_its_own_plateau(tmp_path):
    from align.common.config import validate
    from align.train.loop import train_pack

    data = make_cache(tmp_path / "cache")
    cells = [{"name": "msam", "lr": 1e-2, "rho": 0.05, "base": "adamw"}, {"name": "adamw", "lr": 1e-3}]
    cfgs = [validate(TrainConfig, train_config(data, optim=o, schedule={"steps": 40, "warmup_steps": 5},
                                                eval={"every": 20, "sharpness": False}, uniform_plateau_tol=0.5,
                                                collapse_fraction=0.5))
            for o in cells]
    dirs = [tmp_path / "msam", tmp_path / "adamw"]
    results = train_pack(cfgs, dirs, progress=False)
    counts = [longest_plateau(train_losses(d), math.log(64), 0.5) for d in dirs]
    assert [r["uniform_plateau_steps"] for r in results] == counts
    assert counts[0] != counts[1] and min(counts) > 0  # each its own, not the pack's
    assert [r["collapsed"] for r in results] == [c >= 20 for c in counts]


@pytest.mark.parametrize("key, value", [("uniform_plateau_tol", 0), ("uniform_plateau_tol", 1.0),
                                        ("uniform_plateau_tol", float("nan")), ("uniform_plateau_tol", float("inf")),
                                        ("uniform_plateau_tol", True), ("collapse_fraction", 0),
                                        ("collapse_fraction", 1.5), ("collapse_fraction", float("nan")),
                                        ("collapse_fraction", True)])
def test_a_tolerance_or_fraction_out_of_range_is_refused_at_load(tmp_path, key, value):
    with pytest.raises(ValidationError, match=key):
        TrainConfig.model_validate(train_config(data_section(tmp_path), **{key: value}))


def test_the_plateau_keys_at_their_defaults_leave_the_config_hash_as_it_was(tmp_path):
    from align.train.config import hashed_config
    from align.train.identity import config_hash

    cfg = TrainConfig.model_validate(train_config(data_section(tmp_path)))
    before = {k: v for k, v in cfg.model_dump(mode="json").items()
              if k not in ("out_dir", "device", "uniform_plateau_tol", "collapse_fraction", "report_to",
                           "report_group")}
    del before["loss"]["local"], before["loss"]["block_rows"], before["optim"]["perturbation"]
    del before["eval"]["sharpness_final"], before["schedule"]["order"], before["schedule"]["block_rows"]
    for key in ("rho_min", "sigma", "lmbda", "k"):  # issue 24's method keys (test_distributed_train checks them)
        del before["optim"][key]
    del before["head"]["activation"], before["head"]["rescale"], before["eval"]["sharpness_geometries"]  # issue 25
    assert config_hash(hashed_config(cfg)) == config_hash(before)
    for key, value in (("uniform_plateau_tol", 0.1), ("collapse_fraction", 0.2)):
        changed = cfg.model_copy(update={key: value})
        assert config_hash(hashed_config(changed)) == config_hash({**before, key: value})


# -- a study's counts ------------------------------------------------------------------------------------------

def _row(optimizer: str, lr: float, rho: float | None, seed: int, collapsed, status: str = "ok") -> dict:
    return {"optimizer": optimizer, "lr": lr, "rho": rho, "seed": seed, "status": status, "collapsed": collapsed,
            "best_val_mean_R@1": 0.5, "best_test_mean_R@1": 0.5, "max_val_mutual_knn": 0.3, "loss_at_step": 4.8,
            "final_loss": 3.0}


ROWS = ([_row("sam", 0.01, 1.0, s, c) for s, c in enumerate([True, True, False, True, None])]
        + [_row("sam", 0.01, 0.05, s, False, "diverged" if s == 0 else "ok") for s in range(5)]
        + [_row("msam", 0.01, 1.0, s, None) for s in range(5)])


def test_table3_and_robustness_count_collapsed_runs_beside_diverged_ones():
    t3 = {(r["lr"], r["rho"]): r for r in stats.table3(ROWS, "sam")}
    assert (t3[(0.01, 1.0)]["collapsed"], t3[(0.01, 1.0)]["collapse_measured"]) == (3, 4)  # one seed unknown
    assert (t3[(0.01, 0.05)]["collapsed"], t3[(0.01, 0.05)]["diverged"]) == (0, 1)
    assert stats.table3(ROWS, "msam")[0]["collapsed"] is None
    rob = {r["optimizer"]: r for r in stats.robustness(ROWS)}
    assert (rob["sam"]["runs"], rob["sam"]["diverged_runs"], rob["sam"]["collapsed_runs"],
            rob["sam"]["collapse_measured"]) == (10, 1, 3, 9)
    assert rob["msam"]["collapsed_runs"] is None and collapsed_text(None, 0) == "—"
    line = robustness_lines([rob["sam"], rob["msam"]])
    assert line[2].endswith("| 1 | 1/10 | 3/9 |") and line[3].endswith("| 0 | 0/5 | — |")


def test_table3_marks_collapsed_and_diverged_seeds_and_a_dash_where_nothing_was_counted():
    header, _, row = table3_lines(stats.table3(ROWS, "sam"), 100)
    assert header == "| lr \\ ρ | 0.05 | 1 |"
    assert row == "| 0.01 | 0.300 / 4.800 / 3.000 †1/5 diverged | 0.300 / 4.800 / 3.000 †3/4 collapsed |"
    assert table3_lines(stats.table3(ROWS, "msam"), 100)[2].endswith("(collapse —) |")


def test_the_report_states_the_collapse_threshold_in_numbers(tmp_path):
    from align.study.config import CompareConfig

    base = train_config(data_section(tmp_path), schedule={"steps": 300, "batch_size": 128, "warmup_steps": 10})
    cfg = CompareConfig.model_validate(base)
    text = collapse_rule(cfg)
    assert f"ln 128 = {math.log(128):.3f}" in text and "|L − L_u| ≤ 0.05 · L_u" in text
    assert "at least 30 consecutive steps" in text and "of its 300 steps" in text
    siglip = CompareConfig.model_validate({**base, "loss": {"kind": "siglip"}, "uniform_plateau_tol": 0.1,
                                           "collapse_fraction": 0.25})
    from align.train.collapse import uniform_loss

    text = collapse_rule(siglip)
    assert f"{uniform_loss('siglip', 128):.3f}, the siglip loss at its best constant logit" in text
    assert "|L − L_u| ≤ 0.1 · L_u" in text and "at least 75 consecutive steps" in text
