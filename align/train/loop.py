"""Train alignment heads on cached embeddings with any registered optimizer (orchestration).

One loop trains a pack of K runs at once (``train_pack``; ``train`` is the pack of one that ``align train`` runs):
runs that differ only in optimizer, seed and logit clamp share one ``align.pack.HeadPack``, whose step is
``align.optim.step.take_step``'s for every head at once. Each run keeps its own run directory, data order,
schedule, validation, best checkpoint, divergence and results. A pack keeps its layout (its runs, in slot order)
from its first step to its last: a finished run holds its slot as an idle head, and a resumed pack restarts all its
runs from one step they all have a checkpoint of. A run's bits therefore depend on its own config and on its pack's
layout, never on when the pack was interrupted (the other heads' values never enter a head's arithmetic; only the
shapes of the batched matmuls do, which BLAS may compute in another order for another pack size: a run trained in
another pack agrees to floating-point noise, 1e-9 relative in float64).

One step: a batch of B images (a random permutation per epoch, drawn on the device; for multi-caption data one
random caption per image per epoch), the contrastive loss of the head's outputs, then either one optimizer step
or — for optimizers whose registry entry says ``two_pass`` (the SAM family) — the perturbation, a second forward-
backward and the base step. The learning rate follows linear warm-up then cosine decay to 0 from each run's peak.
After each step the logit scale is clamped by the configured policy.

Choices that change M-SAM's perturbation (it depends on the gradient's scale, see paper-notes.md) are fixed:
mean-reduced loss, no loss scaling (bf16 autocast on CUDA needs none), no gradient accumulation, gradient
clipping (``optim.grad_clip``) applied to the gradient the base optimizer steps with — for the SAM family the
second one, never the first. ``grad_norm`` in metrics.jsonl is ‖g‖ over all trainable parameters at θ.

Best checkpoint: the validation score named by ``eval.select`` — ``mean_R@1`` (mean of image→text and
text→image R@1, the default: retrieval is what a head is for, and it separates runs better than R@5),
``mutual_knn`` (the paper's alignment figure) or, on a labelled set, ``zeroshot_top1`` (zero-shot accuracy; on
mnist, whose captions only name the digit, it is the one that measures the head). ``max_val`` in the results
holds the maximum of every validation metric over training as well (the paper's "best alignment over training").

Divergence ends a run cleanly with ``status: "diverged"``: a non-finite training loss, or a collapse — the loss
within ``diverge_tol`` of its uniform-prediction value (ln B for CLIP) with ‖g‖ < ``diverge_grad_tol`` for
``diverge_patience`` consecutive steps (the frozen state of a collapsed logit scale). The best head so far is
still evaluated.

Determinism: the head is initialised from ``seed`` (``torch.manual_seed(seed)`` then ``build_model``); the data
order of epoch e comes from a generator seeded by (seed, e), so it never depends on how often a run was
interrupted. Checkpoints hold the head, its optimizer state (the base optimizer's moments, in the layout of its
torch ``state_dict``), the RNG state after initialisation, the best head so far and the loop's counters; resuming
its pack from them reaches bit-identical final weights on the same machine.

Data-parallel: under ``torchrun`` every rank runs ``train`` with the same run; each takes its slice of every
batch (the single-process batch, cut in equal parts in rank order), the pack computes the whole batch's loss and
steps every rank with the mean gradient (``align.pack``), so the ranks keep identical heads. Rank 0 writes the run
directory and evaluates while the others wait; every rank reads the checkpoint it resumes from.

Results (``results.json``, read by ``align compare``): see ``RESULT_KEYS``. The configuration classes live in
``align.train_config``, the measurements in ``align.measure``, the run directory's bookkeeping in ``align.runs``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from align.common import distributed
from align.common.config import dump_config
from align.common.errors import AlignError, is_out_of_memory, out_of_memory_error
from align.common.files import json_safe
from align.common.progress import Log
from align.metrics.measure import (
    NonFiniteFeatures,
    confusion_record,
    embedding_metrics,
    evaluate_head,
    head_sharpness,
    head_zero_shot,
    update_best_over_training,
    zero_shot,
)
from align.train.checkpoint import (
    BestHead,
    LoopState,
    _finite,
    _rng_tensors,
    _window_mean,
    flatten_state,
    unflatten_state,
)
from align.train.config import EvalConfig, OptimConfig, ScheduleConfig, TrainConfig, hashed_config
from align.train.memory import check_head_fits
from align.train.run_data import RunData, Sampler, lr_factor, prepare_data, resolve_dims, uniform_loss
from align.train.runs import RunDir, config_hash

RESULT_KEYS = (
    "status",          # "done" | "diverged"
    "diverged_at",     # step at which divergence was declared, else None
    "diverge_reason",  # one line, else None
    "steps_done",      # optimizer steps taken
    "best_step",       # step of the best validation score (None if no validation ran)
    "select",          # the validation metric that picked the best step
    "best_val", "final_val", "best_test", "final_test",  # metric dicts (keys: measure.metric_names), or None
    "max_val",         # best value of every validation metric over training (maximum; minimum for the ranks)
    "loss_at_step",    # mean training loss over the LOSS_WINDOW steps ending at cfg.loss_at_step (None if not reached)
    "loss_at_step_T",  # that T
    "final_loss",      # mean training loss over the last LOSS_WINDOW steps
    "sharpness",       # {"best": {...}, "final": {...}} of the head at its training loss (see measure.head_sharpness)
    "wall_time_s",     # training + evaluation time summed over all sessions of the run
    "zeroshot",        # labelled test split: the best head's zero-shot confusion (measure.confusion_record), else None
)


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to train under bf16 autocast (``precision``: auto = on CUDA only); AlignError where impossible."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise AlignError("precision=bf16 needs a CUDA device here: use --set precision=fp32")
    return bf16


def optimizer_and_schedule(cfg: TrainConfig, model: torch.nn.Module) -> tuple[Any, Any]:
    """The configured torch optimizer over a model's param groups and its warm-up + cosine ``LambdaLR``: the reference
    path of one head (benchmarks and tests compare the pack's steps with it)."""
    from align.optim import create_optimizer, optimizer_info

    o = cfg.optim
    kwargs: dict[str, Any] = dict(lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                  betas=tuple(o.betas), eps=o.eps)
    if optimizer_info(o.name).two_pass:  # one the method does not have (alpha for SAM) is a one-line error
        kwargs.update(o.method_hparams(), base=o.base, max_grad_norm=o.grad_clip)
    try:
        opt = create_optimizer(o.name, model.param_groups(o.weight_decay), **kwargs)
    except ValueError as exc:
        raise AlignError(f"optim: {exc}") from None
    steps, warmup = cfg.schedule.steps, cfg.schedule.warmup_steps
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps, warmup))


PACK_FREE = ("optim", "seed", "out_dir")  # what may differ between the runs of one pack (and the logit clamp)
EVAL_BYTES = 256 * 2 ** 20  # features held at once while validating a pack


def pack_key(cfg: TrainConfig) -> str:
    """What runs must share to train in one pack: everything but the optimizer, the seed, the run directory and
    the logit-scale clamp (same data, head, loss, schedule, evaluation, device and precision)."""
    data = hashed_config(cfg)
    for key in PACK_FREE:
        data.pop(key, None)
    data["loss"] = {k: v for k, v in data["loss"].items() if k != "clamp"}
    return config_hash(data)


def head_hparams_of(cfg: TrainConfig) -> dict[str, Any]:
    """The run's optimizer as per-head hyper-parameters (``align.optim.batched.head_hparams``); AlignError on a
    knob the method lacks (alpha for SAM), as building the optimizer would."""
    from align.optim import optimizer_info
    from align.optim.batched import head_hparams

    o = cfg.optim
    method = dict(o.method_hparams(), base=o.base) if optimizer_info(o.name).two_pass else {}
    try:
        return head_hparams(o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, betas=tuple(o.betas),
                            eps=o.eps, grad_clip=o.grad_clip, perturbation=o.perturbation, **method)
    except ValueError as exc:
        raise AlignError(f"optim: {exc}") from None


@dataclass
class Head:
    """One run of a pack: its config, run directory, data order, loop state and where it sits in the pack."""

    cfg: TrainConfig
    run: RunDir
    config: dict[str, Any]
    cfg_hash: str
    sampler: Sampler
    model: Any  # its AlignmentModel until the pack is built
    rng: dict[str, Tensor]  # RNG state right after its initialisation (what its checkpoints hold)
    hparams: dict[str, Any]
    two_pass: bool
    state: LoopState = field(default_factory=LoopState)
    optim_saved: dict[str, Any] | None = None  # optimizer state of the checkpoint it resumes from
    results: dict[str, Any] | None = None  # set when the run is finished


class Trainer:
    """K runs of one architecture on one device (K = 1 for ``align train``): their heads trained as one
    ``HeadPack``, each with its own run directory, data order, schedule, validation, checkpoints and results."""

    def __init__(self, cfgs: list[TrainConfig], data: RunData, device: torch.device, runs: list[RunDir],
                 started: float, job: distributed.Rank = distributed.SINGLE) -> None:
        import copy

        from align.optim import optimizer_info
        from align.train.heads import build_model
        from align.train.losses import loss_for

        if len({pack_key(c) for c in cfgs}) != 1:
            raise AlignError("runs of one pack must differ only in optim, seed and loss.clamp")
        self.cfg, self.data, self.device, self.started = cfgs[0], data, device, started
        self.job = job  # data-parallel under torchrun: this rank trains on its slice of every batch
        batch, world = self.cfg.schedule.batch_size, self.job.world_size
        if batch % world:
            raise AlignError(f"schedule.batch_size={batch} must be a multiple of the {world} ranks (each takes an "
                             f"equal slice of every batch): use --set schedule.batch_size={batch - batch % world}")
        self.bf16 = use_bf16(self.cfg, device)
        self.samplers: dict[int, Sampler] = {}
        self.heads = []
        for cfg, run in zip(cfgs, runs):
            config = hashed_config(cfg)
            hparams = head_hparams_of(cfg)  # a config error comes before anything is written
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.head, cfg.loss, cfg.image_dim, cfg.text_dim).to(device)
            sampler = self.samplers.get(cfg.seed) or Sampler(data.train.caption_to_image, data.train.num_images,
                                                             cfg.schedule.batch_size, cfg.seed, device)
            self.samplers[cfg.seed] = sampler
            self.heads.append(Head(cfg, run, config, config_hash(config), sampler, model, _rng_tensors(), hparams,
                                   optimizer_info(cfg.optim.name).two_pass))
        self.model = copy.deepcopy(self.heads[0].model)  # evaluates one head at a time (test, sharpness)
        self.loss_fn = loss_for(self.cfg.loss)
        self.image = data.train.image.to(device=device, dtype=torch.float32)
        self.text = data.train.text.to(device=device, dtype=torch.float32)
        self.uniform = uniform_loss(self.cfg.loss.kind, self.cfg.schedule.batch_size)
        self.slots: list[Head] = []  # the pack's layout: every run, finished ones included, in slot order
        self.pack: Any = None
        self.pack_step = 0  # the step every run still training is at
        self.share = 1  # runs trained in this session

    def _from_main(self, fn: Any) -> Any:
        """``fn()`` on rank 0 alone and its result on every rank of the job (evaluation: the others wait)."""
        if not self.job.distributed:
            return fn()
        return distributed.broadcast_object(fn() if self.job.is_main else None)

    def wall_time(self, head: Head) -> float:
        """The run's wall time: its earlier sessions plus its share of this session (the pack's time / its runs)."""
        return head.state.wall_before + (time.perf_counter() - self.started) / max(1, self.share)

    # -- checkpoints
    def restore(self, todo: list[tuple[Head, str]], log: Log) -> None:
        """The state each run still to train starts from (only reads; ``_train_locked`` then begins the run
        directories). A run whose newest checkpoint is its last (it diverged, or reached its final step, before its
        results were written) is finished from it. All others start at one step: the newest that every one of them
        has a checkpoint of (step 0 if none), so the pack replays exactly what it computed before the interruption."""
        steps = self.cfg.schedule.steps
        pending = []
        for head, kind in todo:
            found = head.run.latest_checkpoint() if kind == "resume" else None
            if found is not None and (found[1]["train_state"]["diverged"] is not None
                                      or found[1]["train_state"]["step"] >= steps):
                self._load(head, *found)
            else:
                pending.append((head, kind))
        common = set.intersection(*(set(h.run.checkpoint_steps()) for h, _ in pending)) if pending else set()
        while common:
            step = max(common)
            try:
                loaded = [head.run.load_checkpoint(step) for head, _ in pending]
            except AlignError:  # one of them is damaged: an older step
                common.discard(step)
                continue
            for (head, _), found in zip(pending, loaded):
                self._load(head, *found)
            break
        for head, kind in pending:
            newest = max(head.run.checkpoint_steps(), default=0) if kind == "resume" else 0
            if kind == "resume" and newest == 0:
                log(f"{head.run.path} has no checkpoint yet: starting from step 0")
            elif newest > head.state.step:
                log(f"{head.run.path}: its pack resumes at step {head.state.step}, the newest step all its runs "
                    f"have a checkpoint of (its own newest: {newest})")

    def _load(self, head: Head, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """A run's state from one of its checkpoints: head, optimizer state, RNG, best head, counters."""
        head.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        head.optim_saved = self._own_rank_state(unflatten_state(meta["optimizer"], tensors), head)
        head.rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        best_state = {k[5:]: v.to(self.device) for k, v in tensors.items() if k.startswith("best.")}
        head.state = LoopState.from_json(meta["train_state"], best_state)

    def _own_rank_state(self, saved: dict[str, Any], head: Head) -> dict[str, Any]:
        """The optimizer state this rank resumes from: M-SAM's averaged metric with a local perturbation is each
        rank's own (``checkpoint`` stores one per rank)."""
        ranks = saved.get("sam", {}).pop("metric_ema_ranks", None)
        if ranks is None or all(r is None for r in ranks):
            return saved
        if len(ranks) != self.job.world_size:
            raise AlignError(f"{head.run.path} was trained on {len(ranks)} ranks with optim.perturbation=local and "
                             f"M-SAM's averaged metric, one per rank: resume it on {len(ranks)} ranks")
        if ranks[self.job.rank] is not None:
            saved["sam"]["metric_ema"] = ranks[self.job.rank]
        return saved

    def build_pack(self) -> None:
        """Stack every run in its slot, in the order given with runs of one seed side by side (they share a batch);
        finished runs keep their slots as idle heads, so the pack's layout is the one it was planned with."""
        from align.train.pack import HeadPack

        self.slots = sorted(self.heads, key=lambda h: h.cfg.seed)
        training = [h for h in self.slots if h.results is None]
        self.share = max(1, len(training))
        if not training:
            return
        self.pack_step = min((h.state.step for h in training if not self._ended(h)), default=0)
        self.pack = HeadPack([h.model for h in self.slots], [h.hparams for h in self.slots],
                             [h.cfg.loss.clamp for h in self.slots], job=self.job)
        for slot, head in enumerate(self.slots):
            head.model = None  # its weights live in the pack now
            if head.results is None and head.optim_saved is not None:
                self.pack.load_optim_state_(slot, head.optim_saved, head.state.step)

    def running(self) -> list[int]:
        """Slots of the runs still training (not finished, not diverged)."""
        return [s for s, h in enumerate(self.slots) if h.results is None and h.state.diverged is None]

    def _ended(self, head: Head) -> bool:
        """Whether the run diverged or reached its last step (its results may still be due)."""
        return head.state.diverged is not None or head.state.step >= self.cfg.schedule.steps

    def checkpoint(self, head: Head, slot: int, keep: int | None = None) -> None:
        """A resumable checkpoint of the run's whole training state at its step; ``keep``: how many of its newest
        checkpoints to keep (default: its config's; 0: all, to prune once the whole pack has written this step)."""
        state, optim = head.state, self.pack.optim_state(slot)
        if self.job.distributed and bool(self.pack.hp.local_perturbation[slot]) and self.pack.metric is not None:
            sam = optim.setdefault("sam", {})  # each rank's own averaged metric (a collective: every rank is here)
            own = sam.pop("metric_ema", None)
            sam["metric_ema_ranks"] = distributed.gather_objects(
                None if own is None else {i: t.cpu() for i, t in own.items()})
        if not self.job.is_main:
            return
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in self.pack.head_state(slot).items()}
        if state.best.state is not None:
            tensors.update({f"best.{k}": v for k, v in state.best.state.items()})
        tensors.update(head.rng)
        meta = {"config_hash": head.cfg_hash, "config": head.config,
                "optimizer": flatten_state(optim, "optim", tensors),
                "scheduler": {"last_epoch": state.step, "base_lrs": [head.cfg.optim.lr]},
                "train_state": state.to_json(self.wall_time(head))}
        head.run.save_checkpoint(state.step, tensors, meta, keep=head.cfg.keep_checkpoints if keep is None else keep)

    # -- evaluation
    def evaluate(self, split: str, state: dict[str, Tensor]) -> dict[str, float] | None:
        """Metrics of one head on a role's split ("val" / "test"); None if its features are NaN/inf."""
        self.model.load_state_dict(state)
        try:
            return evaluate_head(self.model, getattr(self.data, split), self.cfg.eval, self.device)
        except NonFiniteFeatures:
            return None

    def validate(self, slots: list[int]) -> list[dict[str, float] | None]:
        """Validation metrics of the heads at ``slots`` (None: NaN/inf features), encoded in bounded memory by
        fixed chunks of the pack's slots (a head's features come from a matmul of the same shape every time)."""
        paired, ev = self.data.val, self.cfg.eval
        image = paired.image.to(device=self.device, dtype=torch.float32)
        text = paired.text.to(device=self.device, dtype=torch.float32)
        per_head = (paired.num_images + paired.num_captions) * self.cfg.head.out_dim * 4
        chunk = max(1, EVAL_BYTES // max(1, per_head))
        first = paired.first_caption_per_image()
        prompts = None if paired.class_text is None else \
            paired.class_text.reshape(-1, paired.class_text.shape[2]).to(device=self.device, dtype=torch.float32)
        out: dict[int, dict[str, float] | None] = {}
        for lo in range(0, len(self.slots), chunk):
            wanted = [s for s in slots if lo <= s < lo + chunk]
            if not wanted:
                continue
            heads = slice(lo, min(lo + chunk, len(self.slots)))
            with torch.no_grad():
                img, txt = self.pack.encode(image, "image", heads), self.pack.encode(text, "text", heads)
                cls = None if prompts is None else self.pack.encode(prompts, "text", heads)
            for slot in wanted:
                g = slot - lo
                if not (bool(torch.isfinite(img[g]).all()) and bool(torch.isfinite(txt[g]).all())):
                    out[slot] = None
                    continue
                metrics, _ = embedding_metrics(img[g], txt[g], paired.caption_to_image, first, ev.ks, ev.knn_k,
                                               ev.backend)
                if cls is not None:  # the same prompt ensemble as evaluate_head's, on the pack's features
                    metrics.update(zero_shot(img[g], cls[g].view(*paired.class_text.shape[:2], -1), paired.labels)[0])
                out[slot] = metrics
        return [out[s] for s in slots]

    def record_validation(self, head: Head, slot: int, metrics: dict[str, float]) -> None:
        """Log a validation, track the best head and the best of every metric."""
        state, cfg = head.state, head.cfg
        state.last_val = dict(metrics, step=state.step)
        head.run.append_metrics({"kind": "val", "step": state.step, **metrics})
        update_best_over_training(state.max_val, metrics, cfg.eval.ks)
        score = metrics[cfg.eval.select]
        if math.isfinite(score) and (state.best.score is None or score > state.best.score):
            weights = self.pack.head_state(slot)
            state.best = BestHead(step=state.step, score=score, val=metrics, state=weights)
            head.run.save_head("best", weights, {"step": state.step, "select": cfg.eval.select, "score": score,
                                                 "val": metrics, "config_hash": head.cfg_hash})

    def test_and_sharpness(self, head: Head, weights: dict[str, Tensor] | None,
                           sharpness: bool = True) -> tuple[dict | None, dict | None]:
        """Test metrics and (with ``sharpness`` and eval.sharpness) sharpness of one head's weights (None, None for
        no head)."""
        if weights is None:
            return None, None
        ev = self.cfg.eval
        test = self.evaluate("test", weights) if ev.test_split else None
        sharp = None
        if sharpness and ev.sharpness and (test is not None or not ev.test_split):
            self.model.load_state_dict(weights)
            batches = head.sampler.fixed_batches(ev.sharpness_batches)
            sharp = head_sharpness(self.model, self.loss_fn, self.image, self.text, batches, ev)
        return test, sharp

    # -- training
    def _batches(self) -> list[tuple[slice, Tensor, Tensor]]:
        """Each run of slots with one seed and the batch they share at the pack's step (under torchrun: this rank's
        slice); idle slots take their seed's batch too, so every step has the shapes of the pack's first."""
        from align.train.pack import group_batches

        groups, start = [], 0
        for slot in range(1, len(self.slots) + 1):
            a = self.slots[start]
            if slot == len(self.slots) or self.slots[slot].cfg.seed != a.cfg.seed:
                groups.append((slice(start, slot), *self._rank_slice(*a.sampler.batch(self.pack_step))))
                start = slot
        return group_batches(groups, self.image, self.text)

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
        stats = self.pack.step(self._batches(), lr, active=active, bf16=self.bf16)
        host = {k: getattr(stats, k).tolist() for k in ("loss", "grad_norm", "sam_grad_norm", "delta_norm", "skipped")}
        host["log_scale"], host["lr"] = self.pack.log_scale().tolist(), lr
        for slot in running:
            self._record(self.slots[slot], {k: v[slot] for k, v in host.items()})
        self.pack_step += 1

    def _record(self, head: Head, v: dict[str, Any]) -> None:
        """The step's metrics record; a non-finite loss (not stepped) or a collapse ends the run as diverged."""
        state = head.state
        record: dict[str, Any] = {"kind": "train", "step": state.step + 1, "loss": v["loss"], "lr": v["lr"]}
        if not math.isfinite(v["loss"]):
            state.diverged = {"step": state.step + 1,
                              "reason": f"non-finite training loss ({v['loss']}) at step {state.step + 1}"}
            head.run.append_metrics(dict(record, grad_norm=v["grad_norm"]))
            return  # that step was not taken: steps_done stays at the last finite one
        record.update(log_scale=v["log_scale"], grad_norm=v["grad_norm"])
        if head.two_pass:
            n, d = v["sam_grad_norm"], v["delta_norm"]
            record.update(perturbation_norm=d, effective_radius=d / n if n > 0 else 0.0, skipped=bool(v["skipped"]))
        state.step += 1
        state.losses.append(v["loss"])
        if state.step == head.cfg.loss_at_step:
            state.loss_at_step = _window_mean(list(state.losses))
        head.run.append_metrics(record)
        self._track_collapse(head, v["loss"], v["grad_norm"])

    def _track_collapse(self, head: Head, loss: float, grad_norm: float) -> None:
        """Declare divergence after ``diverge_patience`` steps frozen at the uniform loss with a vanishing ‖g‖."""
        cfg, state = head.cfg, head.state
        collapsed = abs(loss - self.uniform) < cfg.diverge_tol and grad_norm < cfg.diverge_grad_tol
        state.stuck = state.stuck + 1 if collapsed else 0
        if state.stuck >= cfg.diverge_patience:
            state.diverged = {"step": state.step, "reason": f"collapsed: training loss stuck at the uniform value "
                              f"{self.uniform:.4f} with ‖g‖ < {cfg.diverge_grad_tol:g} for {state.stuck} steps "
                              f"(since step {state.step - state.stuck + 1})"}

    def after_step(self) -> None:
        """Validate and checkpoint the runs that are due; finish the runs that diverged or reached the end."""
        steps, ev = self.cfg.schedule.steps, self.cfg.eval
        running = self.running()
        due = [s for s in running if self.slots[s].state.step % ev.every == 0 or self.slots[s].state.step == steps]
        for slot, metrics in zip(due, self._from_main(lambda: self.validate(due)) if due else []):
            head = self.slots[slot]
            if metrics is None:
                head.state.diverged = {"step": head.state.step,
                                       "reason": f"the head's features became NaN/inf by step {head.state.step}"}
            else:
                self.record_validation(head, slot, metrics)
        saving = [s for s in self.running() if self.slots[s].state.step % self.slots[s].cfg.checkpoint_every == 0
                  and self.slots[s].state.step != steps]
        for slot in saving:
            self.checkpoint(self.slots[slot], slot, keep=0)
        for slot in saving:  # older checkpoints go once every run has this one: a resume always finds a common step
            self.slots[slot].run.prune_checkpoints(self.slots[slot].cfg.keep_checkpoints)
        self.finish_done()

    def finish_done(self) -> None:
        """Finish the runs that diverged or reached their last step; their slots stay in the pack, idle."""
        for slot, head in enumerate(self.slots):
            if head.results is None and self._ended(head):
                self.finish(head, slot)

    def loop(self, progress: bool, on_step: Callable[[int], None] | None = None) -> None:
        """Train until every run reached its last step or diverged (``on_step(k)`` after each step of k runs: a
        study's progress across worker processes)."""
        from align.common.progress import progress_bar

        steps = self.cfg.schedule.steps
        running = self.running()
        name = self.slots[running[0]].cfg.optim.name if len(running) == 1 else f"{len(running)} heads"
        with progress_bar(steps, f"training {name}", enabled=progress) as bar:
            bar.advance(self.pack_step)
            while running:
                self.step()
                if on_step is not None:
                    on_step(len(running))
                self.after_step()
                bar.advance(1)
                running = self.running()
                if running and self.pack_step % 10 == 0:
                    bar.describe(f"training {name}  loss {self.slots[running[0]].state.losses[-1]:.4f}")

    # -- the end
    def finish(self, head: Head, slot: int) -> None:
        """The run's final checkpoint (a diverged run still reports its best head), its results and results.json."""
        self.checkpoint(head, slot)
        head.results = self._from_main(lambda: self.results(head, self.pack.head_state(slot),
                                                            int(self.pack.skipped_steps[slot])))
        head.run.write_results(head.results)

    def final_val(self, head: Head, weights: dict[str, Tensor]) -> dict[str, float] | None:
        """Validation metrics of the final head (reused when the last validation was at the final step)."""
        last = head.state.last_val
        if last is not None and last["step"] == head.state.step:
            return {k: v for k, v in last.items() if k != "step"}
        return self.evaluate("val", weights) if _finite(weights) else None

    def results(self, head: Head, final: dict[str, Tensor], skipped: int) -> dict[str, Any]:
        """Test and sharpness of the run's best and final heads → its results dict."""
        state, o = head.state, head.cfg.optim
        final_val = self.final_val(head, final)
        best_test, best_sharp = self.test_and_sharpness(head, state.best.state)
        if final_val is not None and state.best.step == state.step:  # the final head is the best one
            final_test, final_sharp = best_test, best_sharp
        else:
            final_test, final_sharp = self.test_and_sharpness(head, final if final_val is not None else None,
                                                              sharpness=head.cfg.eval.sharpness_final)
        diverged = state.diverged
        return {
            "status": "diverged" if diverged else "done",
            "diverged_at": diverged["step"] if diverged else None,
            "diverge_reason": diverged["reason"] if diverged else None,
            "steps_done": state.step, "best_step": state.best.step, "select": head.cfg.eval.select,
            "best_val": state.best.val, "final_val": final_val, "best_test": best_test, "final_test": final_test,
            "max_val": state.max_val,
            "loss_at_step": state.loss_at_step, "loss_at_step_T": head.cfg.loss_at_step,
            "final_loss": _window_mean(list(state.losses)),
            "sharpness": {"best": best_sharp, "final": final_sharp},
            "optimizer": o.name, "two_pass": head.two_pass, "skipped_perturbations": skipped,
            "config_hash": head.cfg_hash, "device": str(self.device), "precision": "bf16" if self.bf16 else "fp32",
            "wall_time_s": self.wall_time(head),
            "zeroshot": self.test_confusion(state.best.state) if best_test is not None else None,
        }

    def test_confusion(self, weights: dict[str, Tensor] | None) -> dict[str, Any] | None:
        """The zero-shot confusion matrix of one head on a labelled test split (None otherwise)."""
        test = self.data.test
        if weights is None or test is None or not test.labelled:
            return None
        self.model.load_state_dict(weights)
        return confusion_record(head_zero_shot(self.model, test, self.device)[1], test)


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, log: Log | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir`` (or continue it with ``resume``) → the results dict (also results.json).

    Under torchrun every rank calls this and joins the job: the run trains data-parallel over the ranks (see
    ``align.pack``), rank 0 writes it and evaluates, and every rank returns the results."""
    from align.common.device import pick_device

    job = distributed.init(pick_device(cfg.device))
    return train_pack([cfg], [run_dir], resume=resume, log=log, progress=progress, job=job)[0]


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
    from contextlib import ExitStack

    from align.common.device import keep_freed_memory, pick_device
    from align.train.runs import ReadOnlyRunDir

    log = log or (lambda message: None)
    started = time.perf_counter()
    device = pick_device(cfgs[0].device)
    if device.type == "cpu" and len(cfgs) > 1:
        keep_freed_memory()  # a pack's tensors are large: reused, not mmap'd and page-faulted afresh every step
    if job.distributed:
        device = distributed.rank_device(device)
    if not job.is_main:  # rank 0 speaks and writes for the job
        log, progress = (lambda message: None), False
    runs = [RunDir(d) if job.is_main else ReadOnlyRunDir(d) for d in run_dirs]
    for run, cfg in zip(runs, cfgs):
        run.check_location()
        check_head_fits(cfg, device)  # before the data is read (dims from the cache count as 1) ...
    try:
        if data is None:
            _, data = prepare_data(cfgs[0])
        cfgs = [resolve_dims(c, data.train) for c in cfgs]
        for cfg in cfgs:
            check_head_fits(cfg, device)  # ... and with the cache's dims
        trainer = Trainer(cfgs, data, device, runs, started, job)  # builds the heads: config errors come before any write
        with ExitStack() as locks:
            for run in runs:
                locks.enter_context(run.lock())  # the "fresh?" checks and every write happen under them
            _train_locked(trainer, resume, log, progress, on_step)
    except Exception as exc:
        if is_out_of_memory(exc):
            where = runs[0].path if len(runs) == 1 else f"a pack of {len(runs)} runs"
            raise out_of_memory_error(f"training {where} on {device}", exc, "use a smaller head, pack or "
                                      "schedule.batch_size, or free memory; finished checkpoints are kept "
                                      "(continue with --resume)") from None
        raise
    return [json_safe(h.results) for h in trainer.heads]


def _train_locked(trainer: Trainer, resume: bool, log: Log, progress: bool,
                  on_step: Callable[[int], None] | None = None) -> None:
    kinds = [h.run.check(h.cfg_hash, h.config, resume) for h in trainer.heads]
    todo = []
    for head, kind in zip(trainer.heads, kinds):
        if kind == "finished":  # its slot stays in the pack, idle
            log(f"{head.run.path} is already finished; its results are in {head.run.results_path}")
            head.results = head.run.read_results()
            continue
        todo.append((head, kind))
    trainer.restore(todo, log)
    todo = [head for head, _ in todo]
    if trainer.job.distributed:
        distributed.barrier()  # every rank has read its checkpoints before rank 0 writes anything
    for head in todo:
        head.run.begin(head.state.step)  # checks the log it keeps: a damaged one stops the run here
        if head.optim_saved is not None:
            log(f"resuming {head.run.path} from step {head.state.step}")
        head.run.write_config(dump_config(head.cfg))
    trainer.build_pack()
    trainer.finish_done()  # runs stopped after their last step but before their results were written
    if trainer.running():
        trainer.loop(progress, on_step)
    for head in todo:
        if head.results["status"] == "diverged":
            where = "run" if len(trainer.heads) == 1 else f"run {head.run.path}"
            log(f"{where} diverged: {head.results['diverge_reason']}")
