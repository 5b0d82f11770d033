"""The optimizer study (orchestration): a grid of optimizers × ρ × learning rate × seeds on one cached embedding
set, run from start to report (``run_compare``), and its ``--dry-run`` plan.

Each cell is an ordinary training run directory (``<study>/runs/<cell>``, kept by ``align.study.studies.StudyDir``),
so a study is resumable for free: finished cells are skipped and an interrupted cell resumes from its last
checkpoint. Cells are trained in packs (``align.train.loop.train_pack``: K heads as one computation) of one
SAM-family optimizer or of single-pass ones, no more per pack than the memory budget holds
(``align.study.packing``). The layout is recorded at the first run (``packs.json``) and kept by every rerun, so a
resumed study writes the bytes of an uninterrupted one; ``--pack 1`` (one cell at a time) agrees with a packed study
to floating-point noise (BLAS sums another shape in another order). The statistics (``align.study.stats``) and
the files that show them (``align.study.report``) come once every cell is finished.

Under ``torchrun`` (``align.common.distributed``) the packs are dealt out to the ranks, each training its own on its
own device into the study's run folders (a file system every rank sees); rank 0 holds the study's lock, plans,
collects the rows and writes results.csv, the tables, plots and report, which equal a single process's. The other
ranks hold the study folder's read-only twin, so every rank runs the same code.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from align.cache.key import CachesConfig, split_folder
from align.cache.read import split_manifest
from align.cache.write import embed_all
from align.common.errors import AlignError
from align.common import distributed
from align.common.device import pick_device
from align.common.progress import Log, progress_bar
from align.optim.registry import forward_backward_passes
from align.study.beside import read_beside
from align.study.config import Cell, CompareConfig, cell_config, cell_hparams, grid_cells
from align.study.packing import check_pack, pack_layout, pack_work, parse_memory, resolve_workers, usable_cores
from align.study.studies import StudyDir, study_dir
from align.study.workers import PackJob, train_packs
from align.train.memory import check_head_fits
from align.train.run_data import planned_roles, role_splits
from align.train.tracking import check_installed


def check_study(cfg: CompareConfig, pack: int | str = "auto", memory_budget: str | int | None = None) -> None:
    """What a study checks before any work (``--dry-run`` included): ``pack``, ``memory_budget``, that the trackers of
    ``report_to`` are installed, and the
    summary.csv of the study it ranks beside (``beside``), so that none of them fails after the cells trained."""
    check_pack(pack)
    check_installed(cfg.report_to)
    if memory_budget is not None:
        parse_memory(memory_budget)
    if cfg.beside:
        read_beside(cfg.beside)
    if isinstance(cfg.data, CachesConfig):  # nothing to embed: the caches must be there now, and fit their roles
        _check_named_caches(cfg)


def _check_named_caches(cfg: CompareConfig) -> None:
    """The caches a study names exist, fit their roles (``planned_roles``) and, for a zero-shot score, have class
    labels; from their manifests (no array read)."""
    planned_roles(cfg)
    if cfg.score.startswith("zeroshot"):
        for split in role_splits(cfg):
            if "labels.npy" not in split_manifest(cfg.data, split)["files"]:
                raise AlignError(f"score {cfg.score} needs class labels, but the cache of split {split!r} "
                                 f"({split_folder(cfg.data, split).name}) has none: use score: mean_R@1")


def plan(cfg: CompareConfig) -> dict[str, Any]:
    """What the study will do, without touching the network or writing to the disk (``--dry-run``); the study
    it ranks beside is checked (``check_study``)."""
    check_study(cfg)
    cells = grid_cells(cfg.grid)
    steps = cfg.schedule.steps
    passes = sum(forward_backward_passes(c.optimizer, cell_hparams(cfg, c), steps) for c in cells)
    return {
        "study_dir": str(study_dir(cfg)),
        **_data_summary(cfg),
        "score": cfg.score,
        "optimizers": list(cfg.grid.optimizers),
        "method_axes": {name: dict(spec) for name, spec in cfg.grid.method_axes.items()},
        "runs": len(cells),
        "configs": len({c.config_key for c in cells}),
        "steps_per_run": cfg.schedule.steps,
        "batch_size": cfg.schedule.batch_size,
        "forward_backward_passes": passes,  # LookSAM: steps + ⌈steps/k⌉ per run
        "workers": resolve_workers(cfg),
    }


def _data_summary(cfg: CompareConfig) -> dict[str, Any]:
    """The plan's data: the dataset, splits and encoders of an embed section; the caches a caches section names
    (their folders), its splits and the encoders their manifests record (the training split's)."""
    if isinstance(cfg.data, CachesConfig):
        encoders = split_manifest(cfg.data, "train")["encoders"]
        return {"caches": {split: str(split_folder(cfg.data, split)) for split in cfg.data.caches},
                "splits": list(cfg.data.splits), "image_encoder": encoders.get("image"),
                "text_encoder": encoders.get("text")}
    return {"dataset": _dataset_summary(cfg), "splits": list(cfg.data.splits),
            "image_encoder": cfg.data.image_encoder.model_dump(exclude_none=True),
            "text_encoder": cfg.data.text_encoder.model_dump(exclude_none=True)}


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
    log = log or (lambda message: None)
    check_pack(pack)
    if memory_budget is not None:
        parse_memory(memory_budget)
    job = distributed.current()
    study = StudyDir.for_rank(study_dir(cfg), job)
    cells = grid_cells(cfg.grid)
    if not isinstance(cfg.data, CachesConfig):  # named caches are finished (checked by check_study)
        embed_all(cfg.data, progress=progress, log=log)  # a no-op when every split is cached; shared under torchrun

    todo = distributed.from_main(lambda: study.unfinished(cells))
    log(f"study {cfg.name}: {len(cells)} runs, {len(cells) - len(todo)} already finished")
    packs, threads = distributed.from_main(lambda: pack_layout(cfg, study, todo, pack, memory_budget,
                                                               job.world_size)) if todo else ([], 1)
    left = {c.key for c in todo}
    packs = [p for p in packs if any(c.key in left for c in p)]  # whole: a finished cell keeps its slot, idle
    workers = max(1, min(resolve_workers(cfg), len(packs), usable_cores() // threads))  # per rank
    if packs:
        ranks = f" on each of {job.world_size} ranks" if job.distributed else ""
        log(f"{len(todo)} runs in {len(packs)} pack(s) of up to {max(len(p) for p in packs)} heads, "
            f"{workers} at a time{ranks}")
    mine = [packs[i] for i in distributed.deal([pack_work(p) for p in packs], job.world_size)[job.rank]]
    jobs = [_pack_job(cfg, study, p, left) for p in mine]
    with progress_bar(len(cells), f"study {cfg.name}", enabled=progress and job.is_main) as bar, \
            distributed.together():  # every rank's packs finished (or the first failure raised everywhere)
        train_packs(jobs, workers, threads, cfg.schedule.steps, bar, done=len(cells) - len(todo))
    if job.distributed:  # the other ranks' cells, on a shared file system that may show them late
        distributed.from_main(lambda: study.wait_for_results(todo))
    return distributed.from_main(lambda: study.rows(cells))


def _pack_job(cfg: CompareConfig, study: StudyDir, cells: list[Cell], left: set[str]) -> PackJob:
    """One pack for a worker (``left``: the keys of the cells not finished yet); under torchrun its configs name
    this rank's device."""
    configs = [cell_config(cfg, c, study.run_path(c)).model_dump(mode="json") for c in cells]
    if distributed.current().distributed:  # "cuda" → this rank's cuda:LOCAL_RANK (the device is not hashed)
        device = str(distributed.rank_device(pick_device(cfg.device)))
        configs = [dict(c, device=device) for c in configs]
    return PackJob(configs, [str(study.run_path(c)) for c in cells], left=sum(c.key in left for c in cells))


def run_compare(cfg: CompareConfig, log: Log | None = None, progress: bool = True, pack: int | str = "auto",
                memory_budget: str | int | None = None) -> dict[str, Any]:
    """The whole study: its config.yaml, every cell (in packs, see ``run_study``), then results.csv, the tables,
    plots and report.md. Under ``torchrun``: rank 0 holds the study's lock and writes every file but the cells'
    run folders; every rank gets the same result."""
    distributed.from_main(lambda: check_study(cfg, pack, memory_budget))  # before the config and lock are written
    study = StudyDir.for_rank(study_dir(cfg), distributed.current())
    distributed.from_main(study.check_writable)  # before any work; a refusal reaches every rank
    check_head_fits(cfg, distributed.rank_device(pick_device(cfg.device)))  # before any embedding
    with ExitStack() as held:
        with distributed.together():  # rank 0 holds the lock (a refusal stops every rank) and begins the study
            held.enter_context(study.lock())
            study.clear_temp_files()  # of a killed run; we hold the lock, so no writer owns them
            study.write_config(cfg)
        rows = run_study(cfg, log=log, progress=progress, pack=pack, memory_budget=memory_budget)
        with distributed.together():
            written = study.write_report(cfg, rows)
        return dict(distributed.from_main(lambda: written), study_dir=study.path)
