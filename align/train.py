"""Train an alignment head on cached embeddings with any registered optimizer (orchestration).

One step: a batch of B images (a random permutation per epoch, drawn on the device; for multi-caption data one
random caption per image per epoch), the contrastive loss of the head's outputs, then either one optimizer step
or — for optimizers whose registry entry says ``two_pass`` (the SAM family) — ``first_step`` / second forward-
backward / ``second_step``. The learning rate follows linear warm-up then cosine decay to 0 (a ``LambdaLR`` on
the optimizer; the SAM family shares its param groups with its base, so one scheduler drives both). After
each step the logit scale is clamped by the configured policy.

Choices that change M-SAM's perturbation (it depends on the gradient's scale, see paper-notes.md) are fixed:
mean-reduced loss, no loss scaling (bf16 autocast on CUDA needs none), no gradient accumulation, gradient
clipping (``optim.grad_clip``) applied to the gradient the base optimizer steps with — for the SAM family the
second one, never the first. ``grad_norm`` in metrics.jsonl is ‖g‖ over all trainable parameters at θ.

Best checkpoint: the validation score named by ``eval.select`` — ``mean_R@1`` (mean of image→text and
text→image R@1, the default: retrieval is what a head is for, and it separates runs better than R@5) or
``mutual_knn`` (the paper's alignment figure). ``max_val`` in the results holds the maximum of every
validation metric over training as well (the paper's "best alignment over training").

Divergence ends a run cleanly with ``status: "diverged"``: a non-finite training loss, or a collapse — the loss
within ``diverge_tol`` of its uniform-prediction value (ln B for CLIP) with ‖g‖ < ``diverge_grad_tol`` for
``diverge_patience`` consecutive steps (the frozen state of a collapsed logit scale). The best head so far is
still evaluated.

Determinism: the head is initialised from ``seed``; the data order of epoch e comes from a generator seeded by
(seed, e), so it never depends on how often a run was interrupted. Checkpoints hold the head, the optimizer
state (including the base optimizer's moments), the scheduler, RNG states, the best head so far and the loop's
counters; resuming from one reaches bit-identical final weights on the same machine.

Results (``results.json``, read by ``align compare``): see ``RESULT_KEYS``. The configuration classes live in
``align.train_config``, the measurements in ``align.measure``, the run directory's bookkeeping in ``align.runs``.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.config import dump_config, shorten
from align.errors import AlignError, is_out_of_memory, out_of_memory_error
from align.measure import NonFiniteFeatures, evaluate_head, head_sharpness, update_best_over_training
from align.progress import Log
from align.runs import RunDir, config_hash, flatten_state, json_safe, unflatten_state
from align.train_config import EvalConfig, OptimConfig, ScheduleConfig, TrainConfig, hashed_config

__all__ = ["TrainConfig", "OptimConfig", "ScheduleConfig", "EvalConfig", "train", "Sampler", "lr_factor",
           "uniform_loss", "holdout_split", "load_data", "resolve_dims", "optimizer_and_schedule", "check_head_fits"]

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
)
LOSS_WINDOW = 10


# -- schedule --------------------------------------------------------------------------------------------

def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def uniform_loss(kind: str, batch_size: int) -> float:
    """The loss when every logit is equal (a collapsed scale): CLIP ln B; SigLIP its best constant-logit value."""
    b = float(batch_size)
    if kind == "clip":
        return math.log(b)
    # SigLIP with all logits = c: −(log σ(c) + (B−1) log σ(−c)), minimised at σ(c) = 1/B.
    return -(math.log(1.0 / b) + (b - 1.0) * math.log(1.0 - 1.0 / b))


# -- data ------------------------------------------------------------------------------------------------

class Sampler:
    """Batches of (image rows, caption rows) for step s: a permutation of images per epoch, one caption each."""

    def __init__(self, caption_to_image: Tensor, num_images: int, batch_size: int, seed: int,
                 device: torch.device) -> None:
        c2i = caption_to_image.cpu()
        counts = torch.bincount(c2i, minlength=num_images)
        self.images = torch.nonzero(counts > 0).flatten()  # images without a caption never train
        self.counts = counts[self.images]
        self.order = torch.argsort(c2i, stable=True)  # captions grouped by image
        starts = torch.cumsum(counts, 0) - counts
        self.starts = starts[self.images]
        self.batch_size, self.seed, self.device = batch_size, seed, device
        if len(self.images) < batch_size:
            raise AlignError(f"schedule.batch_size={batch_size} exceeds the {len(self.images)} training images "
                             f"with captions: use --set schedule.batch_size={max(2, len(self.images))} or less")
        self.per_epoch = len(self.images) // batch_size  # the incomplete last batch is dropped
        self._epoch, self._rows = -1, (torch.empty(0), torch.empty(0))

    def _epoch_rows(self, epoch: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.images), generator=gen)
        pick = torch.minimum((torch.rand(len(self.images), generator=gen) * self.counts[perm]).long(),
                             self.counts[perm] - 1)
        caption = self.order[self.starts[perm] + pick]
        return self.images[perm].to(self.device), caption.to(self.device)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(B,) image row indices and (B,) caption row indices, on the device, for 0-based step ``step``."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._rows = epoch, self._epoch_rows(epoch)
        lo, hi = pos * self.batch_size, (pos + 1) * self.batch_size
        return self._rows[0][lo:hi], self._rows[1][lo:hi]

    def fixed_batches(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """``n`` fixed batches (first caption of each image) for sharpness: independent of the training order."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983)
        perm = torch.randperm(len(self.images), generator=gen)
        n = max(1, min(n, self.per_epoch))
        out = []
        for i in range(n):
            rows = perm[i * self.batch_size:(i + 1) * self.batch_size]
            out.append((self.images[rows].to(self.device), self.order[self.starts[rows]].to(self.device)))
        return out


def load_data(cfg: TrainConfig, splits: list[str]) -> dict[str, Any]:
    """The cached PairedEmbeddings of each split (AlignError naming the command to build a missing cache)."""
    from align.cache import load_cached_split

    return {split: load_cached_split(cfg.data, split) for split in dict.fromkeys(splits)}


def holdout_split(paired: Any, n: int) -> tuple[Any, Any]:
    """(rest, held) of a PairedEmbeddings: ``n`` images (fixed pseudo-random choice) with all their captions held out."""
    from align.embeddings import PairedEmbeddings

    if not 0 < n < paired.num_images:
        raise AlignError(f"eval.holdout_images={n} must be between 1 and the {paired.num_images - 1} training images")
    order = torch.randperm(paired.num_images, generator=torch.Generator().manual_seed(0))  # same for every seed

    def subset(images: Tensor, name: str) -> PairedEmbeddings:
        images = images.sort().values
        new_index = torch.full((paired.num_images,), -1, dtype=torch.long)
        new_index[images] = torch.arange(len(images))
        keep = new_index[paired.caption_to_image] >= 0
        return PairedEmbeddings(paired.image[images], paired.text[keep], new_index[paired.caption_to_image[keep]],
                                dict(paired.meta, split=name))

    return subset(order[n:], "train"), subset(order[:n], "train-holdout")


def resolve_dims(cfg: TrainConfig, paired: Any) -> TrainConfig:
    """``cfg`` with image_dim/text_dim filled from the cache; AlignError if they were set and disagree."""
    dims = {"image_dim": int(paired.image.shape[1]), "text_dim": int(paired.text.shape[1])}
    for key, actual in dims.items():
        expected = getattr(cfg, key)
        if expected is not None and expected != actual:
            raise AlignError(f"{key}={expected} in the config but the cached {cfg.data.dataset.kind} embeddings have "
                             f"{key.split('_')[0]} dimension {actual}: fix {key} (or drop it) or use the matching cache")
    return cfg.model_copy(update=dims)


# -- before anything is written: everything that can fail on user input -----------------------------------

@dataclass
class RunData:
    """The splits in their roles: what trains, what picks the best head (val), what reports it (test)."""

    train: Any
    val: Any | None
    test: Any | None


def prepare_data(cfg: TrainConfig) -> tuple[TrainConfig, RunData]:
    """Load and check the splits ``cfg`` needs → (cfg with embedding dims filled in, the splits in their roles)."""
    holdout = cfg.eval.holdout_images
    splits = ["train"] + ([] if holdout else [cfg.eval.split]) + ([cfg.eval.test_split] if cfg.eval.test_split else [])
    missing = [s for s in splits if s not in cfg.data.splits]
    if missing:
        raise AlignError(f"split(s) {', '.join(missing)} are not in data.splits ({', '.join(cfg.data.splits)}): "
                         "add them, change eval.split / eval.test_split, or validate on eval.holdout_images")
    loaded = load_data(cfg, splits)
    cfg = resolve_dims(cfg, loaded["train"])
    for split in splits[1:]:
        resolve_dims(cfg, loaded[split])
    data = RunData(train=loaded["train"], val=loaded.get(cfg.eval.split),
                   test=loaded[cfg.eval.test_split] if cfg.eval.test_split else None)
    if holdout:
        data.train, data.val = holdout_split(loaded["train"], holdout)
    for role, paired in (("validation", data.val), ("test", data.test)):
        if paired is not None and cfg.eval.knn_k >= paired.num_images:
            raise AlignError(f"eval.knn_k={cfg.eval.knn_k} needs more than {cfg.eval.knn_k} images but the {role} "
                             f"split has {paired.num_images}: use --set eval.knn_k={max(1, paired.num_images - 1)} "
                             "or less")
    return cfg, data


def _known_or_placeholder_dims(cfg: TrainConfig) -> tuple[int, int, bool]:
    """(image dim, text dim, both known): a dim not known before the cache is read counts as 1 (the smallest),
    or as head.out_dim on a side locked to the identity (which needs exactly that)."""
    head = cfg.head

    def dim(value: int | None, side: str) -> int:
        if value is not None:
            return value
        return head.out_dim if head.lock == side and head.lock_mode == "identity" else 1

    return dim(cfg.image_dim, "image"), dim(cfg.text_dim, "text"), None not in (cfg.image_dim, cfg.text_dim)


def check_head_fits(cfg: TrainConfig, device: torch.device, training: bool = True) -> None:
    """Refuse a head that cannot fit in the device's free memory, with the estimate, before anything is allocated.

    Training keeps 4-byte copies of each trainable value: weights, gradient, two optimizer moments and the best
    head, plus the SAM family's saved point; evaluation only the weights. Activations come on top of this.
    """
    from align.device import available_memory
    from align.heads import parameter_counts
    from align.optim import optimizer_info

    image_dim, text_dim, known = _known_or_placeholder_dims(cfg)
    trainable, frozen = parameter_counts(cfg.head, cfg.loss, image_dim, text_dim)
    copies = (6 if optimizer_info(cfg.optim.name).two_pass else 5) if training else 1
    need = 4 * (trainable * copies + frozen)
    free = available_memory(device)
    if free is None or need <= free:
        return
    dims = f"{image_dim}/{text_dim}-d embeddings" if known else "embeddings not read yet (counted as 1-d)"
    doing = f"to train with {cfg.optim.name} ({copies} copies of each weight)" if training else "to hold it"
    raise AlignError(shorten(
        f"head.out_dim={cfg.head.out_dim}: a {cfg.head.kind} head on {dims} has {trainable + frozen:.3g} "
        f"parameters and needs {'' if known else 'at least '}{need / 1e9:.3g} GB {doing}, but {device} has "
        f"{free / 1e9:.3g} GB free: use a smaller head.out_dim or head.hidden_dim"))


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to train under bf16 autocast (``precision``: auto = on CUDA only); AlignError where impossible."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise AlignError("precision=bf16 needs a CUDA device here: use --set precision=fp32")
    return bf16


def optimizer_and_schedule(cfg: TrainConfig, model: torch.nn.Module) -> tuple[Any, Any]:
    """The configured optimizer over the model's param groups and its warm-up + cosine ``LambdaLR``."""
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


# -- one step --------------------------------------------------------------------------------------------

def _rng_tensors() -> dict[str, Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    return out


def _set_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _finite_model(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _window_mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


# -- the loop's state --------------------------------------------------------------------------------------

@dataclass
class BestHead:
    """The head with the best validation score so far."""

    step: int | None = None
    score: float | None = None
    val: dict[str, float] | None = None
    state: dict[str, Tensor] | None = None


@dataclass
class LoopState:
    """Everything the loop carries from one step to the next; a checkpoint stores it (``to_json``/``from_json``)."""

    step: int = 0
    stuck: int = 0  # consecutive collapsed steps
    wall_before: float = 0.0  # wall time of the run's earlier sessions
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))
    loss_at_step: float | None = None
    best: BestHead = field(default_factory=BestHead)
    max_val: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, Any] | None = None
    diverged: dict[str, Any] | None = None

    def to_json(self, wall_time_s: float) -> dict[str, Any]:
        return {"step": self.step, "stuck": self.stuck, "recent_losses": list(self.losses),
                "loss_at_step": self.loss_at_step, "max_val": self.max_val, "last_val": self.last_val,
                "wall_time_s": wall_time_s,
                "best": {"step": self.best.step, "score": self.best.score, "val": self.best.val},
                "diverged": self.diverged}

    @classmethod
    def from_json(cls, ts: dict[str, Any], best_state: dict[str, Tensor] | None) -> "LoopState":
        state = cls(step=ts["step"], stuck=ts["stuck"], wall_before=ts["wall_time_s"],
                    loss_at_step=ts["loss_at_step"], max_val=ts["max_val"], last_val=ts["last_val"],
                    diverged=ts["diverged"])
        state.losses.extend(float("nan") if v is None else v for v in ts["recent_losses"])
        state.best = BestHead(**ts["best"], state=best_state if ts["best"]["step"] is not None else None)
        return state


# -- one run -----------------------------------------------------------------------------------------------

class Trainer:
    """One run's model, optimizer, schedule and training data on its device, and the pieces of its loop."""

    def __init__(self, cfg: TrainConfig, data: RunData, device: torch.device, run: RunDir, started: float) -> None:
        from align.heads import build_model
        from align.losses import loss_for
        from align.optim import optimizer_info

        self.cfg, self.data, self.device, self.run, self.started = cfg, data, device, run, started
        self.config = hashed_config(cfg)
        self.cfg_hash = config_hash(self.config)
        self.bf16 = use_bf16(cfg, device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.head, cfg.loss, cfg.image_dim, cfg.text_dim).to(device)
        self.loss_fn = loss_for(cfg.loss)
        self.sampler = Sampler(data.train.caption_to_image, data.train.num_images, cfg.schedule.batch_size,
                               cfg.seed, device)
        self.image = data.train.image.to(device=device, dtype=torch.float32)
        self.text = data.train.text.to(device=device, dtype=torch.float32)
        self.two_pass = optimizer_info(cfg.optim.name).two_pass
        self.opt, self.sched = optimizer_and_schedule(cfg, self.model)
        self.uniform = uniform_loss(cfg.loss.kind, cfg.schedule.batch_size)

    def wall_time(self, state: LoopState) -> float:
        return state.wall_before + time.perf_counter() - self.started

    # -- checkpoints
    def restore(self, kind: str, log: Log) -> LoopState:
        """A fresh state, or the one of the newest checkpoint (model, optimizer, schedule and RNG restored too)."""
        found = self.run.latest_checkpoint() if kind == "resume" else None
        if found is None:
            if kind == "resume":
                log(f"{self.run.path} has no checkpoint yet: starting from step 0")
            self.run.begin(0)  # a stray metrics.jsonl without a checkpoint is not ours to append to
            return LoopState()
        tensors, meta = found
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.opt.load_state_dict(unflatten_state(meta["optimizer"], tensors))
        self.sched.load_state_dict(unflatten_state(meta["scheduler"], tensors))
        _set_rng(tensors)
        best_state = {k[5:]: v.to(self.device) for k, v in tensors.items() if k.startswith("best.")}
        state = LoopState.from_json(meta["train_state"], best_state)
        self.run.begin(state.step)
        log(f"resuming {self.run.path} from step {state.step}")
        return state

    def checkpoint(self, state: LoopState) -> None:
        """A resumable checkpoint of the whole training state at ``state.step``."""
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if state.best.state is not None:
            tensors.update({f"best.{k}": v for k, v in state.best.state.items()})
        tensors.update(_rng_tensors())
        meta = {"config_hash": self.cfg_hash, "config": self.config,
                "optimizer": flatten_state(self.opt.state_dict(), "optim", tensors),
                "scheduler": flatten_state(self.sched.state_dict(), "sched", tensors),
                "train_state": state.to_json(self.wall_time(state))}
        self.run.save_checkpoint(state.step, tensors, meta, keep=self.cfg.keep_checkpoints)

    # -- evaluation
    def evaluate(self, split: str) -> dict[str, float] | None:
        """Metrics of the current head on a role's split ("val" / "test"); None if its features are NaN/inf."""
        try:
            return evaluate_head(self.model, getattr(self.data, split), self.cfg.eval, self.device)
        except NonFiniteFeatures:
            return None

    def validate(self, state: LoopState) -> bool:
        """Validate, log, track the best head and the best of every metric; False if the features are NaN/inf."""
        metrics = self.evaluate("val")
        if metrics is None:
            return False
        state.last_val = dict(metrics, step=state.step)
        self.run.append_metrics({"kind": "val", "step": state.step, **metrics})
        update_best_over_training(state.max_val, metrics, self.cfg.eval.ks)
        score = metrics[self.cfg.eval.select]
        if math.isfinite(score) and (state.best.score is None or score > state.best.score):
            head = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            state.best = BestHead(step=state.step, score=score, val=metrics, state=head)
            self.run.save_head("best", head, {"step": state.step, "select": self.cfg.eval.select, "score": score,
                                              "val": metrics, "config_hash": self.cfg_hash})
        return True

    def test_and_sharpness(self, head: dict[str, Tensor] | None) -> tuple[dict | None, dict | None]:
        """Test metrics and sharpness of a head (None, None for no head)."""
        if head is None:
            return None, None
        self.model.load_state_dict(head)
        test = self.evaluate("test") if self.cfg.eval.test_split else None
        sharp = None
        if self.cfg.eval.sharpness and (test is not None or not self.cfg.eval.test_split):
            batches = self.sampler.fixed_batches(self.cfg.eval.sharpness_batches)
            sharp = head_sharpness(self.model, self.loss_fn, self.image, self.text, batches, self.cfg.eval)
        return test, sharp

    # -- training
    def step(self, state: LoopState) -> float | None:
        """One optimizer step and its metrics record → the loss, or None when it was non-finite (not stepped)."""
        from align.optim.step import backward_closure, take_step

        rows = self.sampler.batch(state.step)
        lr = self.opt.param_groups[0]["lr"]
        image, text = self.image[rows[0]], self.text[rows[1]]
        loss, grad_norm_t = take_step(self.opt, backward_closure(lambda: self.loss_fn(**self.model(image, text)),
                                                                 self.bf16), self.cfg.optim.grad_clip)
        loss_value, grad_norm = float(loss), float(grad_norm_t)
        record: dict[str, Any] = {"kind": "train", "step": state.step + 1, "loss": loss_value, "lr": lr}
        if not math.isfinite(loss_value):
            state.diverged = {"step": state.step + 1,
                              "reason": f"non-finite training loss ({loss_value}) at step {state.step + 1}"}
            self.run.append_metrics(dict(record, grad_norm=grad_norm))
            return None  # that step was not taken: steps_done stays at the last finite one
        self.model.clamp_logit_scale_()
        record.update(log_scale=float(self.model.log_scale.detach()), grad_norm=grad_norm)
        if self.two_pass:
            stats = self.opt.last_stats
            record.update(perturbation_norm=stats.get("perturbation_norm"),
                          effective_radius=stats.get("effective_radius"), skipped=stats.get("skipped"))
        self.sched.step()
        state.step += 1
        state.losses.append(loss_value)
        if state.step == self.cfg.loss_at_step:
            state.loss_at_step = _window_mean(list(state.losses))
        self.run.append_metrics(record)
        self._track_collapse(state, loss_value, grad_norm)
        return loss_value

    def _track_collapse(self, state: LoopState, loss: float, grad_norm: float) -> None:
        """Declare divergence after ``diverge_patience`` steps frozen at the uniform loss with a vanishing ‖g‖."""
        cfg = self.cfg
        collapsed = abs(loss - self.uniform) < cfg.diverge_tol and grad_norm < cfg.diverge_grad_tol
        state.stuck = state.stuck + 1 if collapsed else 0
        if state.stuck >= cfg.diverge_patience:
            state.diverged = {"step": state.step, "reason": f"collapsed: training loss stuck at the uniform value "
                              f"{self.uniform:.4f} with ‖g‖ < {cfg.diverge_grad_tol:g} for {state.stuck} steps "
                              f"(since step {state.step - state.stuck + 1})"}

    def loop(self, state: LoopState, progress: bool) -> None:
        """Train until the last step or divergence, validating and checkpointing on schedule."""
        from align.progress import progress_bar

        steps, name = self.cfg.schedule.steps, self.cfg.optim.name
        with progress_bar(steps, f"training {name}", enabled=progress) as bar:
            bar.advance(state.step)
            while state.step < steps and state.diverged is None:
                loss = self.step(state)
                if loss is None:
                    break
                bar.advance(1)
                if state.step % 10 == 0:
                    bar.describe(f"training {name}  loss {loss:.4f}")
                if state.diverged is not None:
                    break
                if (state.step % self.cfg.eval.every == 0 or state.step == steps) and not self.validate(state):
                    state.diverged = {"step": state.step,
                                      "reason": f"the head's features became NaN/inf by step {state.step}"}
                    break
                if state.step % self.cfg.checkpoint_every == 0 and state.step != steps:
                    self.checkpoint(state)

    # -- the end
    def final_val(self, state: LoopState) -> dict[str, float] | None:
        """Validation metrics of the final head (reused when the last validation was at the final step)."""
        if state.last_val is not None and state.last_val["step"] == state.step:
            return {k: v for k, v in state.last_val.items() if k != "step"}
        return self.evaluate("val") if _finite_model(self.model) else None

    def results(self, state: LoopState) -> dict[str, Any]:
        """Test and sharpness of the best and final heads → the results dict (the final head stays loaded)."""
        final_val = self.final_val(state)
        final_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        best_test, best_sharp = self.test_and_sharpness(state.best.state)
        if final_val is not None and state.best.step == state.step:  # the final head is the best one
            final_test, final_sharp = best_test, best_sharp
        else:
            final_test, final_sharp = self.test_and_sharpness(final_state if final_val is not None else None)
        self.model.load_state_dict(final_state)
        diverged, o = state.diverged, self.cfg.optim
        return {
            "status": "diverged" if diverged else "done",
            "diverged_at": diverged["step"] if diverged else None,
            "diverge_reason": diverged["reason"] if diverged else None,
            "steps_done": state.step, "best_step": state.best.step, "select": self.cfg.eval.select,
            "best_val": state.best.val, "final_val": final_val, "best_test": best_test, "final_test": final_test,
            "max_val": state.max_val,
            "loss_at_step": state.loss_at_step, "loss_at_step_T": self.cfg.loss_at_step,
            "final_loss": _window_mean(list(state.losses)),
            "sharpness": {"best": best_sharp, "final": final_sharp},
            "optimizer": o.name, "two_pass": self.two_pass,
            "skipped_perturbations": int(getattr(self.opt, "skipped_steps", 0)),
            "config_hash": self.cfg_hash, "device": str(self.device), "precision": "bf16" if self.bf16 else "fp32",
            "wall_time_s": self.wall_time(state),
        }


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, log: Log | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir`` (or continue it with ``resume``) → the results dict (also results.json)."""
    from align.device import pick_device

    log = log or (lambda message: None)
    started = time.perf_counter()
    device = pick_device(cfg.device)
    run = RunDir(run_dir)
    run.check_location()
    check_head_fits(cfg, device)  # before the data is read (dims from the cache count as 1) ...
    try:
        cfg, data = prepare_data(cfg)
        check_head_fits(cfg, device)  # ... and with the cache's dims
        trainer = Trainer(cfg, data, device, run, started)  # builds the head: its config errors come before any write
        with run.lock():  # the "fresh?" check and every write happen under it
            results = _train_locked(trainer, resume, log, progress)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(f"training {run.path} on {device}", exc, "use a smaller head or "
                                      "schedule.batch_size, or free memory; finished checkpoints are kept "
                                      "(continue with --resume)") from None
        raise
    return json_safe(results)


def _train_locked(trainer: Trainer, resume: bool, log: Log, progress: bool) -> dict[str, Any]:
    run = trainer.run
    kind = run.check(trainer.cfg_hash, trainer.config, resume)
    if kind == "finished":
        log(f"{run.path} is already finished; its results are in {run.results_path}")
        return run.read_results()
    state = trainer.restore(kind, log)
    run.write_config(dump_config(trainer.cfg))
    trainer.loop(state, progress)
    trainer.checkpoint(state)  # the final checkpoint (a diverged run still reports its best head)
    if state.diverged is not None:
        log(f"run diverged: {state.diverged['reason']}")
    results = trainer.results(state)
    run.write_results(results)
    return results
