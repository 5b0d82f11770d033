"""Training a study's packs in worker processes (orchestration): one process per pack at a time, progress
reported back by step, and workers that die with the study's main process.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.common.progress import Bar
from align.train.config import TrainConfig
from align.train.loop import train_pack


@dataclass(frozen=True)
class PackJob:
    """One pack as a worker trains it: its cells' training configs (as JSON, to cross into a worker process),
    their run folders, and how many of its cells are left to train (a finished one keeps its slot, idle)."""

    configs: list[dict[str, Any]]
    run_dirs: list[str]
    left: int


def _run_pack(cfg_jsons: list[dict[str, Any]], run_dirs: list[str], threads: int, pack_id: int = 0,
              steps_done: Any = None) -> list[dict[str, Any]]:
    """Train one pack of cells (in a worker process): resumes started runs, returns finished ones' results.
    ``steps_done.put((pack_id, k))`` after every step of k heads (a queue back to the study's progress bar)."""
    torch.set_num_threads(threads)
    cfgs = [TrainConfig.model_validate(c) for c in cfg_jsons]
    steps_done = steps_done if steps_done is not None else _WORKER_STEPS_DONE
    on_step = None if steps_done is None else (lambda k: steps_done.put((pack_id, k)))
    return train_pack(cfgs, [Path(d) for d in run_dirs], resume=True, progress=False, on_step=on_step)


class _PackProgress:
    """The study's bar, in cells, moved by the packs' steps as they happen: a step of k heads is k/steps of a
    cell, and a finished pack counts as all its cells (resumed or diverged heads take fewer steps)."""

    def __init__(self, bar: Any, steps: int, sizes: list[int], start: int = 0) -> None:
        self.bar, self.steps, self.sizes, self.start = bar, steps, sizes, start
        self.credited = [0.0] * len(sizes)

    def put(self, item: tuple[int, int]) -> None:
        pack_id, heads = item
        self.credited[pack_id] = min(self.credited[pack_id] + heads / self.steps, self.sizes[pack_id] - 1e-9)
        self.bar.set(self.start + sum(self.credited))

    def finish(self, pack_id: int) -> None:
        self.credited[pack_id] = self.sizes[pack_id]  # exact: the bar ends on the cell count
        self.bar.set(self.start + sum(self.credited))


def _run_packs(jobs: list[PackJob], workers: int, threads: int, progress: _PackProgress) -> None:
    """Every pack, ``workers`` at a time (in worker processes when more than one); a failed pack (disk full, ...)
    stops the study: queued packs never start."""
    if workers == 1:
        for pack_id, job in enumerate(jobs):
            _run_pack(job.configs, job.run_dirs, threads, pack_id, progress)
            progress.finish(pack_id)
        return
    context = mp.get_context("spawn")
    steps_done = context.Queue()  # handed over at each worker's start (a queue cannot travel with a task)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), steps_done)) as pool:
        futures = {pool.submit(_run_pack, job.configs, job.run_dirs, threads, i): i for i, job in enumerate(jobs)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        progress.put(steps_done.get_nowait())
                    except queue.Empty:
                        break
                for future in done:
                    future.result()
                    progress.finish(futures[future])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


_WORKER_STEPS_DONE: Any = None  # in a study's worker process: the queue its packs report their steps to


def _start_worker(parent: int, steps_done: Any) -> None:
    """A study worker's start: keep the queue back to the progress bar, and die with the study's main process."""
    global _WORKER_STEPS_DONE
    _WORKER_STEPS_DONE = steps_done
    _exit_with_parent(parent)


def _exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """In a worker: end this process as soon as the study's main process is gone (killed, even by kill -9), so
    orphaned workers never go on training cells. A daemon thread polls the parent's PID."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def train_packs(jobs: list[PackJob], workers: int, threads: int, steps: int, bar: Bar, done: int) -> None:
    """Train the packs ``jobs`` (see ``_run_packs``) of ``steps`` steps, moving ``bar`` (in cells, ``done`` of them
    finished before) with their steps."""
    bar.advance(done)
    _run_packs(jobs, workers, threads, _PackProgress(bar, steps, [job.left for job in jobs], start=done))
