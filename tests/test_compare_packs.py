"""`align compare` in packs: how cells are packed, the memory budget, and a packed study killed with SIGKILL then
rerun, against the same study uninterrupted (bit for bit) and trained one cell at a time (to float noise)."""
from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from align.cli.main import app
from align.study.config import Cell
from align.study.packing import plan_packs
from helpers import IMAGE_DIM, SIZES, TEXT_DIM, make_cache, synthetic_split, train_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _cells(optimizers, seeds=(0, 1), lrs=(0.1, 0.2)):
    return [Cell(o, lr, None if o in ("sgd", "adamw") else 0.05, s) for o in optimizers for lr in lrs for s in seeds]


def test_packs_hold_one_sam_family_optimizer_or_single_pass_ones_with_seeds_together():
    cells = _cells(["sgd", "sam", "msam", "adamw"])
    packs = plan_packs(cells, limit=3, workers=2)
    assert sorted(c.key for p in packs for c in p) == sorted(c.key for c in cells)  # every cell once
    for p in packs:
        assert len(p) <= 3
        assert len({c.optimizer if c.optimizer in ("sam", "msam") else None for c in p}) == 1
        assert [c.seed for c in p] == sorted(c.seed for c in p)
    # SAM's 4 cells and M-SAM's 4, at most 3 a pack: 2 packs each; the 8 single-pass ones: 3 packs; the two-pass
    # packs (twice the work per head) first.
    assert [len(p) for p in packs] == [2, 2, 2, 2, 3, 3, 2]
    assert all(p[0].optimizer in ("sam", "msam") for p in packs[:4])
    # Fewer cells than the limit still spread over the workers; one worker and a large limit: one pack per method.
    assert [len(p) for p in plan_packs(_cells(["sam"]), limit=100, workers=2)] == [2, 2]
    assert sorted(len(p) for p in plan_packs(cells, limit=100, workers=1)) == [4, 4, 8]
    # A large study is cut into packs of about a third of a worker's share of the work.
    many = _cells(["sam", "msam"], seeds=range(5), lrs=[0.1 * i for i in range(1, 11)])  # 50 cells each
    assert sorted(len(p) for p in plan_packs(many, limit=1000, workers=2)) == [16, 16, 17, 17, 17, 17]


@pytest.fixture(scope="module")
def study_file(tmp_path_factory) -> Path:
    """A 14-cell study (SGD at one lr, AdamW, SAM and M-SAM at two, two seeds) on the training tests' embeddings."""
    root = tmp_path_factory.mktemp("packs")
    data = make_cache(root / "cache")
    cfg = train_config(data, schedule={"steps": 60, "batch_size": 64, "warmup_steps": 5},
                       eval={"every": 20, "sharpness_batches": 1, "hessian_iters": 2, "hutchinson_samples": 2,
                             "sharpness_ascent_steps": 1}, checkpoint_every=20, loss_at_step=30)
    cfg.pop("optim")
    cfg.update(name="packs", workers=2, bootstrap_samples=200, optim={"base": "adamw", "weight_decay": 1e-4},
               grid={"optimizers": ["sgd", "adamw", "sam", "msam"], "lrs": [0.01, 0.03], "rhos": [0.05],
                     "seeds": [0, 1], "lr_overrides": {"sgd": [1.0]}})
    path = root / "study.yaml"
    path.write_text("# align compare --config study.yaml\n" + yaml.safe_dump(cfg))
    return path


def test_pack_options_and_a_budget_too_small_for_one_head_are_one_line_errors(study_file, tmp_path):
    for args, words in ((["--pack", "0"], "--pack"), (["--pack", "many"], "--pack"),
                        (["--memory-budget", "lots"], "--memory-budget"),
                        (["--memory-budget", "4K"], "cannot hold one head")):
        result = runner.invoke(app, ["compare", "--config", str(study_file), "--out", str(tmp_path / "s"),
                                     "--no-progress", *args])
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and words in errors[0], result.output  # one line (after the cache's own log lines)
    assert not (tmp_path / "s" / "runs").exists()  # refused before any cell started


def test_the_pack_limit_is_what_each_workers_share_of_the_budget_holds(study_file):
    from align.study.config import CompareConfig, cell_config, grid_cells
    from align.study.packing import pack_limit
    from align.common.config import load_config
    from align.common.errors import AlignError
    from align.train.memory import OptimizerMemory, head_memory
    from align.train.run_data import prepare_data

    cfg = load_config(CompareConfig, study_file)
    sized, data = prepare_data(cell_config(cfg, grid_cells(cfg.grid)[0], Path(".")))
    assert (sized.head.out_dim, sized.image_dim, sized.text_dim, sized.schedule.batch_size) == (32, 32, 24, 64)
    eval_rows = data.val.num_images + data.val.num_captions
    per_head = head_memory(sized, eval_rows, OptimizerMemory()).bytes
    held = _data_bytes(eval_rows)
    assert pack_limit(cfg, "auto", (int(3.5 * per_head) + held) * 2, workers=2) == 3
    assert pack_limit(cfg, 2, (int(3.5 * per_head) + held) * 2, workers=2) == 2
    assert pack_limit(cfg, 5, int(3.5 * per_head) + held, workers=1) == 3  # the budget caps an explicit size
    assert pack_limit(cfg, "auto", per_head + held, workers=1) == 1
    with pytest.raises(AlignError, match="cannot hold one head"):
        pack_limit(cfg, "auto", per_head + held - 1, workers=1)  # the data's bytes are not the heads'


def _data_bytes(eval_rows: int, seeds: int = 2, batch: int = 64) -> int:
    """What a pack of the study holds of its data, counted by hand: for each of the grid's seeds (a group of heads
    that share batches), the batch computing and the one read ahead, of 32 + 24 float32 values a row; and the
    validation rows (fewer than one chunk) at the wider side, 32 values."""
    return 4 * (seeds * 2 * batch * (IMAGE_DIM + TEXT_DIM) + eval_rows * max(IMAGE_DIM, TEXT_DIM))


def _head_bytes_for(cfg, eval_rows: int) -> int:
    """One head's bytes by the memory model (tests/test_memory.py checks it against a hand count), for the training
    tests' embedding dims and ``eval_rows`` rows, at the most any optimizer keeps."""
    from align.train.memory import OptimizerMemory, head_memory

    sized = cfg.model_copy(update={"image_dim": IMAGE_DIM, "text_dim": TEXT_DIM})
    return head_memory(sized, eval_rows, OptimizerMemory(metric=bool(cfg.optim.metric_beta))).bytes


@pytest.fixture
def no_split_loads(monkeypatch):
    """Make every way of reading a cache's arrays fail: the planning path must get by on manifests."""
    import align.cache.read as read
    import align.train.run_data as run_data

    def refuse(*args, **kwargs):
        raise AssertionError("a split's arrays were read while planning")

    for owner, name in ((read, "load_cache_dir"), (read, "load_cached_split"), (read, "_open_array"),
                        (run_data, "load_cached_split"), (run_data, "load_data"), (run_data, "prepare_data")):
        monkeypatch.setattr(owner, name, refuse)


def test_the_parent_sizes_heads_from_the_manifests_and_never_loads_a_split(study_file, tmp_path, no_split_loads):
    from align.common.config import load_config
    from align.common.errors import AlignError
    from align.study.config import CompareConfig, grid_cells
    from align.study.packing import pack_layout, pack_limit
    from align.study.studies import StudyDir

    cfg = load_config(CompareConfig, study_file)
    image, text, _ = synthetic_split("val", SIZES["val"])  # what make_cache wrote: 1 to 3 captions per image
    held = _data_bytes(len(image) + len(text))
    per_head = _head_bytes_for(cfg, len(image) + len(text))
    assert pack_limit(cfg, "auto", per_head + held, workers=1) == 1  # exactly one head's and the data's bytes
    with pytest.raises(AlignError, match="cannot hold one head"):
        pack_limit(cfg, "auto", per_head + held - 1, workers=1)
    assert pack_limit(cfg, "auto", (int(3.5 * per_head) + held) * 2, workers=2) == 3

    # The planning run_study does (rank 0): the layout, recorded in packs.json, within the budget's limit.
    study = StudyDir(tmp_path / "study")
    cells = grid_cells(cfg.grid)
    packs, threads = pack_layout(cfg, study, cells, "auto", 2 * (per_head + held))
    assert max(len(p) for p in packs) == 1 and sorted(c.key for p in packs for c in p) == sorted(c.key for c in cells)
    assert study.read_pack_layout() == {"threads": threads, "packs": [[c.key for c in p] for p in packs]}


def test_held_out_validation_is_sized_at_the_training_splits_mean_captions(study_file, no_split_loads):
    from align.common.config import load_config
    from align.common.errors import AlignError
    from align.study.config import CompareConfig
    from align.study.packing import pack_limit

    cfg = load_config(CompareConfig, study_file, ["eval.holdout_images=100"])
    image, text, _ = synthetic_split("train", SIZES["train"])
    rows = 100 + math.ceil(100 * len(text) / len(image))
    per_head = _head_bytes_for(cfg, rows) + _data_bytes(rows)
    assert pack_limit(cfg, "auto", per_head, workers=1) == 1
    with pytest.raises(AlignError, match="cannot hold one head"):
        pack_limit(cfg, "auto", per_head - 1, workers=1)


@pytest.mark.parametrize("override, line", [
    ("eval.knn_k=500", "eval.knn_k=500 needs more than 500 images but the validation split has 128"),
    ("image_dim=7", "image_dim=7 in the config but the cached synthetic embeddings have image dimension 32"),
    ("eval.holdout_images=512", "eval.holdout_images=512 must be between 1 and the 511 training images"),
])
def test_splits_that_do_not_fit_their_roles_are_refused_while_planning(study_file, tmp_path, no_split_loads,
                                                                          override, line):
    """The parent checks the splits' roles from the manifests before a pack layout is written, with the line a
    run's own loading gives (SIZES: 512 training and 128 validation images, 32-d image embeddings)."""
    from align.common.config import load_config
    from align.common.errors import AlignError
    from align.study.config import CompareConfig, grid_cells
    from align.study.packing import pack_layout
    from align.study.studies import StudyDir

    cfg = load_config(CompareConfig, study_file, [override])
    study = StudyDir(tmp_path / "study")
    with pytest.raises(AlignError) as refused:
        pack_layout(cfg, study, grid_cells(cfg.grid), "auto", 1 << 30)
    assert str(refused.value).startswith(line), str(refused.value)
    assert not study.packs_path.exists()


def test_a_missing_cache_is_the_loaders_one_line_when_sizing_a_head(study_file, tmp_path):
    from align.common.config import load_config
    from align.common.errors import AlignError
    from align.study.config import CompareConfig
    from align.study.packing import pack_limit

    cfg = load_config(CompareConfig, study_file, [f"data.cache_root={tmp_path / 'empty'}"])
    with pytest.raises(AlignError, match=r"^no cached embeddings for split 'train' \(key .*\): run `align embed "
                                         r"--config FILE` with this config first$"):
        pack_limit(cfg, "auto", "1G", workers=1)


# A worker of the killed study: SIGKILL the study's main process right after one cell logs a given step.
KILLER = textwrap.dedent("""
    import os, signal
    target = os.environ.get("ALIGN_TEST_KILL_AT")
    if target:
        import align.train.run_dir as run_dir
        run_name, step = target.rsplit(":", 1)
        original = run_dir.append_metrics

        def append_then_maybe_kill(run, record):
            original(run, record)
            if os.path.basename(str(run)) == run_name and record.get("kind") == "train" \\
                    and record["step"] == int(step):
                os.kill(os.getppid(), signal.SIGKILL)  # the study's main process: no cleanup at all
                os._exit(1)

        run_dir.append_metrics = append_then_maybe_kill
""")


def _compare(study_file: Path, out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align.cli.main", "compare", "--config", str(study_file), "--out",
                           str(out), "--no-progress", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_a_packed_study_killed_then_rerun_writes_the_uninterrupted_bytes_and_one_cell_at_a_time_agrees(study_file,
                                                                                                     tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'hook'}{os.pathsep}{REPO}")
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILLER)  # imported by every process, workers included
    whole = _compare(study_file, tmp_path / "whole", env=env)
    assert whole.returncode == 0, whole.stderr
    killed = _compare(study_file, tmp_path / "packed", env=dict(env, ALIGN_TEST_KILL_AT="msam_lr0.03_rho0.05_s1:45"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "packed" / "results.csv").exists()
    runs_dir = tmp_path / "packed" / "runs"
    assert not (runs_dir / "msam_lr0.03_rho0.05_s1" / "results.json").exists()
    rerun = _compare(study_file, tmp_path / "packed", "--pack", "1", env=env)  # the recorded layout wins
    assert rerun.returncode == 0, rerun.stderr
    assert "pack(s)" in rerun.stdout
    assert (tmp_path / "packed" / "results.csv").read_bytes() == (tmp_path / "whole" / "results.csv").read_bytes()
    # One cell at a time: other matmul shapes, so BLAS may sum in another order; the same numbers to float noise.
    alone = _compare(study_file, tmp_path / "alone", "--pack", "1", env=env)
    assert alone.returncode == 0, alone.stderr
    rows = [list(csv.DictReader(open(tmp_path / name / "results.csv"))) for name in ("whole", "alone")]
    assert len(rows[0]) == len(rows[1]) == 14
    for a, b in zip(*rows):
        assert a["run"] == b["run"] and a["status"] == b["status"]
        assert abs(float(a["best_test_mean_R@1"]) - float(b["best_test_mean_R@1"])) <= 0.01, a["run"]


def test_the_study_bar_moves_with_every_packs_steps_and_ends_on_the_cell_count():
    from align.study.workers import _PackProgress

    class Bar:
        done = 0.0

        def set(self, completed: float) -> None:
            self.done = completed

    bar = Bar()
    progress = _PackProgress(bar, steps=10, sizes=[3, 2], start=4)  # 4 cells finished before this run
    for _ in range(4):  # pack 0: 4 steps of 3 heads = 12 head-steps of its 30
        progress.put((0, 3))
    assert bar.done == pytest.approx(5.2)
    for _ in range(12):  # pack 1: two steps too many never fill it before it finishes
        progress.put((1, 2))
    assert 7.2 - 1e-6 < bar.done < 7.2
    progress.put((0, 1))  # a head of pack 0 diverged early: one head left stepping, then the pack ends
    progress.finish(0)
    progress.finish(1)
    assert bar.done == 9
