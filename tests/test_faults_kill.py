"""kill -9 at chosen moments of `align train`, `align compare` and `align embed`, then the same command again:
the results are byte-identical to an uninterrupted run (weights, metrics log, results.csv and report, arrays).

Every command runs in a child forked by tests/fault_driver.py, which dies with SIGKILL at its kill point: the
Nth ``os.replace`` onto a given file name (the moment an atomic write makes a file appear) or the Nth call of a
function. A kill point that is never reached fails the test (the child then exits instead of being killed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faults import assert_same_run, files_under, same_bytes
from helpers import make_cache, train_config

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "fault_driver.py"


def run_driver(folder: Path, steps: list[dict], preload: list[str] = ()) -> list[dict]:
    """Run ``steps`` ({"argv", "kill"}) one after another in forked children → their outcomes, logs included."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, step in enumerate(steps):
        step["log"] = str(folder / f"step-{i:02d}.log")
    (folder / "plan.json").write_text(json.dumps({"steps": steps, "preload": list(preload), "threads": 1}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(DRIVER), str(folder / "plan.json"), str(folder / "result.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imports, *outcomes = json.loads((folder / "result.json").read_text())
    for step, outcome in zip(steps, outcomes):
        outcome["log"] = Path(step["log"]).read_text(errors="replace")
    return outcomes


# -- align train --------------------------------------------------------------------------------------------

TRAIN_STEPS = 60
# name → (kill point, what the killed run must have left behind)
TRAIN_KILLS = {
    # after SAM's first pass moved the weights to θ + δ, before the second pass: the in-memory state is mid-step
    "mid-step (between SAM's two passes)": {"call": "align.train.pack:HeadPack._grads", "nth": 76},
    "during a checkpoint's tensor write": {"replace": "step-0000030.safetensors"},
    "between a checkpoint's two halves": {"replace": "step-0000045.json"},
    "between the best head's two halves": {"replace": "best.json", "nth": 2},
    "during the final evaluation": {"call": "align.train.evaluation:RunEvaluator.evaluate", "nth": 1},  # test metrics of the best head
    "before results.json": {"replace": "results.json"},
}


@pytest.fixture(scope="module")
def train_kills(tmp_path_factory) -> dict:
    """One driver run: the uninterrupted reference, then each kill point followed by `--resume`; and one run
    killed twice (the second time while resuming)."""
    root = tmp_path_factory.mktemp("train-kills")
    data = make_cache(root / "cache")
    cfg = train_config(data, optim={"name": "msam", "lr": 1e-2, "rho": 0.05, "base": "adamw"},
                       schedule={"steps": TRAIN_STEPS, "batch_size": 64, "warmup_steps": 5},
                       eval={"every": 20, "sharpness_batches": 1, "hessian_iters": 2, "hutchinson_samples": 2,
                             "sharpness_ascent_steps": 1},
                       checkpoint_every=15, loss_at_step=50)
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))

    def train(run: str, kill: dict | None = None) -> dict:
        return {"argv": ["train", "--config", str(config), "--out", str(root / run), "--no-progress"], "kill": kill}

    def resume(run: str, kill: dict | None = None) -> dict:
        return {"argv": ["train", "--config", str(root / run / "config.yaml"), "--resume", "--no-progress"],
                "kill": kill}

    steps = [train("reference")]
    for i, kill in enumerate(TRAIN_KILLS.values()):
        steps += [train(f"kill{i}", kill), resume(f"kill{i}")]
    steps += [train("twice", {"call": "align.train.pack:HeadPack._grads", "nth": 40}),
              resume("twice", {"replace": "step-0000045.json"}), resume("twice")]
    outcomes = run_driver(root / "driver", steps, preload=["faiss", "safetensors.torch"])
    return {"root": root, "outcomes": outcomes}


@pytest.mark.parametrize("index, name", list(enumerate(TRAIN_KILLS)), ids=list(TRAIN_KILLS))
def test_train_killed_then_resumed_is_byte_identical(train_kills, index, name):
    root, outcomes = train_kills["root"], train_kills["outcomes"]
    assert outcomes[0] == dict(outcomes[0], killed=False, code=0), outcomes[0]["log"]
    killed, resumed = outcomes[1 + 2 * index], outcomes[2 + 2 * index]
    assert killed["killed"], f"the kill point was never reached: {killed['log'][-2000:]}"
    run = root / f"kill{index}"
    assert resumed["code"] == 0 and not resumed["killed"], resumed["log"][-2000:]
    assert "resuming" in resumed["log"] and "Traceback" not in resumed["log"]
    assert_same_run(root / "reference", run, TRAIN_STEPS)


def test_train_killed_twice_once_while_resuming_is_byte_identical(train_kills):
    root, outcomes = train_kills["root"], train_kills["outcomes"]
    first, second, last = outcomes[-3:]
    assert first["killed"] and second["killed"], (first["log"][-1000:], second["log"][-1000:])
    assert last["code"] == 0, last["log"][-2000:]
    assert_same_run(root / "reference", root / "twice", TRAIN_STEPS)


# -- align compare ------------------------------------------------------------------------------------------

STUDY_STEPS = 30
CELLS = ["sgd_lr0.01_s0", "sgd_lr0.01_s1", "sam_lr0.01_rho0.05_s0", "sam_lr0.01_rho0.05_s1"]
COMPARE_KILLS = {
    "mid-cell (third cell, between its checkpoint's halves)": {"replace": "step-0000020.json", "nth": 3},
    "between cells (second cell just finished)": {"replace": "results.json", "nth": 2, "when": "after"},
    "during the report's tables": {"replace": "summary.csv"},
}
MORE_COMPARE_KILLS = {  # slow: each reruns the plots
    "during the plots": {"replace": "*.png", "nth": 2},
    "before report.md": {"replace": "report.md"},
}
STUDY_FILES = ["results.csv", "summary.csv", "robustness.csv", "table3.csv", "report.md"]
STUDY_PRELOAD = ["faiss", "matplotlib.pyplot", "safetensors.torch", "open_clip"]  # the study checks encoder names


def compare_step(study: Path, config: Path, kill: dict | None = None) -> dict:
    return {"argv": ["compare", "--config", str(config), "--out", str(study), "--no-progress"], "kill": kill}


def kill_and_rerun(root: Path, config: Path, kills: dict, prefix: str) -> list[dict]:
    return [step for i, kill in enumerate(kills.values())
            for step in (compare_step(root / f"{prefix}{i}", config, kill), compare_step(root / f"{prefix}{i}", config))]


@pytest.fixture(scope="module")
def compare_kills(tmp_path_factory) -> dict:
    """One driver run: an uninterrupted 4-cell study (cells in the main process), then each kill point followed
    by the same command."""
    root = tmp_path_factory.mktemp("compare-kills")
    data = make_cache(root / "cache")
    cfg = train_config(data, schedule={"steps": STUDY_STEPS, "batch_size": 64, "warmup_steps": 3},
                       eval={"every": 10, "sharpness_batches": 1, "hessian_iters": 2, "hutchinson_samples": 2,
                             "sharpness_ascent_steps": 1},
                       checkpoint_every=10, loss_at_step=20)
    cfg.update(name="kills", workers=1, reference="sam", bootstrap_samples=200,
               grid={"optimizers": ["sgd", "sam"], "lrs": [0.01], "rhos": [0.05], "seeds": [0, 1]})
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    steps = [compare_step(root / "reference", config)] + kill_and_rerun(root, config, COMPARE_KILLS, "kill")
    return {"root": root, "config": config, "outcomes": run_driver(root / "driver", steps, STUDY_PRELOAD)}


def assert_same_study(ref: Path, got: Path) -> None:
    """The same files (no temporary one left), byte-identical tables, report and plots, and each cell the same."""
    assert files_under(got) == files_under(ref)
    for name in STUDY_FILES + [p for p in files_under(ref) if p.endswith(".png")]:
        assert same_bytes(ref / name, got / name), name
    for cell in CELLS:
        assert_same_run(ref / "runs" / cell, got / "runs" / cell, STUDY_STEPS)


def check_kill_and_rerun(root: Path, killed: dict, rerun: dict, study: str) -> None:
    assert killed["killed"], f"the kill point was never reached: {killed['log'][-2000:]}"
    assert rerun["code"] == 0 and not rerun["killed"], rerun["log"][-2000:]
    assert_same_study(root / "reference", root / study)


@pytest.mark.parametrize("index, name", list(enumerate(COMPARE_KILLS)), ids=list(COMPARE_KILLS))
def test_compare_killed_then_rerun_is_byte_identical(compare_kills, index, name):
    root, outcomes = compare_kills["root"], compare_kills["outcomes"]
    assert outcomes[0]["code"] == 0, outcomes[0]["log"][-2000:]
    check_kill_and_rerun(root, outcomes[1 + 2 * index], outcomes[2 + 2 * index], f"kill{index}")


def test_the_study_reference_has_every_cell(compare_kills):
    """The grid ran as planned (so the byte comparisons above compare something)."""
    ref = compare_kills["root"] / "reference"
    lines = (ref / "results.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == CELLS


@pytest.mark.slow
def test_compare_killed_during_the_plots_or_before_the_report_reruns_byte_identical(compare_kills):
    root, config = compare_kills["root"], compare_kills["config"]
    outcomes = run_driver(root / "driver-more", kill_and_rerun(root, config, MORE_COMPARE_KILLS, "more"),
                          STUDY_PRELOAD)
    for index in range(len(MORE_COMPARE_KILLS)):
        check_kill_and_rerun(root, outcomes[2 * index], outcomes[2 * index + 1], f"more{index}")


@pytest.mark.slow
def test_compare_with_workers_killed_from_outside_reruns_byte_identical(compare_kills):
    """The real thing: two worker processes train cells; the main process gets SIGKILL (from outside, at a
    moment seen on disk); its workers exit by themselves; the same command again finishes the study."""
    import fcntl
    import signal
    import time

    root, config = compare_kills["root"], compare_kills["config"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def command(study: Path) -> list[str]:
        return [sys.executable, "-c", "from align.cli.main import app; app()", "compare", "--config", str(config),
                "--out", str(study), "--no-progress", "--set", "workers=2"]

    # Its own reference, run the same way: a cell's thread count (cores // workers) depends on the machine.
    reference = subprocess.run(command(root / "workers-reference"), cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-2000:]
    study = root / "workers"
    argv = command(study)
    main = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list(study.glob("runs/*/checkpoints/step-0000020.json")):  # a cell is mid-way
        assert main.poll() is None and time.monotonic() < deadline, "the study ended before the kill"
        time.sleep(0.02)
    main.send_signal(signal.SIGKILL)
    main.wait(timeout=60)
    assert not (study / "results.csv").exists()

    def free(lock: Path) -> bool:  # no worker holds the cell any more
        with open(lock, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            return True

    while not all(free(lock) for lock in study.glob("runs/*/.lock")):
        assert time.monotonic() < deadline, "workers outlived the killed main process"
        time.sleep(0.1)
    rerun = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_same_study(root / "workers-reference", study)


# -- align embed --------------------------------------------------------------------------------------------

EMBED_KILLS = {
    "mid image shard (array written, its record not)": {"replace": "image-00001.json"},
    "during the caption shards (temporary file left)": {"replace": "text-00002.npy"},
    "during the final arrays (image.npy written, text.npy not)": {"replace": "image.npy", "when": "after"},
    "before the manifest": {"replace": "manifest.json"},
}
ARRAYS = ["image.npy", "text.npy", "caption_to_image.npy", "image_rows.npy", "caption_rows.npy"]


@pytest.fixture(scope="module")
def embed_kills(tmp_path_factory, tiny_dir) -> dict:
    """A tiny random open_clip model, 130 images × 2 captions in shards of 64 (a shard is whole 64-row micro-batches:
    3 image shards, 5 caption shards): a reference embedding, then each kill point followed by the same command."""
    root = tmp_path_factory.mktemp("embed-kills")
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    config = root / "embed.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"kind": "synthetic", "synthetic": {"train_images": 130, "val_images": 2, "test_images": 2,
                                                       "image_size": 32, "captions_per_image": 2}},
        "splits": ["train"], "image_encoder": encoder, "text_encoder": encoder,
        "batch_size": 32, "shard_size": 64, "device": "cpu"}))

    def embed(cache: str, kill: dict | None = None) -> dict:
        return {"argv": ["embed", "--config", str(config), "--set", f"cache_root={root / cache}", "--no-progress"],
                "kill": kill}

    steps = [embed("reference")]
    for i, kill in enumerate(EMBED_KILLS.values()):
        steps += [embed(f"kill{i}", kill), embed(f"kill{i}")]
    outcomes = run_driver(root / "driver", steps, preload=["open_clip", "align.data.encoders", "align.data.datasets"])
    return {"root": root, "outcomes": outcomes}


@pytest.mark.slow
@pytest.mark.parametrize("index, name", list(enumerate(EMBED_KILLS)), ids=list(EMBED_KILLS))
def test_embed_killed_then_rerun_is_byte_identical(embed_kills, index, name):
    root, outcomes = embed_kills["root"], embed_kills["outcomes"]
    assert outcomes[0]["code"] == 0, outcomes[0]["log"][-2000:]
    killed, rerun = outcomes[1 + 2 * index], outcomes[2 + 2 * index]
    assert killed["killed"], f"the kill point was never reached: {killed['log'][-2000:]}"
    assert rerun["code"] == 0 and not rerun["killed"], rerun["log"][-2000:]
    (ref,) = (root / "reference").iterdir()
    (got,) = (root / f"kill{index}").iterdir()
    assert got.name == ref.name  # the same cache key
    assert files_under(got) == files_under(ref)  # work/ and every temporary file are gone
    for name in ARRAYS:
        assert same_bytes(ref / name, got / name), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, got))
    assert a["files"] == b["files"] and a["counts"] == b["counts"] and a["dims"] == b["dims"]
    assert b["run"]["resumed"] is True and a["run"]["resumed"] is False  # the rerun reused the finished shards
