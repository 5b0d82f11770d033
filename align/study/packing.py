"""Packing a study's cells (orchestration): how many heads one pack may hold under the memory budget (sized from
the caches' manifests: the parent never loads a split), which cells share a pack, the layout recorded at the first
run, and the workers and threads.
"""
from __future__ import annotations

import math
import os
import re

import torch

from align.common.config import shorten
from align.common.device import available_memory, pick_device
from align.common.distributed import local_world_size
from align.common.errors import AlignError
from align.optim import optimizer_info
from align.optim.batched import keeps_method_state
from align.optim.registry import forward_backward_passes
from align.study.config import Cell, CompareConfig, cell_hparams, grid_cells
from align.study.studies import StudyDir
from align.train.memory import VALUE_BYTES, OptimizerMemory, data_memory, head_memory, heads_that_fit
from align.train.run_data import planned_roles


def resolve_workers(cfg: CompareConfig) -> int:
    if cfg.workers != "auto":
        if cfg.workers < 1:
            raise AlignError(f"workers must be >= 1 or auto, got {cfg.workers}")
        return int(cfg.workers)
    if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(4, usable_cores()))


def usable_cores() -> int:
    """The CPU cores this process may use: the node's, shared evenly by the ranks torchrun started on it."""
    return max(1, (os.cpu_count() or 1) // local_world_size())


PACK_HELP = "heads trained as one computation: auto (as many as the memory budget holds) or N (1: one cell at a time)"
_UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_memory(text: str) -> int:
    """Bytes from "512M", "8G", "1.5GiB", "2e9" (binary units); AlignError otherwise."""
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
    of the memory budget once the pack's data are counted (``data_memory``: its batches in flight, one group per
    seed of the grid at most, and a validation chunk); AlignError when not even one head fits. The head is sized
    from the caches' manifests, at the most any optimizer of the grid keeps (``OptimizerMemory``'s defaults)."""
    check_pack(pack)
    budget = parse_memory(memory_budget) if memory_budget is not None else default_memory_budget(cfg.device)
    share = budget // max(1, workers)
    sized, eval_rows = planned_roles(cfg)  # the splits checked in their roles from the manifests: nothing loaded
    optimizer = OptimizerMemory(metric=keeps_state(cfg))
    data = data_memory(sized, eval_rows, groups=len(cfg.grid.seeds), device=pick_device(cfg.device))
    fit = heads_that_fit(sized, share - data, eval_rows, optimizer)  # the pack's logits as a whole (blocks shrink)
    if fit < 1:
        one = head_memory(sized, eval_rows, optimizer)
        raise AlignError(f"a memory budget of {share / 2 ** 20:.0f} MiB per worker cannot hold one head "
                         f"({one.bytes / 2 ** 20:.1f} MiB, {VALUE_BYTES * one.logits / 2 ** 20:.1f} of them the "
                         f"loss's logits) and its data ({data / 2 ** 20:.1f} MiB of batches in flight and "
                         f"validation rows): raise --memory-budget or use fewer --workers")
    return int(fit if pack == "auto" else min(pack, fit))


PACK_SHARE = 3  # packs per worker a study is cut into at least, so that the workers finish together
MIN_PACK = 8  # ... but none smaller than this where it can be avoided: a CPU step costs little more per head from here


def plan_packs(cells: list[Cell], limit: int, workers: int) -> list[list[Cell]]:
    """Cells → packs of at most ``limit`` heads of one SAM-family optimizer (its perturbation is then computed for
    the whole pack at once; mixing methods costs a gather and a scatter of every tensor per step) or of single-pass
    optimizers only (a single-pass head would idle through the second pass), of one head rescaling, cells of one
    seed together (they share batches). Each group is cut into near-equal packs of about 1 / (``PACK_SHARE`` × workers) of the study's work
    (no fewer than ``MIN_PACK`` heads where the group allows), and the study into at least ``workers`` packs while
    cells allow; largest work first."""
    target = pack_work(cells) / (PACK_SHARE * max(1, workers)) if cells else 1.0
    groups: dict[tuple[str | None, float | None], list[Cell]] = {}
    for cell in sorted(cells, key=lambda c: c.seed):  # a head rescaling is another model: a pack of its own
        method = cell.optimizer if optimizer_info(cell.optimizer).two_pass else None
        groups.setdefault((method, cell.rescale), []).append(cell)
    packs = []
    for group in groups.values():
        count = min(math.ceil(pack_work(group) / target), max(1, len(group) // MIN_PACK))
        packs += _split(group, max(count, math.ceil(len(group) / max(1, limit))))
    while len(packs) < min(workers, len(cells)):  # few cells: every worker gets some
        largest = max(packs, key=len)
        packs.remove(largest)
        packs += _split(largest, 2)
    return sorted(packs, key=lambda p: -pack_work(p))


def pack_layout(cfg: CompareConfig, study: StudyDir, todo: list[Cell], pack: int | str,
                memory_budget: str | int | None, ranks: int = 1) -> tuple[list[list[Cell]], int]:
    """The study's packs and the threads each trains with: those its packs.json recorded (a resumed pack then
    replays exactly what it computed: same heads in the same slots, same threads, whatever ``--pack``, the memory
    or the core count say now), plus packs planned now for unfinished cells it does not hold (a first run, a grown
    grid), which are recorded too. Cells no longer in the grid leave their packs."""
    saved = study.read_pack_layout()
    by_key = {c.key: c for c in grid_cells(cfg.grid)}
    packs = [] if saved is None else [[by_key[k] for k in p if k in by_key] for p in saved["packs"]]
    packs = [p for p in packs if p]
    placed = {c.key for p in packs for c in p}
    new = [c for c in todo if c.key not in placed]
    workers = min(resolve_workers(cfg), max(1, len(new)))
    threads = saved["threads"] if saved is not None else max(1, usable_cores() // workers)
    if new:
        packs += plan_packs(new, pack_limit(cfg, pack, memory_budget, workers), workers * ranks)
        study.write_pack_layout({"threads": threads, "packs": [[c.key for c in p] for p in packs]})
    return packs, threads


def _split(cells: list[Cell], count: int) -> list[list[Cell]]:
    """``cells`` in order, cut into ``count`` near-equal runs."""
    bounds = [round(i * len(cells) / count) for i in range(count + 1)]
    return [cells[a:b] for a, b in zip(bounds, bounds[1:])]


def pack_work(cells: list[Cell]) -> float:
    """Cells' relative cost: heads × passes per step (LookSAM's 1 + 1/k at its k of the cell's axes, else the
    default)."""
    return float(sum(forward_backward_passes(c.optimizer, dict(c.method), PER_STEP) / PER_STEP for c in cells))


PER_STEP = 10 ** 6  # steps over which passes are counted for the work per step (exact to 1e-6)


def keeps_state(cfg: CompareConfig) -> bool:
    """Whether any cell's method keeps a copy of each value of its own (``align.optim.batched.keeps_method_state``)."""
    return any(keeps_method_state(c.optimizer, cell_hparams(cfg, c)) for c in grid_cells(cfg.grid)
               if optimizer_info(c.optimizer).two_pass)
