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

from pathlib import Path
from typing import Any

from align.common.progress import Log
from align.optim import optimizer_info
from align.study.config import Cell, CompareConfig, cell_config, grid_cells
from align.study.packing import _cores, _pack_work, check_pack, pack_layout, parse_memory, resolve_workers
from align.study.studies import study_dir
from align.study.workers import _train_packs


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


def run_study(cfg: CompareConfig, log: Log | None = None, progress: bool = True, pack: int | str = "auto",
              memory_budget: str | int | None = None) -> list[dict[str, Any]]:
    """Train every cell not yet finished, in packs of heads trained as one computation (``pack``: "auto" or at
    most N per pack; packs run in parallel worker processes where the hardware allows) → rows for results.csv.

    Under ``torchrun`` every rank calls this: rank 0 plans the packs, they are dealt out to the ranks (each on its
    own device, with ``workers`` processes of its own), and the rows are collected once every rank is done."""
    from align.cache.write import embed_all
    from align.common import distributed
    from align.common.files import wait_until_visible
    from align.train import runs

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


def _pack_job(cfg: CompareConfig, root: Path, cells: list[Cell]) -> tuple[list[dict[str, Any]], list[str]]:
    """(cell configs as JSON, run folders) of one pack; under torchrun the configs name this rank's device."""
    from align.common import distributed
    from align.common.device import pick_device

    configs = [cell_config(cfg, c, root / "runs" / c.key).model_dump(mode="json") for c in cells]
    if distributed.current().distributed:  # "cuda" → this rank's cuda:LOCAL_RANK (the device is not hashed)
        device = str(distributed.rank_device(pick_device(cfg.device)))
        configs = [dict(c, device=device) for c in configs]
    return configs, [str(root / "runs" / c.key) for c in cells]


def run_compare(cfg: CompareConfig, log: Log | None = None, progress: bool = True, pack: int | str = "auto",
                memory_budget: str | int | None = None) -> dict[str, Any]:
    """The whole study: its config.yaml, every cell (in packs, see ``run_study``), then results.csv, the tables,
    plots and report.md. Under ``torchrun``: rank 0 holds the study's lock and writes every file but the cells'
    run folders; every rank gets the same result."""
    from align.common import distributed
    from align.common.device import pick_device
    from align.common.locks import exclusive
    from align.study import report, studies
    from align.train.memory import check_head_fits

    root = study_dir(cfg)
    check_head_fits(cfg, distributed.rank_device(pick_device(cfg.device)))  # before any embedding
    hint = "another align compare is running it; wait for it to finish or use --out NEW_DIR"
    with distributed.main_holds(lambda: exclusive(root, "study", hint)):
        def begin() -> None:
            studies.clear_temp_files(root)  # of a killed run; we hold the lock, so no writer owns them
            studies.write_study_config(root, cfg)

        distributed.from_main(begin)
        rows = run_study(cfg, log=log, progress=progress, pack=pack, memory_budget=memory_budget)
        return distributed.from_main(lambda: dict(report.write_report(root, cfg, rows), study_dir=root))


def collect_rows(cfg: CompareConfig) -> list[dict[str, Any]]:
    """One flat row per finished cell, in grid order (deterministic: no timings)."""
    from align.train import runs

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
