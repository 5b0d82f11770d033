"""Two writers on one target: the second is refused in one line naming the first's PID; a killed holder frees it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from align.common.errors import AlignError
from align.common.locks import exclusive

REPO = Path(__file__).resolve().parents[1]


def python(code: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with exclusive(tmp_path / "target", "cache"):
        child = python(f"""
            from align.common.locks import exclusive
            from align.common.errors import AlignError
            try:
                with exclusive({str(tmp_path / 'target')!r}, "cache"):
                    print("ACQUIRED")
            except AlignError as exc:
                print(exc)
        """)
        out, err = child.communicate(timeout=60)
    assert f"in use by process {os.getpid()}" in out, (out, err)
    assert "ACQUIRED" not in out
    with exclusive(tmp_path / "target", "cache"):  # released on exit: free again
        pass


def test_a_holder_killed_with_sigkill_leaves_the_target_free(tmp_path):
    holder = python(f"""
        import time
        from align.common.locks import exclusive
        with exclusive({str(tmp_path)!r}, "study"):
            print("HELD", flush=True)
            time.sleep(60)
    """)
    assert holder.stdout.readline().strip() == "HELD"
    with pytest.raises(AlignError, match=f"process {holder.pid}"):
        with exclusive(tmp_path, "study"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with exclusive(tmp_path, "study"):
        pass


def test_a_file_where_a_folder_belongs_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(AlignError, match="is a file, not a folder"):
        with exclusive(tmp_path / "f", "run directory"):
            pass


def test_two_trainings_into_one_run_directory_one_is_refused_and_the_log_has_no_duplicates(tmp_path):
    from helpers import make_cache, train_config

    data = make_cache(tmp_path / "cache")
    cfg = train_config(data, schedule={"steps": 100_000}, eval={"every": 1000, "sharpness": False})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    code = f"""
        import torch; torch.set_num_threads(1)
        from align.common.config import load_config
        from align.common.errors import AlignError
        from align.train.config import TrainConfig
        from align.train.loop import train
        cfg = load_config(TrainConfig, {str(tmp_path / 'c.yaml')!r})
        try:
            print(train(cfg, {str(run)!r}, resume=True, progress=False)["status"])
        except AlignError as exc:
            print("ERROR", exc)
    """
    first = python(code)
    wait_for(lambda: (run / "metrics.jsonl").is_file())
    second = python(code)
    out2, _ = second.communicate(timeout=120)
    assert first.poll() is None, "the first run must still be training"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert out2.startswith("ERROR") and f"in use by process {first.pid}" in out2, out2
    # Only the first writer logged: consecutive steps, each once (a torn last line from the kill is skipped).
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert len(steps) > 10 and steps == list(range(1, len(steps) + 1))


def test_study_workers_exit_when_the_main_process_is_killed():
    parent = python("""
        import multiprocessing as mp, os, time
        from concurrent.futures import ProcessPoolExecutor
        from align.study.workers import _exit_with_parent

        if __name__ == "__main__":
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                pool.submit(os.getpid).result()
                pool.submit(time.sleep, 120)  # the worker is busy, as when it trains a cell
                time.sleep(1)
                print(next(iter(pool._processes)), flush=True)
                time.sleep(120)
    """)
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)

    def gone() -> bool:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return True
        # A zombie is gone for our purpose: it no longer runs (it waits for init to reap it).
        stat = Path(f"/proc/{worker}/stat")
        return stat.is_file() and stat.read_text().split(") ")[1].startswith("Z")

    wait_for(gone, timeout=15)


def test_a_second_study_into_the_same_folder_is_refused_before_it_trains(tmp_path):
    from align.study.config import CompareConfig
    from align.study.compare import run_compare
    from align.common.config import validate
    from helpers import make_cache, train_config

    data = make_cache(tmp_path / "cache")
    cfg = validate(CompareConfig, {**train_config(data), "study_dir": str(tmp_path / "study"),
                                   "grid": {"optimizers": ["sgd"], "seeds": [0]}, "reference": "sgd"})
    holder = python(f"""
        import time
        from align.common.locks import exclusive
        with exclusive({str(tmp_path / 'study')!r}, "study"):
            print("HELD", flush=True)
            time.sleep(60)
    """)
    assert holder.stdout.readline().strip() == "HELD"
    try:
        with pytest.raises(AlignError, match=f"in use by process {holder.pid}"):
            run_compare(cfg, progress=False)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not (tmp_path / "study" / "runs").exists()  # nothing trained, nothing written but the lock
