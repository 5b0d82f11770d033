"""Output locations the file system refuses: a read-only disk, a folder without permission, a full disk or quota, a
name too long, a symbolic-link loop. Every command that writes (`embed`, `train`, `compare`, `eval --out`,
`eval --gallery`, `eval RUN` recording into the run, `toy`, and each with only `ALIGN_HOME` pointing at such a
place) says so in one line, exit 2, before any work, leaving nothing behind; a write refused in the middle of a
run is one line too, with no second error from cleaning up its temporary file.

Which tests are which:
- **simulated** (``faults.RefusingDisk``): the low-level calls raise OSError with each errno below a folder. The
  tests may run as root, whom permission bits do not stop, so this is how every command meets every class.
- **real**: a name of 300 bytes and a link loop (the system itself refuses them, root or not); a read-only tmpfs
  mount and a folder with mode 0555 entered by a non-root user, each inside a user namespace (``unshare``), so no
  privilege is needed. These skip where the platform has no unprivileged user namespaces.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from align.cli.common import environment_error
from align.cli.main import app
from conftest import OFFLINE
from faults import RefusingDisk, assert_same_run, one_error_line, temp_files
from helpers import make_cache, train_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

# errno → what the line must say (written here, not taken from the code's own table)
SAYS = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded", errno.ENAMETOOLONG: "a name in the path is too long",
        errno.ELOOP: "the path runs through a loop of symbolic links"}
CODES = {errno.errorcode[code]: code for code in SAYS}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir) -> dict:
    """A cache, train and study configs, a finished run, a cache embedded from images (for galleries) and embed
    configs with and without a cache_root."""
    root = tmp_path_factory.mktemp("read-only")
    data = make_cache(root / "cache")
    steps = {"steps": 20, "batch_size": 64, "warmup_steps": 2}
    small_eval = {"every": 10, "sharpness_batches": 1, "hessian_iters": 2, "hutchinson_samples": 2,
                  "sharpness_ascent_steps": 1}
    train = train_config(data, optim={"name": "sam", "lr": 1e-2, "rho": 0.05, "base": "adamw"}, schedule=steps,
                         eval=small_eval, checkpoint_every=10, loss_at_step=10)
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    study = dict(train, name="refused", workers=1, reference="sam", bootstrap_samples=100,
                 grid={"optimizers": ["sgd", "sam"], "lrs": [0.01], "rhos": [0.05], "seeds": [0]})
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    encoder = {"backend": "open_clip", "model": f"local-dir:{tiny_dir}"}
    embed = {"dataset": {"kind": "synthetic", "synthetic": {"train_images": 8, "val_images": 4, "test_images": 4,
                                                            "image_size": 32, "captions_per_image": 2}},
             "splits": ["train"], "image_encoder": encoder, "text_encoder": encoder, "batch_size": 4,
             "shard_size": 4, "device": "cpu"}
    (root / "embed-home.yaml").write_text(yaml.safe_dump(embed))  # cache_root: $ALIGN_HOME/cache
    (root / "embed.yaml").write_text(yaml.safe_dump(dict(embed, cache_root=str(root / "images"))))
    assert runner.invoke(app, ["embed", "--config", str(root / "embed.yaml"), "--no-progress"]).exit_code == 0
    run = root / "run"
    result = runner.invoke(app, ["train", "--config", str(root / "train.yaml"), "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    return {"root": root, "train": root / "train.yaml", "study": root / "study.yaml", "embed": root / "embed.yaml",
            "embed_home": root / "embed-home.yaml", "run": run, "images": root / "images",
            "key": next((root / "images").iterdir()).name, "cache": root / "cache",
            "test_key": next(p.name for p in (root / "cache").iterdir() if "-test-" in p.name)}


# name → (argv, the output location the line names, environment); {disk}: a folder the file system refuses
COMMANDS = {
    "embed": (["embed", "--config", "{embed}", "--set", "cache_root={disk}/cache", "--no-progress"],
              "{disk}/cache/{key}", {}),
    "train": (["train", "--config", "{train}", "--out", "{disk}/run", "--no-progress"], "{disk}/run", {}),
    "compare": (["compare", "--config", "{study}", "--out", "{disk}/study", "--no-progress"], "{disk}/study", {}),
    "eval --out": (["eval", "{run}", "--out", "{disk}/eval.json"], "{disk}/eval.json", {}),
    "eval --gallery (a run)": (["eval", "{run}", "--gallery", "{disk}/gallery.png"], "{disk}/gallery.png", {}),
    "eval --gallery (a cache)": (["eval", "--cache", "{key}", "--cache-root", "{images}", "--gallery",
                                  "{disk}/gallery.png"], "{disk}/gallery.png", {}),
    "eval --cache --out": (["eval", "--cache", "{test_key}", "--cache-root", "{cache}", "--out", "{disk}/c.json"],
                           "{disk}/c.json", {}),
    "eval RUN (records into the run)": (["eval", "{disk}/run"], "{disk}/run/eval", {}),
    "search --gallery": (["search", "{run}", "--text", "a photo", "--cache", "{test_key}", "--cache-root", "{cache}",
                          "--gallery", "{disk}/gallery.png"], "{disk}/gallery.png", {}),
    "toy": (["toy", "paraboloid", "--out", "{disk}/toy"], "{disk}/toy", {}),
    "ALIGN_HOME: embed": (["embed", "--config", "{embed_home}", "--no-progress"], "{disk}/cache/{key}",
                          {"ALIGN_HOME": "{disk}"}),
    "ALIGN_HOME: train": (["train", "--config", "{train}", "--no-progress"], "{disk}/runs/train",
                          {"ALIGN_HOME": "{disk}"}),
    "ALIGN_HOME: compare": (["compare", "--config", "{study}", "--no-progress"], "{disk}/studies/refused",
                            {"ALIGN_HOME": "{disk}"}),
    "ALIGN_HOME: toy": (["toy", "paraboloid"], "{disk}/toy", {"ALIGN_HOME": "{disk}"}),
}


def fill(text: str, world: dict, disk: Path) -> str:
    return text.format(disk=disk, **{k: v for k, v in world.items()})


def case(world: dict, name: str, disk: Path) -> tuple[list[str], str, dict[str, str]]:
    """A command of COMMANDS with its paths filled in (the run copied into ``disk`` where it is the target)."""
    args, target, env = COMMANDS[name]
    if "{disk}/run" in args[1:2]:
        shutil.copytree(world["run"], disk / "run")
    return ([fill(a, world, disk) for a in args], fill(target, world, disk),
            {k: fill(v, world, disk) for k, v in env.items()})


def assert_refused_before_any_work(line: str, target: str, code: int) -> None:
    """The line names the location (its end, where it is long), what the system said, and that nothing was written."""
    assert line.startswith("error: cannot write the ") and f"{target[-60:]}: {SAYS[code]}" in line, line
    assert line.endswith("; nothing was written"), line


def says(line: str, path: Path, code: int) -> bool:
    """Whether a mid-run line names the file (its end, where it is long) and what the system said."""
    return line.startswith("error: cannot write ") and f"{str(path)[-60:]}: {SAYS[code]}: " in line


def contents(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- simulated: every command meets every class ------------------------------------------------------------

@pytest.mark.parametrize("code", list(CODES), ids=list(CODES))
@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_refused_output_location_is_one_line_before_any_work_and_leaves_nothing(world, name, code, tmp_path,
                                                                                  monkeypatch):
    """Simulated: every change below the folder raises OSError(code)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    args, target, env = case(world, name, disk)
    before = contents(disk)
    with monkeypatch.context() as m:
        refusing = RefusingDisk(m, disk, CODES[code])
        result = runner.invoke(app, args, env=env)
    assert_refused_before_any_work(one_error_line(result), target, CODES[code])
    assert refusing.refused  # the refusal came from the file system, not from a check of our own
    assert contents(disk) == before


def test_a_read_only_cache_that_is_finished_is_still_read(world, monkeypatch):
    """The check comes where a command will write: a finished cache on a read-only disk is used as it is."""
    with monkeypatch.context() as m:
        RefusingDisk(m, world["images"], errno.EROFS)
        result = runner.invoke(app, ["embed", "--config", str(world["embed"]), "--no-progress"])
    assert result.exit_code == 0 and "cached" in result.output, result.output


# -- simulated: a write refused in the middle of a run -------------------------------------------------------

@pytest.mark.parametrize("code", list(CODES), ids=list(CODES))
def test_a_checkpoint_write_refused_mid_run_is_one_line_and_leaves_no_temporary_file(world, code, tmp_path,
                                                                                     monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        refusing = RefusingDisk(m, run, CODES[code], pattern=".step-0000020.safetensors.*.tmp")
        result = runner.invoke(app, ["train", "--config", str(world["train"]), "--out", str(run), "--no-progress"])
    line = one_error_line(result, after_progress=True)
    assert refusing.refused
    final = run / "checkpoints" / "step-0000020.safetensors"
    if code in ("ENOSPC", "EDQUOT"):  # the full-disk line (tests/test_faults_disk_full.py)
        assert line.startswith(f"error: no space left on the device writing {final} "), line
    else:
        assert says(line, final, CODES[code]), line
        assert "run the same command again (align train: add --resume)" in line
    assert temp_files(run) == [] and not (run / "results.json").exists()


def test_a_run_refused_mid_way_resumes_to_the_uninterrupted_run(world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        RefusingDisk(m, run, errno.EROFS, pattern="metrics.jsonl")  # the first log line: appended, not atomic
        result = runner.invoke(app, ["train", "--config", str(world["train"]), "--out", str(run), "--no-progress"])
    line = one_error_line(result, after_progress=True)
    assert says(line, run / "metrics.jsonl", errno.EROFS), line
    again = runner.invoke(app, ["train", "--config", str(world["train"]), "--out", str(run), "--resume",
                                "--no-progress"])
    assert again.exit_code == 0, again.output
    assert_same_run(world["run"], run, 20)


@pytest.mark.parametrize("code", ["EROFS", "EACCES", "ENAMETOOLONG"])
def test_a_gallery_refused_mid_save_is_one_line_without_a_cleanup_traceback(world, code, tmp_path, monkeypatch):
    """The old failure: the save's temporary PNG could not be made, and removing it raised a second error over the
    first (a read-only disk refuses even the unlink of a missing file). The refusing disk refuses that unlink too."""
    gallery = tmp_path / "out" / "gallery.png"
    with monkeypatch.context() as m:
        refusing = RefusingDisk(m, tmp_path / "out", CODES[code], pattern=".gallery.*.tmp.png")
        result = runner.invoke(app, ["eval", "--cache", world["key"], "--cache-root", str(world["images"]),
                                     "--gallery", str(gallery)])
    line = one_error_line(result, after_progress=True)
    assert any(p.endswith(".tmp.png") for p in refusing.refused)  # the cleanup's unlink was refused as well
    assert says(line, gallery, CODES[code]), line
    assert temp_files(tmp_path) == [] and not gallery.exists()


def test_an_embed_shard_refused_mid_run_is_one_line_and_leaves_no_temporary_file(world, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    with monkeypatch.context() as m:
        RefusingDisk(m, root, errno.EACCES, pattern=".text-00000.npy.*.tmp")
        result = runner.invoke(app, ["embed", "--config", str(world["embed"]), "--set", f"cache_root={root}",
                                     "--no-progress"])
    line = one_error_line(result, after_progress=True)
    shard = root / world["key"] / "work" / "text-00000.npy"
    assert says(line, shard, errno.EACCES), line
    assert temp_files(root) == [] and not (root / world["key"] / "manifest.json").exists()


def test_a_study_report_refused_mid_way_is_one_line(world, tmp_path, monkeypatch):
    study = tmp_path / "study"
    with monkeypatch.context() as m:
        RefusingDisk(m, study, errno.EROFS, pattern=".results.csv.*.tmp")
        result = runner.invoke(app, ["compare", "--config", str(world["study"]), "--out", str(study),
                                     "--no-progress"])
    line = one_error_line(result, after_progress=True)
    assert says(line, study / "results.csv", errno.EROFS), line
    assert temp_files(study) == [] and not (study / "report.md").exists()


@pytest.mark.parametrize("code", list(CODES), ids=list(CODES))
def test_the_last_line_of_defence_names_the_file_and_what_to_do(code, tmp_path):
    """cli.common.environment_error: an OSError of every class that the library did not turn into its own line."""
    where = tmp_path / "somewhere" / "file.bin"
    error = environment_error(OSError(CODES[code], os.strerror(CODES[code]), str(where)))
    assert error is not None and str(where) in str(error) and len(str(error)) <= 300, error
    if code in ("ENOSPC", "EDQUOT"):
        assert str(error).startswith(f"no space left on the device writing {where}")
    else:
        assert str(error).startswith(f"cannot read or write {where}: {SAYS[CODES[code]]}: "), error


# -- real: what the system itself refuses, root or not --------------------------------------------------------

REAL = ["embed", "train", "compare", "eval --out", "eval --gallery (a run)", "eval --cache --out", "toy",
        "ALIGN_HOME: train"]


@pytest.mark.parametrize("name", REAL)
def test_a_real_name_longer_than_the_file_system_allows_is_one_line(world, name, tmp_path):
    disk = tmp_path / ("n" * 300)  # 300 bytes: every Linux file system stops at 255
    args, target, env = case(world, name, disk)
    assert_refused_before_any_work(one_error_line(runner.invoke(app, args, env=env)), target, errno.ENAMETOOLONG)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", REAL)
def test_a_real_symbolic_link_loop_is_one_line(world, name, tmp_path):
    disk = tmp_path / "loop"
    disk.symlink_to("loop")  # loop → loop
    args, target, env = case(world, name, disk)
    assert_refused_before_any_work(one_error_line(runner.invoke(app, args, env=env)), target, errno.ELOOP)
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


# -- real: a read-only mount and a folder without permission, inside a user namespace -----------------------

BATCH = """
import json, sys
from typer.testing import CliRunner
from align.cli.main import app
out = []
for args, env in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args, env=env)
    out.append({"exit_code": result.exit_code, "output": result.output})
print("RESULTS " + json.dumps(out))
"""


class Result:
    """What ``faults.one_error_line`` reads from a CliRunner result."""

    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code, self.output, self.exception = exit_code, output, None


def in_namespace(setup: str, cases: list, tmp_path: Path, unshare: list[str]) -> list[Result]:
    """Run ``setup`` (shell: mounts, modes) then the cases through the real app, all in one new user namespace;
    skip where the platform does not let an unprivileged user make one."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    probe = subprocess.run(["unshare", *unshare, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode()[:200]}")
    script = tmp_path / "batch.py"
    script.write_text(BATCH)
    env = dict(os.environ, **OFFLINE, PYTHONPATH=str(REPO))
    command = f'{setup} && exec "$0" "$@"'
    proc = subprocess.run(["unshare", *unshare, "sh", "-c", command, sys.executable, str(script), json.dumps(cases)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and "RESULTS " in proc.stdout, proc.stderr[-3000:]
    return [Result(**r) for r in json.loads(proc.stdout.split("RESULTS ", 1)[1])]


REAL_MOUNT = REAL + ["eval RUN (records into the run)", "ALIGN_HOME: compare", "ALIGN_HOME: toy"]


def test_a_real_read_only_mount_is_one_line_for_every_command(world, tmp_path):
    """Real: a read-only tmpfs mounted on the output folder (and the run's own folder bind-mounted read-only for
    `eval RUN`), in a user and mount namespace of its own."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cases, targets = [], []
    for name in REAL_MOUNT:
        sub = disk / f"case{len(cases)}"  # its own mount point
        sub.mkdir()
        args, target, env = case(world, name, sub)
        cases.append([args, env])
        targets.append(target)
    mounts = " && ".join(f"mount --bind {p} {p} && mount -o remount,bind,ro {p}" if (p / "run").exists() else
                         f"mount -t tmpfs -o ro tmpfs {p}" for p in sorted(disk.iterdir()))
    before = contents(disk)
    results = in_namespace(mounts, cases, tmp_path, ["--user", "--map-root-user", "--mount"])
    for name, result, target in zip(REAL_MOUNT, results, targets):
        assert_refused_before_any_work(one_error_line(result), target, errno.EROFS)
    assert contents(disk) == before


def test_a_real_folder_without_write_permission_is_one_line_for_every_command(world, tmp_path):
    """Real: folders of mode 0555 and a user who is not root (a user namespace that maps this user to an
    unprivileged id: permission bits then apply to it, as to any user)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cases, targets = [], []
    for name in REAL:
        sub = disk / f"case{len(cases)}"
        sub.mkdir()
        args, target, env = case(world, name, sub)
        cases.append([args, env])
        targets.append(target)
    for folder in disk.iterdir():
        folder.chmod(0o555)
    before = contents(disk)
    try:
        results = in_namespace("true", cases, tmp_path, ["--user", "--map-user=1000", "--map-group=1000"])
    finally:
        for folder in disk.iterdir():
            folder.chmod(0o755)
    for name, result, target in zip(REAL, results, targets):
        assert_refused_before_any_work(one_error_line(result), target, errno.EACCES)
    assert contents(disk) == before
