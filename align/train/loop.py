"""The training loop (orchestration): alignment heads trained on cached embeddings with any registered optimizer.

One loop trains a pack of K runs at once (``train_pack``; ``train`` is the pack of one that ``align train`` runs):
runs that differ only in optimizer, seed and logit clamp share one ``align.train.pack.HeadPack``, whose step is
``align.optim.step.take_step``'s for every head at once. Each run (``align.train.run.Run``) keeps its own run
directory, data order, schedule, validation, best checkpoint, divergence and results. A pack keeps its layout (its
runs, in slot order) from its first step to its last: a finished run holds its slot as an idle head, and a resumed
pack restarts all its runs from one step they all have a checkpoint of. A run's bits therefore depend on its own
config and on its pack's layout, never on when the pack was interrupted (the other heads' values never enter a
head's arithmetic; only the shapes of the batched matmuls do, which BLAS may compute in another order for another
pack size: a run trained in another pack agrees to floating-point noise, 1e-9 relative in float64).

One step: a batch of B images (the images of each epoch in the order ``schedule.order`` draws: a random
permutation, or shuffled blocks of rows; for multi-caption data one random caption per image per epoch), its rows
gathered from the cache's memory maps as float32 while the step before computes (``align.train.batches``; a split
is never copied whole), the contrastive loss of the head's outputs, then either one optimizer step
or — for optimizers whose registry entry says ``two_pass`` (the SAM family) — the perturbation, a second forward-
backward and the base step. The learning rate follows linear warm-up then cosine decay to 0 from each run's peak.
After each step the logit scale is clamped by the configured policy. Every ``eval.every`` steps the runs are
validated (``align.train.evaluation``), every ``checkpoint_every`` steps checkpointed (``align.train.checkpoint``);
a run that diverged or reached its last step is finished: its results are measured and written.

Choices that change M-SAM's perturbation (it depends on the gradient's scale, see paper-notes.md) are fixed:
mean-reduced loss, no loss scaling (bf16 autocast on CUDA needs none), no gradient accumulation, gradient
clipping (``optim.grad_clip``) applied to the gradient the base optimizer steps with — for the SAM family the
second one, never the first. ``grad_norm`` in metrics.jsonl is ‖g‖ over all trainable parameters at θ.

Determinism: the head is initialised from ``seed`` (``torch.manual_seed(seed)`` then ``build_model``); the data
order of epoch e comes from a generator seeded by (seed, e), so it never depends on how often a run was
interrupted. Resuming a pack from its checkpoints reaches bit-identical final weights on the same machine.

Data-parallel: under ``torchrun`` every rank runs ``train`` with the same run, in the process group the command
joined (``align.common.distributed.joined``); each takes its slice of every batch (the single-process batch, cut
in equal parts in rank order), the pack computes the whole batch's loss and steps every rank with the mean gradient
(``align.train.pack``), so the ranks keep identical heads. Rank 0 writes the run directory (the others hold its
read-only twin) and evaluates while the others wait; every rank reads the checkpoint it resumes from.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from align.common import distributed
from align.common.config import dump_config
from align.common.device import keep_freed_memory, pick_device
from align.common.errors import AlignError, is_out_of_memory, out_of_memory_error
from align.common.files import json_safe
from align.common.progress import Log, progress_bar
from align.train.batches import BatchReader
from align.train.checkpoint import ends_run, with_rank_metrics
from align.train.collapse import uniform_loss
from align.train.config import TrainConfig, pack_key
from align.train.evaluation import RunEvaluator
from align.train.memory import check_head_fits
from align.train.pack import HeadPack
from align.train.run import Run
from align.train.run_data import RunData, Sampler, lr_factor, prepare_data, resolve_dims
from align.train.run_dir import RunDir
from align.train.tracking import check_installed


class Trainer:
    """K runs of one architecture on one device (K = 1 for ``align train``): their heads trained as one
    ``HeadPack``, each with its own run directory, data order, schedule, validation, checkpoints and results."""

    def __init__(self, cfgs: list[TrainConfig], data: RunData, device: torch.device, dirs: list[RunDir],
                 started: float, job: distributed.Rank = distributed.SINGLE) -> None:
        if len({pack_key(c) for c in cfgs}) != 1:
            raise AlignError("runs of one pack must differ only in optim, seed and loss.clamp")
        self.cfg, self.device, self.started = cfgs[0], device, started
        self.job = job  # data-parallel under torchrun: this rank trains on its slice of every batch
        batch, world = self.cfg.schedule.batch_size, self.job.world_size
        if batch % world:
            raise AlignError(f"schedule.batch_size={batch} must be a multiple of the {world} ranks (each takes an "
                             f"equal slice of every batch): use --set schedule.batch_size={batch - batch % world}")
        self.bf16 = self.cfg.uses_bf16(device)
        samplers: dict[int, Sampler] = {}  # runs of one seed share their data order
        self.runs: list[Run] = []
        sched = self.cfg.schedule
        for cfg, directory in zip(cfgs, dirs):  # row indices on the host: the rows are gathered there
            sampler = samplers.get(cfg.seed) or Sampler(data.train.caption_to_image, data.train.num_images,
                                                        batch, cfg.seed, torch.device("cpu"), sched.order,
                                                        sched.block_rows)
            samplers[cfg.seed] = sampler
            self.runs.append(Run.create(cfg, directory, sampler, device))
        # The training rows stay in the cache's memory maps: each step's are gathered (and the next's read ahead)
        self.reader = BatchReader(data.train.image, data.train.text, self._step_rows, device, sched.steps)
        self.evaluator = RunEvaluator(self.cfg, data, device, self.runs[0].model, "bf16" if self.bf16 else "fp32")
        self.uniform = uniform_loss(self.cfg.loss.kind, batch)
        self.slots: list[Run] = []  # the pack's layout: every run, finished ones included, in slot order
        self.pack: HeadPack | None = None
        self.pack_step = 0  # the step every run still training is at
        self.share = 1  # runs trained in this session

    def wall_time(self, run: Run) -> float:
        """The run's wall time: its earlier sessions plus its share of this session (the pack's time / its runs)."""
        return run.state.wall_before + (time.perf_counter() - self.started) / max(1, self.share)

    def restore(self, todo: list[tuple[Run, str]], log: Log) -> None:
        """The state each run still to train starts from (only reads; ``_train_locked`` then begins the run
        directories). A run whose newest checkpoint is its last (it diverged, or reached its final step, before its
        results were written) is finished from it. All others start at one step: the newest that every one of them
        has a checkpoint of (step 0 if none), so the pack replays exactly what it computed before the interruption."""
        pending = []
        for run, kind in todo:
            found = run.dir.latest_checkpoint() if kind == "resume" else None
            if found is not None and ends_run(found[1], run.cfg.schedule.steps):
                run.resume_from(*found, self.device, self.job)
            else:
                pending.append((run, kind))
        common = set.intersection(*(set(r.dir.checkpoint_steps()) for r, _ in pending)) if pending else set()
        while common:
            step = max(common)
            try:
                loaded = [run.dir.load_checkpoint(step) for run, _ in pending]
            except AlignError:  # one of them is damaged: an older step
                common.discard(step)
                continue
            for (run, _), found in zip(pending, loaded):
                run.resume_from(*found, self.device, self.job)
            break
        for run, kind in pending:
            newest = max(run.dir.checkpoint_steps(), default=0) if kind == "resume" else 0
            if kind == "resume" and newest == 0:
                log(f"{run.dir.path} has no checkpoint yet: starting from step 0")
            elif newest > run.state.step:
                log(f"{run.dir.path}: its pack resumes at step {run.state.step}, the newest step all its runs "
                    f"have a checkpoint of (its own newest: {newest})")

    def build_pack(self) -> None:
        """Stack every run in its slot, in the order given with runs of one seed side by side (they share a batch);
        finished runs keep their slots as idle heads, so the pack's layout is the one it was planned with."""
        self.slots = sorted(self.runs, key=lambda r: r.cfg.seed)
        training = [r for r in self.slots if r.results is None]
        self.share = max(1, len(training))
        if not training:
            return
        self.pack_step = min((r.state.step for r in training if not r.ended()), default=0)
        self.pack = HeadPack([r.model for r in self.slots], [r.hparams for r in self.slots],
                             [r.cfg.loss.clamp for r in self.slots], job=self.job)
        for slot, run in enumerate(self.slots):
            run.model = None  # its weights live in the pack now
            if run.results is None and run.optim_saved is not None:
                self.pack.load_optim_state_(slot, run.optim_saved, run.state.step)

    def running(self) -> list[int]:
        """Slots of the runs still training (not finished, not diverged)."""
        return [s for s, r in enumerate(self.slots) if r.results is None and r.state.diverged is None]

    def checkpoint(self, run: Run, slot: int, keep: int | None = None) -> None:
        """A resumable checkpoint of the run in ``slot`` at its step (``Run.checkpoint``). Every rank takes part:
        M-SAM's averaged metric with a local perturbation is each rank's own, gathered into the checkpoint."""
        optim = self.pack.optim_state(slot)
        if self.job.distributed and bool(self.pack.hp.local_perturbation[slot]) and bool(self.pack.method_state):
            optim = with_rank_metrics(optim)
        run.checkpoint(self.pack.head_state(slot), optim, self.wall_time(run), keep)

    # -- training
    def _step_rows(self, step: int) -> list[tuple[slice, Tensor, Tensor]]:
        """Each run of slots with one seed and the rows of the batch they share at ``step`` (under torchrun: this
        rank's slice); idle slots take their seed's batch too, so every step has the shapes of the pack's first."""
        groups, start = [], 0
        for slot in range(1, len(self.slots) + 1):
            a = self.slots[start]
            if slot == len(self.slots) or self.slots[slot].cfg.seed != a.cfg.seed:
                groups.append((slice(start, slot), *self._rank_slice(*a.sampler.batch(step))))
                start = slot
        return groups

    def _rank_slice(self, images: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's equal slice of a batch's rows (rank r takes the r-th; the batch is the single-process one)."""
        if not self.job.distributed:
            return images, captions
        size = len(images) // self.job.world_size
        lo = self.job.rank * size
        return images[lo:lo + size], captions[lo:lo + size]

    def step(self) -> None:
        """One optimizer step of every run still training, and each one's metrics record (idle slots: no step)."""
        sched, running = self.cfg.schedule, self.running()
        factor = lr_factor(self.pack_step, sched.steps, sched.warmup_steps)
        lr = [peak * factor for peak in self.pack.hp.host["lr"]]
        active = torch.zeros(len(self.slots), dtype=torch.bool, device=self.device)
        active[running] = True
        stats = self.pack.step(self.reader.batches(self.pack_step), lr, active=active, bf16=self.bf16)
        host = {k: getattr(stats, k).tolist() for k in ("loss", "grad_norm", "sam_grad_norm", "delta_norm", "skipped")}
        host["log_scale"], host["lr"] = self.pack.log_scale().tolist(), lr
        for slot in running:
            self.slots[slot].log_step({k: v[slot] for k, v in host.items()}, self.uniform)
        self.pack_step += 1

    def after_step(self) -> None:
        """Validate and checkpoint the runs that are due; finish the runs that diverged or reached the end."""
        steps, every = self.cfg.schedule.steps, self.cfg.eval.every
        due = [s for s in self.running() if self.slots[s].state.step % every == 0 or self.slots[s].state.step == steps]
        if due:  # rank 0 validates, the others wait for its numbers
            for slot, metrics in zip(due, distributed.from_main(lambda: self.evaluator.validate(self.pack, due),
                                                                self.job)):
                self.slots[slot].log_validation(metrics, lambda slot=slot: self.pack.head_state(slot))
        saving = [s for s in self.running() if self.slots[s].state.step % self.slots[s].cfg.checkpoint_every == 0
                  and self.slots[s].state.step != steps]
        for slot in saving:
            self.checkpoint(self.slots[slot], slot, keep=0)
        for slot in saving:  # older checkpoints go once every run has this one: a resume always finds a common step
            self.slots[slot].dir.prune_checkpoints(self.slots[slot].cfg.keep_checkpoints)
        self.finish_done()

    def finish_done(self) -> None:
        """Finish the runs that diverged or reached their last step; their slots stay in the pack, idle."""
        for slot, run in enumerate(self.slots):
            if run.results is None and run.ended():
                self.finish(run, slot)

    def finish(self, run: Run, slot: int) -> None:
        """The run's final checkpoint (a diverged run still reports its best head), its results and results.json
        (measured by rank 0; every rank gets them)."""
        self.checkpoint(run, slot)
        run.results = distributed.from_main(lambda: self.evaluator.results(
            run, self.pack.head_state(slot), int(self.pack.skipped_steps[slot]), lambda: self.wall_time(run)
        ).to_json(), self.job)
        run.dir.write_results(run.results)

    def loop(self, progress: bool, on_step: Callable[[int], None] | None = None) -> None:
        """Train until every run reached its last step or diverged (``on_step(k)`` after each step of k runs: a
        study's progress across worker processes)."""
        running = self.running()
        name = self.slots[running[0]].cfg.optim.name if len(running) == 1 else f"{len(running)} heads"
        with progress_bar(self.cfg.schedule.steps, f"training {name}", enabled=progress) as bar:
            bar.advance(self.pack_step)
            try:
                while running:
                    self.step()
                    if on_step is not None:
                        on_step(len(running))
                    self.after_step()
                    bar.advance(1)
                    running = self.running()
                    if running and self.pack_step % 10 == 0:
                        bar.describe(f"training {name}  loss {self.slots[running[0]].state.losses[-1]:.4f}")
            finally:
                self.reader.close()  # the rows read ahead are not needed


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, log: Log | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir`` (or continue it with ``resume``) → the results dict (also results.json).

    In a process group that the command joined under torchrun (``align.common.distributed.joined``), every rank
    calls this: the run trains data-parallel over the ranks (see ``align.train.pack``), rank 0 writes it and
    evaluates, and every rank returns the results. Without one it trains in this process alone."""
    return train_pack([cfg], [run_dir], resume=resume, log=log, progress=progress, job=distributed.current())[0]


def train_pack(cfgs: list[TrainConfig], run_dirs: list[Path], resume: bool = False, log: Log | None = None,
               progress: bool = True, data: RunData | None = None,
               on_step: Callable[[int], None] | None = None,
               job: distributed.Rank = distributed.SINGLE) -> list[dict[str, Any]]:
    """Train K runs that differ only in optimizer, seed and clamp as one pack (each into its own run directory,
    resumed from its own checkpoint with ``resume``) → their results dicts, in the order given. ``data``: the
    splits in their roles, when already in memory (else read from the cache the configs name). ``on_step(k)``: called
    after each step of k heads. ``job``: the joined torchrun job to train in data-parallel (every rank calls this
    with the same runs), where rank 0 alone writes and evaluates; SINGLE (the default) trains in this process
    alone, whatever ranks it belongs to."""
    log = log or (lambda message: None)
    started = time.perf_counter()
    device = pick_device(cfgs[0].device)
    if device.type == "cpu" and len(cfgs) > 1:
        keep_freed_memory()  # a pack's tensors are large: reused, not mmap'd and page-faulted afresh every step
    if job.distributed:
        device = distributed.rank_device(device)
    if not job.is_main:  # rank 0 speaks for the job
        log, progress = (lambda message: None), False
    dirs = [RunDir.for_rank(d, job) for d in run_dirs]
    distributed.from_main(lambda: [d.check_writable() for d in dirs], job)  # a refusal reaches every rank
    distributed.from_main(lambda: check_installed(dict.fromkeys(n for c in cfgs for n in c.report_to)), job)
    for cfg in cfgs:
        check_head_fits(cfg, device)  # before the data is read (dims from the cache count as 1) ...
    try:
        if data is None:
            _, data = prepare_data(cfgs[0])
        cfgs = [resolve_dims(c, data.train) for c in cfgs]
        val_rows = None if data.val is None else data.val.num_images + data.val.num_captions
        for cfg in cfgs:
            check_head_fits(cfg, device, val_rows)  # ... and with the cache's dims and validation split
        trainer = Trainer(cfgs, data, device, dirs, started, job)  # builds the heads: config errors come before any write
        with ExitStack() as locks:
            for directory in dirs:
                locks.enter_context(directory.lock())  # the "fresh?" checks and every write happen under them
            _train_locked(trainer, resume, log, progress, on_step)
    except Exception as exc:
        if is_out_of_memory(exc):
            where = dirs[0].path if len(dirs) == 1 else f"a pack of {len(dirs)} runs"
            raise out_of_memory_error(f"training {where} on {device}", exc, "use a smaller head, pack or "
                                      "schedule.batch_size, or free memory; finished checkpoints are kept "
                                      "(continue with --resume)") from None
        raise
    return [json_safe(r.results) for r in trainer.runs]


def _train_locked(trainer: Trainer, resume: bool, log: Log, progress: bool,
                  on_step: Callable[[int], None] | None = None) -> None:
    kinds = [r.dir.check(r.cfg_hash, r.config, resume) for r in trainer.runs]
    todo = []
    for run, kind in zip(trainer.runs, kinds):
        if kind == "finished":  # its slot stays in the pack, idle
            log(f"{run.dir.path} is already finished; its results are in {run.dir.results_path}")
            run.results = run.dir.read_results()
            continue
        todo.append((run, kind))
    with distributed.together(trainer.job):  # every rank has read its checkpoints before rank 0 writes anything
        trainer.restore(todo, log)
    with ExitStack() as reporting:
        for run, _ in todo:
            run.dir.begin(run.state.step)  # checks the log it keeps: a damaged one stops the run here
            if run.optim_saved is not None:
                log(f"resuming {run.dir.path} from step {run.state.step}")
            run.dir.write_config(dump_config(run.cfg))
            reporting.enter_context(run.dir.reporting(run.cfg.report_to, run.cfg.report_group,
                                                      run.cfg.model_dump(mode="json")))
        trainer.build_pack()
        trainer.finish_done()  # runs stopped after their last step but before their results were written
        if trainer.running():
            trainer.loop(progress, on_step)
    for run, _ in todo:
        where = "run" if len(trainer.runs) == 1 else f"run {run.dir.path}"
        if run.results["status"] == "diverged":
            log(f"{where} diverged: {run.results['diverge_reason']}")
        if run.results.get("collapsed"):
            log(f"{where} collapsed: its training loss L stayed on the uniform plateau (|L − L_u| ≤ "
                f"{run.cfg.uniform_plateau_tol:g} · L_u, L_u = {trainer.uniform:.4f}) for "
                f"{run.results['uniform_plateau_steps']} consecutive steps, ≥ collapse_fraction "
                f"{run.cfg.collapse_fraction:g} of its {run.cfg.schedule.steps}")
