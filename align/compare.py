"""The optimizer study: a grid of optimizers × ρ × learning rate × seeds on one cached embedding set.

Each cell is an ordinary training run directory (``<study>/runs/<cell>``), so a study is resumable for free:
finished cells are skipped and an interrupted cell resumes from its last checkpoint. Cells are trained in packs
(``align.train.train_pack``: K heads as one computation) of one SAM-family optimizer or of single-pass ones, no
more per pack than the memory budget holds (``plan_packs``). The layout is recorded at the first run (``packs.json``,
``pack_layout``) and kept by every rerun, so a resumed study writes the bytes of an uninterrupted one; ``--pack 1``
(one cell at a time) agrees with a packed study to floating-point noise (BLAS sums another shape in another order).
The statistics
(summary with Student-t intervals and Holm-adjusted verdicts, the paper's Table 3 shape, robustness) are pure
functions of the rows of ``results.csv`` in ``align.study_stats``; writing files and plots is ``align.report``'s job.

Under ``torchrun`` (``align.distributed``) the packs are dealt out to the ranks, each training its own on its own
device into the study's run folders (a file system every rank sees); rank 0 holds the study's lock, plans, collects
the rows and writes results.csv, the tables, plots and report, which equal a single process's.
"""
from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import StrictInt, ValidationError, field_validator, model_validator

from align.config import StrictModel
from align.datasets import LABELLED_KINDS
from align.errors import AlignError
from align.optim import OPTIMIZERS, default_hparams, optimizer_info
from align.progress import Log
from align.study_stats import METHOD_AXES
from align.train_config import MAX_SEED, METHOD_HPARAMS, Number, OptimConfig, TrainConfig


class GridConfig(StrictModel):
    """What varies across cells. Single-pass optimizers (sgd, adam, adamw) have no ρ and run once per lr.

    ``method_axes`` sweeps a method's own hyper-parameters besides lr × ρ, per optimizer, e.g.
    ``{fsam: {eta: [1000, 10000]}, msam: {alpha: [0.5, 1, 2], metric_beta: [0, 0.9]}}``: every combination of
    the listed values is crossed with that optimizer's lr × ρ × seeds.
    """

    optimizers: list[str] = ["sgd", "adamw", "sam", "msam", "asam", "fsam"]
    lrs: list[Number] = [1e-3]
    rhos: list[Number] = [0.05]
    seeds: list[StrictInt] = [0, 1]
    lr_overrides: dict[str, list[Number]] = {}   # per optimizer, e.g. sgd: [0.1, 0.3]
    rho_overrides: dict[str, list[Number]] = {}  # per optimizer, e.g. asam: [0.5, 1.0] (ASAM's ρ lives on another scale)
    method_axes: dict[str, dict[str, list[Number]]] = {}  # per optimizer: eta | alpha | metric_beta → values

    @field_validator("optimizers")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for name in value:
            optimizer_info(name)
        if not value or len(set(value)) != len(value):
            raise ValueError("optimizers must be a non-empty list without repeats")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "GridConfig":
        for key in [*self.lr_overrides, *self.rho_overrides]:
            if key not in OPTIMIZERS:
                raise ValueError(f"override for unknown optimizer {key!r}; choose one of {', '.join(OPTIMIZERS)}")
        lr_lists = {"lrs": self.lrs, **{f"lr_overrides.{k}": v for k, v in self.lr_overrides.items()}}
        rho_lists = {"rhos": self.rhos, **{f"rho_overrides.{k}": v for k, v in self.rho_overrides.items()}}
        for where, values in {**lr_lists, **rho_lists, "seeds": self.seeds}.items():
            _check_axis(where, values, positive=where in lr_lists, integer=where == "seeds")
        _check_method_axes(self.method_axes)
        return self


def _check_method_axes(axes: dict[str, dict[str, list[Any]]]) -> None:
    """Each method axis: a known optimizer, a sweepable parameter it has, values valid for it (``OptimConfig``)."""
    for name, spec in axes.items():
        if name not in OPTIMIZERS:
            raise ValueError(f"method_axes: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
        own = [k for k in METHOD_AXES if k in default_hparams(name)]
        if not spec:
            raise ValueError(f"method_axes.{name} names no parameter")
        for param, values in spec.items():
            where = f"method_axes.{name}.{param}"
            if param not in own:
                has = f"it has {', '.join(own)}" if own else "it has none (lr and ρ are swept by lrs and rhos)"
                raise ValueError(f"{where}: {name} has no parameter {param!r} to sweep; {has}")
            _check_axis(where, values, positive=False, integer=False)
            for v in values:
                try:
                    OptimConfig(name=name, **{param: v})
                except ValidationError as err:
                    raise ValueError(f"{where}: {v!r}: {err.errors()[0]['msg']}") from None


def _check_axis(where: str, values: list[Any], positive: bool, integer: bool) -> None:
    """A grid axis: non-empty, numbers (no booleans), finite, in range and without repeats (a repeat is two
    workers on one cell and a duplicate row)."""
    if not values:
        raise ValueError(f"{where} must not be empty")
    for v in values:
        if isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{where}: {v!r} is not a finite number")
        if integer and not 0 <= v < MAX_SEED:
            raise ValueError(f"{where}: seed {v} is outside [0, 2^63)")
        if (positive and not v > 0) or v < 0:
            raise ValueError(f"{where}: {v!r} must be {'> 0' if positive else '>= 0'}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where} repeats a value: {values}")


class CompareConfig(TrainConfig):
    """A study: every training setting of ``TrainConfig`` (shared by all cells) plus the grid."""

    name: str = "study"  # a plain folder name: letters, digits, '.', '_', '-'
    study_dir: str | None = None  # default: <data root>/studies/<name>
    workers: int | Literal["auto"] = "auto"  # cells trained at once (processes); auto: fits the cores, 1 on GPU
    reference: str = "sam"  # the optimizer every other one is compared with (paired t, Holm-adjusted)
    # Unused: the summary's intervals are Student-t now. Still accepted because every study's saved config.yaml
    # (written before) has it, and `align compare --config <study>/config.yaml` must keep loading those.
    bootstrap_samples: int | None = None
    # The headline metric: it picks each optimizer's best configuration (validation) and is compared with the
    # reference (test). zeroshot_top1 needs a labelled set (mnist), whose captions only name the class.
    score: Literal["mean_R@1", "zeroshot_top1"] = "mean_R@1"
    beside: str | None = None  # another study ranked beside this one: its name, or its folder as a path (with a /)
    grid: GridConfig = GridConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(f"study name {value[:40]!r} must be a plain folder name (letters, digits, '.', '_', "
                             "'-'; no '/'): it names <data root>/studies/<name>")
        return value

    @model_validator(mode="after")
    def _reference_in_grid(self) -> "CompareConfig":
        if self.reference not in self.grid.optimizers:
            raise ValueError(f"reference {self.reference!r} is not among grid.optimizers {self.grid.optimizers}")
        if self.score.startswith("zeroshot") and self.data.dataset.kind not in LABELLED_KINDS:
            raise ValueError(f"score {self.score} needs a labelled dataset ({', '.join(LABELLED_KINDS)}), not kind "
                             f"{self.data.dataset.kind!r}")
        return self


@dataclass(frozen=True)
class Cell:
    """One run of the grid. ``method`` holds its method-axis values as (name, value) in ``METHOD_AXES`` order."""

    optimizer: str
    lr: float
    rho: float | None
    seed: int
    method: tuple[tuple[str, float], ...] = ()

    @property
    def key(self) -> str:
        """The run folder's name; without method axes the same as before they existed (old studies resume)."""
        rho = "" if self.rho is None else f"_rho{self.rho:g}"
        extra = "".join(f"_{name}{value:g}" for name, value in self.method)
        return f"{self.optimizer}_lr{self.lr:g}{rho}{extra}_s{self.seed}"

    @property
    def config_key(self) -> tuple:
        """(optimizer, lr, ρ, *method): the configuration, seeds aside (as ``study_stats.config_key``)."""
        return (self.optimizer, self.lr, self.rho, *self.method)


def study_dir(cfg: CompareConfig) -> Path:
    """The study's folder: ``study_dir`` if set, else ``<data root>/studies/<name>``."""
    from align.paths import studies_dir

    return Path(cfg.study_dir) if cfg.study_dir else studies_dir() / cfg.name


def grid_cells(grid: GridConfig) -> list[Cell]:
    """Every cell, in a fixed order (optimizer order as configured, then lr, ρ, method axes, seed)."""
    cells = []
    for name in grid.optimizers:
        two_pass = optimizer_info(name).two_pass
        rhos: list[float | None] = list(grid.rho_overrides.get(name, grid.rhos)) if two_pass else [None]
        combos = _method_combos(grid.method_axes.get(name, {}))
        for lr in grid.lr_overrides.get(name, grid.lrs):
            for rho in rhos:
                for method in combos:
                    for seed in grid.seeds:
                        cells.append(Cell(name, float(lr), None if rho is None else float(rho), int(seed), method))
    return cells


def _method_combos(spec: dict[str, list[float]]) -> list[tuple[tuple[str, float], ...]]:
    """Every combination of one optimizer's method-axis values, axes in ``METHOD_AXES`` order ([()] for none)."""
    names = [a for a in METHOD_AXES if a in spec]
    return [tuple(zip(names, map(float, values))) for values in itertools.product(*(spec[a] for a in names))]


def cell_config(cfg: CompareConfig, cell: Cell, run_dir: Path) -> TrainConfig:
    """The training config of one cell: the study's shared settings with this cell's optimizer, lr, ρ, seed.

    Method hyper-parameters of the shared section that this cell's optimizer does not have (M-SAM's alpha in a
    SAM cell, η in an M-SAM cell) are dropped: a study sets them once for the methods that take them. The cell's
    method-axis values override the shared ones.
    """
    shared = cfg.model_dump(exclude={"name", "study_dir", "workers", "reference", "bootstrap_samples", "score",
                                     "beside", "grid"})
    own = optimizer_info(cell.optimizer).defaults
    optim = {k: v for k, v in shared["optim"].items() if k not in METHOD_HPARAMS or k in own}
    optim.update(name=cell.optimizer, lr=cell.lr, **dict(cell.method))
    if cell.rho is not None:
        optim["rho"] = cell.rho
    shared.update(optim=optim, seed=cell.seed, out_dir=str(run_dir))
    return TrainConfig.model_validate(shared)


def plan(cfg: CompareConfig) -> dict[str, Any]:
    """What the study will do, without touching the network or the disk (``--dry-run``)."""
    cells = grid_cells(cfg.grid)
    passes = sum(2 if optimizer_info(c.optimizer).two_pass else 1 for c in cells)
    return {
        "study_dir": str(study_dir(cfg)),
        "dataset": _dataset_summary(cfg),
        "splits": list(cfg.data.splits),
        "image_encoder": cfg.data.image_encoder.model_dump(exclude_none=True),
        "text_encoder": cfg.data.text_encoder.model_dump(exclude_none=True),
        "score": cfg.score,
        "optimizers": list(cfg.grid.optimizers),
        "method_axes": {name: dict(spec) for name, spec in cfg.grid.method_axes.items()},
        "runs": len(cells),
        "configs": len({c.config_key for c in cells}),
        "steps_per_run": cfg.schedule.steps,
        "batch_size": cfg.schedule.batch_size,
        "forward_backward_passes": passes * cfg.schedule.steps,
        "workers": resolve_workers(cfg),
    }


def _dataset_summary(cfg: CompareConfig) -> dict[str, Any]:
    dataset = cfg.data.dataset.model_dump(exclude_none=True)
    if dataset.get("kind") != "synthetic":
        dataset.pop("synthetic", None)
    if dataset.get("kind") == "mnist":  # the templates are in the config; the plan says how many
        mnist = dataset["mnist"]
        mnist["caption_templates"], mnist["prompt_templates"] = (len(mnist["caption_templates"]),
                                                                 len(mnist["prompt_templates"]))
    return dataset


def resolve_workers(cfg: CompareConfig) -> int:
    if cfg.workers != "auto":
        if cfg.workers < 1:
            raise AlignError(f"workers must be >= 1 or auto, got {cfg.workers}")
        return int(cfg.workers)
    import torch

    if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(4, _cores()))


def _cores() -> int:
    """The CPU cores this process may use: the node's, shared evenly by the ranks torchrun started on it."""
    from align.distributed import local_world_size

    return max(1, (os.cpu_count() or 1) // local_world_size())


# -- running ---------------------------------------------------------------------------------------------

PACK_HELP = "heads trained as one computation: auto (as many as the memory budget holds) or N (1: one cell at a time)"
_UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_memory(text: str) -> int:
    """Bytes from "512M", "8G", "1.5GiB", "2e9" (binary units); AlignError otherwise."""
    from align.config import shorten

    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    try:
        value = float(m.group(1)) * _UNITS[m.group(2).lower()] if m else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise AlignError(f"--memory-budget {shorten(str(text))!r} is not a size: use e.g. 512M, 8G or 2GiB")
    return int(value)


def default_memory_budget(device: str) -> int:
    """The default memory budget: 80% of what a CUDA device can still allocate, else half of the host's."""
    from align.device import available_memory, pick_device

    dev = pick_device(device)
    free = available_memory(dev)
    if free is None:  # cannot be told: assume a small machine rather than a big one
        free = 4 << 30
    return int(free * (0.8 if dev.type == "cuda" else 0.5))


def check_pack(pack: int | str) -> None:
    """AlignError unless ``pack`` is "auto" or a whole number >= 1."""
    if pack != "auto" and (isinstance(pack, bool) or not isinstance(pack, int) or pack < 1):
        raise AlignError(f"--pack must be auto or a whole number >= 1, got {pack!r}")


def pack_limit(cfg: CompareConfig, pack: int | str, memory_budget: str | int | None, workers: int) -> int:
    """How many heads one pack may hold: ``pack`` (a number, or "auto"), capped by what fits each worker's share
    of the memory budget; AlignError when not even one head fits."""
    from align.heads import build_model
    from align.pack import head_bytes
    from align.train import prepare_data

    check_pack(pack)
    budget = parse_memory(memory_budget) if memory_budget is not None else default_memory_budget(cfg.device)
    share = budget // max(1, workers)
    sized, data = prepare_data(cell_config(cfg, grid_cells(cfg.grid)[0], Path(".")))
    model = build_model(sized.head, sized.loss, sized.image_dim, sized.text_dim)
    val = data.val
    per_head = head_bytes(model, cfg.schedule.batch_size, val.num_images + val.num_captions,
                          metric=bool(cfg.optim.metric_beta))
    if per_head > share:
        raise AlignError(f"a memory budget of {share / 2 ** 20:.0f} MiB per worker cannot hold one head "
                         f"({per_head / 2 ** 20:.1f} MiB): raise --memory-budget or use fewer --workers")
    fit = share // per_head
    return int(fit if pack == "auto" else min(pack, fit))


PACK_SHARE = 3  # packs per worker a study is cut into at least, so that the workers finish together
MIN_PACK = 8  # ... but none smaller than this where it can be avoided: a CPU step costs little more per head from here


def plan_packs(cells: list[Cell], limit: int, workers: int) -> list[list[Cell]]:
    """Cells → packs of at most ``limit`` heads of one SAM-family optimizer (its perturbation is then computed for
    the whole pack at once; mixing methods costs a gather and a scatter of every tensor per step) or of single-pass
    optimizers only (a single-pass head would idle through the second pass), cells of one seed together (they share
    batches). Each group is cut into near-equal packs of about 1 / (``PACK_SHARE`` × workers) of the study's work
    (no fewer than ``MIN_PACK`` heads where the group allows), and the study into at least ``workers`` packs while
    cells allow; largest work first."""
    target = _pack_work(cells) / (PACK_SHARE * max(1, workers)) if cells else 1.0
    groups: dict[str | None, list[Cell]] = {}
    for cell in sorted(cells, key=lambda c: c.seed):
        groups.setdefault(cell.optimizer if optimizer_info(cell.optimizer).two_pass else None, []).append(cell)
    packs = []
    for group in groups.values():
        count = min(math.ceil(_pack_work(group) / target), max(1, len(group) // MIN_PACK))
        packs += _split(group, max(count, math.ceil(len(group) / max(1, limit))))
    while len(packs) < min(workers, len(cells)):  # few cells: every worker gets some
        largest = max(packs, key=len)
        packs.remove(largest)
        packs += _split(largest, 2)
    return sorted(packs, key=lambda p: -_pack_work(p))


def pack_layout(cfg: CompareConfig, root: Path, todo: list[Cell], pack: int | str,
                memory_budget: str | int | None, ranks: int = 1) -> tuple[list[list[Cell]], int]:
    """The study's packs and the threads each trains with: those its packs.json recorded (a resumed pack then
    replays exactly what it computed: same heads in the same slots, same threads, whatever ``--pack``, the memory
    or the core count say now), plus packs planned now for unfinished cells it does not hold (a first run, a grown
    grid), which are recorded too. Cells no longer in the grid leave their packs."""
    from align import report

    saved = report.read_pack_layout(root)
    by_key = {c.key: c for c in grid_cells(cfg.grid)}
    packs = [] if saved is None else [[by_key[k] for k in p if k in by_key] for p in saved["packs"]]
    packs = [p for p in packs if p]
    placed = {c.key for p in packs for c in p}
    new = [c for c in todo if c.key not in placed]
    workers = min(resolve_workers(cfg), max(1, len(new)))
    threads = saved["threads"] if saved is not None else max(1, _cores() // workers)
    if new:
        packs += plan_packs(new, pack_limit(cfg, pack, memory_budget, workers), workers * ranks)
        report.write_pack_layout(root, {"threads": threads, "packs": [[c.key for c in p] for p in packs]})
    return packs, threads


def _split(cells: list[Cell], count: int) -> list[list[Cell]]:
    """``cells`` in order, cut into ``count`` near-equal runs."""
    bounds = [round(i * len(cells) / count) for i in range(count + 1)]
    return [cells[a:b] for a, b in zip(bounds, bounds[1:])]


def _run_pack(cfg_jsons: list[dict[str, Any]], run_dirs: list[str], threads: int, pack_id: int = 0,
              steps_done: Any = None) -> list[dict[str, Any]]:
    """Train one pack of cells (in a worker process): resumes started runs, returns finished ones' results.
    ``steps_done.put((pack_id, k))`` after every step of k heads (a queue back to the study's progress bar)."""
    import torch

    torch.set_num_threads(threads)
    from align.train import train_pack

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


def _run_packs(jobs: list[tuple[list, list]], workers: int, threads: int, progress: _PackProgress) -> None:
    """Every pack, ``workers`` at a time (in worker processes when more than one); a failed pack (disk full, ...)
    stops the study: queued packs never start."""
    if workers == 1:
        for pack_id, job in enumerate(jobs):
            _run_pack(*job, threads, pack_id, progress)
            progress.finish(pack_id)
        return
    import multiprocessing as mp
    import queue
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = mp.get_context("spawn")
    steps_done = context.Queue()  # handed over at each worker's start (a queue cannot travel with a task)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), steps_done)) as pool:
        futures = {pool.submit(_run_pack, *job, threads, i): i for i, job in enumerate(jobs)}
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
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_study(cfg: CompareConfig, log: Log | None = None, progress: bool = True, pack: int | str = "auto",
              memory_budget: str | int | None = None) -> list[dict[str, Any]]:
    """Train every cell not yet finished, in packs of heads trained as one computation (``pack``: "auto" or at
    most N per pack; packs run in parallel worker processes where the hardware allows) → rows for results.csv.

    Under ``torchrun`` every rank calls this: rank 0 plans the packs, they are dealt out to the ranks (each on its
    own device, with ``workers`` processes of its own), and the rows are collected once every rank is done."""
    from align import distributed, runs
    from align.cache import embed_all
    from align.files import wait_until_visible

    log = log or (lambda message: None)
    check_pack(pack)
    if memory_budget is not None:
        parse_memory(memory_budget)
    root = study_dir(cfg)
    cells = grid_cells(cfg.grid)
    embed_all(cfg.data, progress=progress, log=log)  # a no-op when every split is cached; shared out under torchrun

    me = distributed.current()
    todo = distributed.from_main(lambda: [c for c in cells if not runs.RunDir(root / "runs" / c.key).is_finished()])
    log(f"study {cfg.name}: {len(cells)} runs, {len(cells) - len(todo)} already finished")
    packs, threads = distributed.from_main(lambda: pack_layout(cfg, root, todo, pack, memory_budget, me.world_size)) \
        if todo else ([], 1)
    left = {c.key for c in todo}
    packs = [p for p in packs if any(c.key in left for c in p)]  # whole: a finished cell keeps its slot, idle
    workers = max(1, min(resolve_workers(cfg), len(packs), _cores() // threads))  # per rank
    if packs:
        ranks = f" on each of {me.world_size} ranks" if me.distributed else ""
        log(f"{len(todo)} runs in {len(packs)} pack(s) of up to {max(len(p) for p in packs)} heads, "
            f"{workers} at a time{ranks}")
    mine = [packs[i] for i in distributed.deal([_pack_work(p) for p in packs], me.world_size)[me.rank]]
    jobs = [_pack_job(cfg, root, p) for p in mine]
    sizes = [sum(c.key in left for c in p) for p in mine]
    with distributed.together():  # every rank's packs finished (or the first failure raised everywhere)
        _train_packs(jobs, sizes, workers, threads, cfg.schedule.steps, len(cells), len(cells) - len(todo),
                     f"study {cfg.name}", progress and me.is_main)
    if me.distributed:  # the other ranks' cells, on a shared file system that may show them late
        distributed.from_main(lambda: wait_until_visible([runs.RunDir(root / "runs" / c.key).results_path
                                                          for c in todo], "cell results"))
    return distributed.from_main(lambda: collect_rows(cfg))


def _pack_work(cells: list[Cell]) -> float:
    """Cells' relative cost: heads × passes per step."""
    return float(sum(2 if optimizer_info(c.optimizer).two_pass else 1 for c in cells))


def _pack_job(cfg: CompareConfig, root: Path, cells: list[Cell]) -> tuple[list[dict[str, Any]], list[str]]:
    """(cell configs as JSON, run folders) of one pack; under torchrun the configs name this rank's device."""
    from align import distributed
    from align.device import pick_device

    configs = [cell_config(cfg, c, root / "runs" / c.key).model_dump(mode="json") for c in cells]
    if distributed.current().distributed:  # "cuda" → this rank's cuda:LOCAL_RANK (the device is not hashed)
        device = str(distributed.rank_device(pick_device(cfg.device)))
        configs = [dict(c, device=device) for c in configs]
    return configs, [str(root / "runs" / c.key) for c in cells]


def _train_packs(jobs: list[tuple[list[dict[str, Any]], list[str]]], sizes: list[int], workers: int, threads: int,
                 steps: int, total: int, done: int, title: str, progress: bool) -> None:
    """Train the packs ``jobs`` (see ``_run_packs``; ``sizes``: the cells each has left) under a bar of ``total``
    cells, ``done`` of them finished."""
    from align.progress import progress_bar

    with progress_bar(total, title, enabled=progress) as bar:
        bar.advance(done)
        _run_packs(jobs, workers, threads, _PackProgress(bar, steps, sizes, start=done))


def run_compare(cfg: CompareConfig, log: Log | None = None, progress: bool = True, pack: int | str = "auto",
                memory_budget: str | int | None = None) -> dict[str, Any]:
    """The whole study: its config.yaml, every cell (in packs, see ``run_study``), then results.csv, the tables,
    plots and report.md. Under ``torchrun``: rank 0 holds the study's lock and writes every file but the cells'
    run folders; every rank gets the same result."""
    from align import distributed, report
    from align.device import pick_device
    from align.locks import exclusive
    from align.train import check_head_fits

    root = study_dir(cfg)
    check_head_fits(cfg, distributed.rank_device(pick_device(cfg.device)))  # before any embedding
    hint = "another align compare is running it; wait for it to finish or use --out NEW_DIR"
    with distributed.main_holds(lambda: exclusive(root, "study", hint)):
        def begin() -> None:
            report.clear_temp_files(root)  # of a killed run; we hold the lock, so no writer owns them
            report.write_study_config(root, cfg)

        distributed.from_main(begin)
        rows = run_study(cfg, log=log, progress=progress, pack=pack, memory_budget=memory_budget)
        return distributed.from_main(lambda: dict(report.write_report(root, cfg, rows), study_dir=root))


def collect_rows(cfg: CompareConfig) -> list[dict[str, Any]]:
    """One flat row per finished cell, in grid order (deterministic: no timings)."""
    from align import runs

    rows = []
    for cell in grid_cells(cfg.grid):
        run = runs.RunDir(study_dir(cfg) / "runs" / cell.key)
        if run.is_finished():
            rows.append(result_row(cell, run.read_results()))
    return rows


def result_row(cell: Cell, results: dict[str, Any]) -> dict[str, Any]:
    """Flatten one run's results.json into a results.csv row (method-axis values, if any, after ρ)."""
    row: dict[str, Any] = {"run": cell.key, "optimizer": cell.optimizer, "lr": cell.lr, "rho": cell.rho,
                           **dict(cell.method), "seed": cell.seed, "status": "ok" if results.get("status") == "done" else "diverged",
                           "diverged_at": results.get("diverged_at"), "steps_done": results.get("steps_done"),
                           "best_step": results.get("best_step")}
    for prefix in ("best_test", "final_test", "best_val", "max_val"):
        for key, value in (results.get(prefix) or {}).items():
            row[f"{prefix}_{key}"] = value
    row["loss_at_step"] = results.get("loss_at_step")
    row["final_loss"] = results.get("final_loss")
    for key, value in ((results.get("sharpness") or {}).get("best") or {}).items():
        row[f"sharpness_{key}"] = value
    return row
