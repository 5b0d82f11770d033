"""Bad input at the command line, as a hostile user would type it: every case is one line, exit 2, and changes
nothing on disk. The config values themselves are checked at load by the library (tests/test_config_values.py);
these are the cases that only the commands see: files that are not UTF-8, paths of the wrong kind, a head too
big for memory, knn_k larger than a split, damaged files in a run directory, allocation failures."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from align.cli.main import app
from faults import files_under, one_error_line
from helpers import SIZES, data_section, make_cache, synthetic_split, train_config, write_cache

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
NOT_UTF8 = "optim:\n  name: adamw  # caf\xe9 in Latin-1\n".encode("latin-1")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files_under(folder)} if folder.exists() else {}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A cache, a train config, a finished run, a study config and the odd paths the cases point at."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = make_cache(root / "cache")
    train = root / "train.yaml"
    train.write_text(yaml.safe_dump(train_config(data, schedule={"steps": 20, "batch_size": 64, "warmup_steps": 2},
                                                 eval={"every": 10, "sharpness": False}, checkpoint_every=10)))
    study = root / "study.yaml"
    cfg = yaml.safe_load(train.read_text())
    cfg.update(name="bad", workers=1, grid={"optimizers": ["sam"], "lrs": [0.01], "rhos": [0.05], "seeds": [0]})
    study.write_text(yaml.safe_dump(cfg))
    (root / "latin1.yaml").write_bytes(NOT_UTF8)
    (root / "a-folder").mkdir()
    (root / "a-file").write_text("not a folder\n")
    run = root / "run"
    result = runner.invoke(app, ["train", "--config", str(train), "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "train": train, "study": study, "run": run}


def argv(world: dict, *args: str) -> list[str]:
    """``args`` with {root}, {train}, {study} and {run} filled in."""
    return [a.format(**{k: str(v) for k, v in world.items() if k != "data"}) for a in args]


# (argv, text the one line must contain); every case must also leave the root's files as they were
CASES = {
    "train: config not UTF-8": (["train", "--config", "{root}/latin1.yaml"], "is not UTF-8 text (byte 27 is 0xe9)"),
    "compare: config not UTF-8": (["compare", "--config", "{root}/latin1.yaml"], "is not UTF-8 text"),
    "embed: config not UTF-8": (["embed", "--config", "{root}/latin1.yaml"], "is not UTF-8 text"),
    "train: --config a directory": (["train", "--config", "{root}/a-folder"], "is a directory"),
    "compare: --config a directory": (["compare", "--config", "{root}/a-folder"], "is a directory"),
    "embed: --config a directory": (["embed", "--config", "{root}/a-folder"], "is a directory"),
    "train: --config 5000 characters": (["train", "--config", "x" * 5000], "File name too long"),
    "compare: --config 200 characters": (["compare", "--config", "y" * 200], "…: no such file and no packaged"),
    "eval: --out a directory": (["eval", "{run}", "--out", "{root}/a-folder"], "is a folder: give a file path"),
    "eval: --out inside a file": (["eval", "{run}", "--out", "{root}/a-file/x.json"],
                                  "a-file is a file, so no folder can be made inside it"),
    "train: --out a file": (["train", "--config", "{train}", "--out", "{root}/a-file"], "is a file, not a folder"),
    "train: --out inside a file": (["train", "--config", "{train}", "--out", "{root}/a-file/run"],
                                   "a-file is a file, so no folder can be made inside it"),
    "compare: --out a file": (["compare", "--config", "{study}", "--out", "{root}/a-file"], "is a file, not a folder"),
    "compare: --out inside a file": (["compare", "--config", "{study}", "--out", "{root}/a-file/s"],
                                     "a-file is a file, so no folder can be made inside it"),
    "train: eval.knn_k = the validation split's size": (
        ["train", "--config", "{train}", "--out", "{root}/new", "--set", f"eval.knn_k={SIZES['val']}"],
        f"eval.knn_k={SIZES['val']} needs more than {SIZES['val']} images but the validation split has {SIZES['val']}"),
    "train: eval.knn_k above the test split's size": (
        ["train", "--config", "{train}", "--out", "{root}/new", "--set", "eval.split=train",
         "--set", f"eval.knn_k={SIZES['test'] + 5}"], "but the test split has"),
    "train: --resume of a finished run with another config": (
        ["train", "--config", "{train}", "--out", "{run}", "--resume", "--set", "optim.lr=0.5"], "optim.lr"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, world):
    args, expected = CASES[case]
    before = snapshot(world["root"])
    line = one_error_line(runner.invoke(app, argv(world, *args) + ["--no-progress"] * (args[0] != "eval")))
    assert expected in line, line
    assert snapshot(world["root"]) == before


# -- a head too big for memory ----------------------------------------------------------------------------

def gigabytes(values: int) -> str:
    """The estimate as the message prints it: float32 values, in GB (3 significant digits)."""
    return f"{4 * values / 1e9:.3g} GB"


def activations(batch: int, out_dim: int) -> int:
    """What a linear head's training step keeps for the backward pass: per side the output before and after
    normalising, each with its gradient (2 · B · 4 · out), and the B × B logits, their softmax both ways and its
    gradient (6 · B²)."""
    return 2 * batch * 4 * out_dim + 6 * batch ** 2


def test_out_dim_10_to_the_12_is_refused_before_the_cache_is_read(tmp_path):
    """No cache exists here: the refusal names the memory, so it came before any data was read. Embedding dims
    not known yet count as 1: a linear head per side has (1 + 1) × out_dim values, plus the logit scale. adamw
    keeps 4 copies of each (weights, two moments, gradient), and a batch of 64 its activations."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(train_config(data_section(tmp_path / "no-cache"))))
    line = one_error_line(runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run"),
                                              "--set", "head.out_dim=1000000000000"]))
    lower_bound = 2 * (1 + 1) * 10 ** 12 + 1
    need = gigabytes(4 * lower_bound + activations(64, 10 ** 12))
    assert f"has {lower_bound:.3g} parameters and needs at least {need} to train with adamw" in line
    assert "head.out_dim=1000000000000" in line and "GB free" in line
    assert not (tmp_path / "run").exists()


def test_out_dim_10_to_the_12_with_known_dims_and_a_sam_optimizer(world, tmp_path):
    """With the dims given, only the validation features are not known yet: (32 + 1) + (24 + 1) values per
    output, of which SAM keeps 7 copies (weights, AdamW's two moments, two gradients, the saved point and δ)."""
    line = one_error_line(runner.invoke(app, ["train", "--config", str(world["train"]), "--out", str(tmp_path / "r"),
                                              "--set", "head.out_dim=1000000000000", "--set", "image_dim=32",
                                              "--set", "text_dim=24", "--set", "optim.name=sam"]))
    values = (32 + 1 + 24 + 1) * 10 ** 12 + 1
    need = gigabytes(7 * values + activations(64, 10 ** 12))
    assert f"on 32/24-d embeddings has {values:.3g} parameters and needs at least {need} to train with sam" in line


def test_compare_refuses_a_huge_head_before_embedding_anything(tmp_path):
    study = train_config(data_section(tmp_path / "no-cache"))
    study.update(name="huge", grid={"optimizers": ["sam"], "lrs": [0.01], "rhos": [0.05], "seeds": [0]})
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(study))
    line = one_error_line(runner.invoke(app, ["compare", "--config", str(config), "--out", str(tmp_path / "s"),
                                              "--set", "head.out_dim=1000000000000"]))
    assert "needs at least" in line and "GB" in line
    assert not (tmp_path / "s").exists() and not (tmp_path / "no-cache").exists()


def test_eval_of_a_run_whose_config_asks_for_a_huge_head(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["head"]["out_dim"] = 10 ** 12
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    line = one_error_line(runner.invoke(app, ["eval", str(run)]))
    values = (32 + 1 + 24 + 1) * 10 ** 12 + 1
    _, _, caption_to_image = synthetic_split("test", SIZES["test"])
    rows = SIZES["test"] + len(caption_to_image)  # the test split's images and captions, through the head
    assert f"needs {gigabytes(values + rows * 10 ** 12)} to hold it with the features of {rows} images" in line


# the head (193 552 bytes) and the data a run holds while it trains: the batch of the step computing and the one
# read ahead, 2 · 64 rows of 32 + 24 values (nothing of the validation split: its rows are not counted yet)
BOUNDARY = 4 * (4 * 1857 + activations(64, 32)) + 4 * 2 * 64 * (32 + 24)  # 222 224 bytes


@pytest.mark.parametrize("free_bytes, refused", [(BOUNDARY - 1, True), (BOUNDARY, False)])
def test_the_memory_check_at_its_boundary(world, monkeypatch, free_bytes, refused):
    """Linear heads 32 → 32 and 24 → 32 with biases, plus the logit scale: 33·32 + 25·32 + 1 = 1857 values;
    training with adamw keeps 4 float32 copies of each, and a batch of 64 keeps 2·64·4·32 + 6·64² = 40 960
    activations: 4 · (4 · 1857 + 40 960) = 193 552 bytes; with the batches in flight, 222 224. One byte less is
    refused."""
    import torch

    from align.common import device
    from align.common.config import load_config
    from align.common.errors import AlignError
    from align.train.config import TrainConfig
    from align.train.memory import check_head_fits

    monkeypatch.setattr(device, "available_memory", lambda dev: free_bytes)
    cfg = load_config(TrainConfig, world["train"], ["image_dim=32", "text_dim=24", "head.out_dim=32"])
    if refused:
        with pytest.raises(AlignError, match="needs at least 0.000222 GB"):
            check_head_fits(cfg, torch.device("cpu"))
    else:
        check_head_fits(cfg, torch.device("cpu"))


# -- allocation failures during the work ------------------------------------------------------------------

def test_a_real_allocation_failure_is_one_line(world, tmp_path, monkeypatch):
    """The check let through (as if the machine had room): torch's CPU allocator then fails for real on a
    10^13 × 32 weight (beyond the address space), and that becomes one line."""
    from align.common import device

    monkeypatch.setattr(device, "available_memory", lambda dev: 10 ** 30)
    line = one_error_line(runner.invoke(app, ["train", "--config", str(world["train"]), "--out", str(tmp_path / "r"),
                                              "--set", "head.out_dim=10000000000000"]))
    assert line.startswith("error: out of memory while training") and "allocate" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_running_out_of_memory_mid_training_is_one_line(error, world, tmp_path, monkeypatch):
    import align.train.evaluation

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(align.train.evaluation, "evaluate_head", fail)  # at the first validation, after 10 steps
    line = one_error_line(runner.invoke(app, ["train", "--config", str(world["train"]), "--out", str(tmp_path / "r"),
                                              "--no-progress"]))
    assert line.startswith("error: out of memory while training") and "--resume" in line


def test_a_real_bug_keeps_its_traceback(world, tmp_path, monkeypatch):
    """The last line of defence is for the user's machine and files only: a programming error is not a user error."""
    import align.train.evaluation

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(align.train.evaluation, "evaluate_head", bug)
    result = runner.invoke(app, ["train", "--config", str(world["train"]), "--out", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_environment_errors_that_escape_the_library_become_one_line():
    import torch

    from align.cli.common import environment_error

    line = str(environment_error(OSError(errno.ENOSPC, "No space left on device", "/data/x.npy")))
    assert line.startswith("no space left on the device writing /data/x.npy")
    assert "quota" not in line and environment_error(OSError(errno.EDQUOT, "Disk quota exceeded")) is not None
    assert "permission denied" in str(environment_error(OSError(errno.EACCES, "Permission denied")))  # issue 21
    assert environment_error(OSError(errno.EBADF, "Bad file descriptor")) is None  # a bug keeps its traceback
    try:
        b"caf\xe9 au lait".decode("utf-8")
    except UnicodeDecodeError as exc:
        assert "not UTF-8 text (invalid continuation byte at byte 3)" in str(environment_error(exc))
    try:
        torch.empty(2 ** 50)  # 4 PB: torch's own allocator error
    except RuntimeError as exc:
        assert str(environment_error(exc)).startswith("out of memory while running this command")
    assert environment_error(ValueError("a bug")) is None and environment_error(KeyError("x")) is None


# -- damaged or non-UTF-8 files inside a run directory ------------------------------------------------------

def damage(path: Path, how: str) -> None:
    if how == "latin-1":  # an é in Latin-1 in the middle of the file
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2] + b"\xe9" + data[len(data) // 2:])
    else:  # line 3 of a JSONL: bytes that are not UTF-8, then the rest of the file
        lines = path.read_bytes().split(b"\n")
        lines[2] = b"\xff\xfe" + lines[2]
        path.write_bytes(b"\n".join(lines))


RUN_FILES = {  # file → (how it is damaged, command, text of the line)
    "checkpoints/best.json not UTF-8 (eval)": ("checkpoints/best.json", "latin-1", ["eval", "{run}"],
                                               "best.json is not UTF-8 text"),
    "config.yaml not UTF-8 (eval)": ("config.yaml", "latin-1", ["eval", "{run}"], "config.yaml is not UTF-8 text"),
    "config.yaml not UTF-8 (resume)": ("config.yaml", "latin-1",
                                       ["train", "--config", "{train}", "--out", "{run}", "--resume"],
                                       "config.yaml is not UTF-8 text"),
    "a checkpoint's JSON not UTF-8 (resume)": ("checkpoints/step-0000010.json", "latin-1",
                                               ["train", "--config", "{train}", "--out", "{run}", "--resume"],
                                               "step-0000010.json is not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(RUN_FILES))
def test_a_damaged_file_in_a_run_is_one_line(case, world, tmp_path):
    name, how, args, expected = RUN_FILES[case]
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    damage(run / name, how)
    before = snapshot(run)
    line = one_error_line(runner.invoke(app, argv(dict(world, run=run), *args)))
    assert expected in line, line
    assert snapshot(run) == before


def test_a_damaged_metrics_line_before_the_last_is_an_error_on_resume_a_torn_last_one_is_not(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "results.json").unlink()  # an interrupted run: resuming reads its log
    metrics = (run / "metrics.jsonl").read_bytes()
    damage(run / "metrics.jsonl", "line 3")
    line = one_error_line(runner.invoke(app, ["train", "--config", str(world["train"]), "--out", str(run), "--resume"]))
    assert f"line 3 of {run / 'metrics.jsonl'} is damaged" in line
    (run / "metrics.jsonl").write_bytes(metrics + b'{"kind": "train", "st')  # torn by a kill: skipped
    result = runner.invoke(app, ["train", "--config", str(world["train"]), "--out", str(run), "--resume",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (run / "metrics.jsonl").read_bytes() == (world["run"] / "metrics.jsonl").read_bytes()


def test_eval_of_a_split_not_larger_than_knn_k_says_that_mutual_knn_is_skipped(tmp_path):
    """Before, the alignment metrics were silently missing from the table."""
    data = data_section(tmp_path / "cache")
    for split, n in (("train", 256), ("val", 64), ("test", 6)):
        write_cache(data, split, *synthetic_split(split, n))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(train_config(data, schedule={"steps": 10, "batch_size": 32, "warmup_steps": 1},
                                                  eval={"every": 10, "sharpness": False, "test_split": None})))
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--config", str(config), "--out", str(run), "--no-progress"]).exit_code == 0
    result = runner.invoke(app, ["eval", str(run), "--split", "test"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "mutual_knn/cknna skipped: 6 images is not more than the run's eval.knn_k=8" in result.output
    assert "mutual_knn " not in result.output.split("note:")[0]


# -- the test suite itself stays offline ------------------------------------------------------------------

def test_conftest_forces_the_offline_variables_over_the_shell():
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
               HF_HOME="/tmp/a-shell-hf-home")
    code = ("import os, runpy; runpy.run_path('tests/conftest.py'); "
            "print([os.environ[k] for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_HOME')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    values = eval(out.stdout.strip())
    assert values[:3] == ["1", "1", "1"] and values[3] != "/tmp/a-shell-hf-home"
