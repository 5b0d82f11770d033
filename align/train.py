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

Results (``results.json``, read by ``align compare``): see ``RESULT_KEYS``.
"""
from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import field_validator, model_validator
from torch import Tensor

from align import runs
from align.cache import EmbedConfig
from align.config import StrictModel, dump_config
from align.errors import AlignError
from align.heads import HeadConfig
from align.losses import LossConfig

Log = Callable[[str], None]

RESULT_KEYS = (
    "status",          # "done" | "diverged"
    "diverged_at",     # step at which divergence was declared, else None
    "diverge_reason",  # one line, else None
    "steps_done",      # optimizer steps taken
    "best_step",       # step of the best validation score (None if no validation ran)
    "select",          # the validation metric that picked the best step
    "best_val", "final_val", "best_test", "final_test",  # metric dicts (keys: METRIC_KEYS), or None
    "max_val",         # maximum of each validation metric over training
    "loss_at_step",    # mean training loss over the LOSS_WINDOW steps ending at cfg.loss_at_step (None if not reached)
    "loss_at_step_T",  # that T
    "final_loss",      # mean training loss over the last LOSS_WINDOW steps
    "sharpness",       # {"best": {...}, "final": {...}} of the head at its training loss (see evaluate.head_sharpness)
    "wall_time_s",     # training + evaluation time summed over all sessions of the run
)
LOSS_WINDOW = 10


# -- configuration ---------------------------------------------------------------------------------------

class OptimConfig(StrictModel):
    """Which registered optimizer and its hyper-parameters (rho/eta/base apply to the SAM family)."""

    name: str = "adamw"  # sgd | adam | adamw | sam | msam | asam | fsam
    lr: float = 1e-3  # peak learning rate (after warm-up)
    weight_decay: float = 0.0  # on Linear weights only; never on biases, norms or the logit scale
    momentum: float = 0.9  # SGD momentum (sgd, or the SAM family with base=sgd)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW
    eps: float = 1e-8  # Adam/AdamW
    rho: float = 0.05  # SAM-family radius
    eta: float | None = None  # ASAM / Fisher SAM regulariser; None: the method's default (0.01 / 1.0)
    base: str = "adamw"  # base optimizer of the SAM family: sgd | adam | adamw
    grad_clip: float | None = None  # max ‖g‖ of the gradient the base optimizer steps with (SAM: the second)

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        from align.optim import OPTIMIZERS

        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {value!r}; choose one of {', '.join(OPTIMIZERS)}")
        return value

    @field_validator("base")
    @classmethod
    def _known_base(cls, value: str) -> str:
        from align.optim import BASE_OPTIMIZERS

        if value not in BASE_OPTIMIZERS:
            raise ValueError(f"unknown base optimizer {value!r}; choose one of {', '.join(BASE_OPTIMIZERS)}")
        return value


class ScheduleConfig(StrictModel):
    """Length, batch size and learning-rate schedule (linear warm-up, then cosine decay to 0)."""

    steps: int = 400
    batch_size: int = 128  # images per step (the contrastive batch; the uniform loss is ln(batch_size))
    warmup_steps: int = 20

    @model_validator(mode="after")
    def _positive(self) -> "ScheduleConfig":
        if self.steps < 1 or self.batch_size < 2 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("need steps >= 1, batch_size >= 2 and 0 <= warmup_steps <= steps")
        return self


class EvalConfig(StrictModel):
    """Validation during training and the final test/sharpness evaluation."""

    every: int = 50  # validate every N steps (and at the end)
    split: str = "val"  # the validation split (ignored when holdout_images > 0)
    holdout_images: int = 0  # > 0: validate on this many training images held out from training instead
    # (for sets without a validation split, e.g. Flickr30k's hub copy with train and test only)
    test_split: str | None = "test"  # evaluated at the end for the best and the final head; None: skip
    ks: list[int] = [1, 5, 10]
    knn_k: int = 8  # k of mutual-k-NN and CKNNA (the paper uses 8)
    select: Literal["mean_R@1", "mutual_knn"] = "mean_R@1"  # picks the best checkpoint
    backend: Literal["faiss", "torch"] = "faiss"  # k-NN search of retrieval and alignment metrics
    sharpness: bool = True  # sharpness of the best and final heads at the training loss
    sharpness_rho: float = 0.05
    sharpness_batches: int = 4  # fixed training batches (of schedule.batch_size) the sharpness loss averages
    sharpness_ascent_steps: int = 5
    hessian_iters: int = 20  # power iterations for the top Hessian eigenvalue
    hutchinson_samples: int = 16  # Rademacher probes for the Hessian trace

    @field_validator("ks")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value) or 1 not in value:
            raise ValueError("ks must be positive and include 1 (mean_R@1 needs it)")
        return sorted(set(value))


class TrainConfig(StrictModel):
    """Everything one training run needs; ``config.yaml`` of a run directory is this, resolved."""

    data: EmbedConfig
    head: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    image_dim: int | None = None  # expected cached embedding dims; None: taken from the cache (and recorded)
    text_dim: int | None = None
    out_dir: str | None = None  # run directory; None: data/runs/<config file name>
    loss_at_step: int = 200  # the "loss at step T" reported for comparisons
    checkpoint_every: int = 100  # steps between resumable checkpoints (one is always written at the end)
    keep_checkpoints: int = 2
    diverge_patience: int = 20  # consecutive collapsed steps before a run is declared diverged
    diverge_tol: float = 1e-3  # |loss − uniform loss| below this counts as collapsed ...
    diverge_grad_tol: float = 1e-3  # ... together with ‖g‖ below this


def hashed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The part of the config a checkpoint must match: all but where the run lives and which device runs it."""
    data = cfg.model_dump(mode="json")
    for key in ("out_dir", "device"):
        data.pop(key, None)
    return data


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
            raise AlignError(f"{key}={expected} in the config but the cached {cfg.data.dataset} embeddings have "
                             f"{key.split('_')[0]} dimension {actual}: fix {key} (or drop it) or use the matching cache")
    return cfg.model_copy(update=dims)


# -- the loop --------------------------------------------------------------------------------------------

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


def prepare_run_dir(run_dir: Path, cfg_hash: str, config: dict[str, Any], resume: bool) -> str:
    """Check what ``run_dir`` holds against this run: "fresh", "resume" or "finished"; AlignError if it clashes.

    Only reads; nothing is written until every check has passed.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise AlignError(f"{run_dir} is a file, not a run directory: use --out with a folder path")
    existing = runs.is_run_dir(run_dir) or runs.list_checkpoints(run_dir) or (run_dir / runs.RESULTS_FILE).exists()
    if not existing:
        return "fresh"
    if not resume:
        raise AlignError(f"{run_dir} already holds a run: add --resume to continue it, or use --out NEW_DIR")
    if runs.is_run_dir(run_dir):
        from align.config import load_yaml

        saved = load_yaml(run_dir / runs.CONFIG_FILE)
        saved.pop("out_dir", None), saved.pop("device", None)
        if runs.config_hash(saved) != cfg_hash:
            keys = runs.diff_keys(saved, config)
            raise AlignError(f"{run_dir} was trained with another configuration (differs in: "
                             f"{', '.join(keys) or 'unknown'}): resume with its own config.yaml or use --out NEW_DIR")
    for step in runs.list_checkpoints(run_dir):
        meta = runs.read_json(runs.checkpoint_dir(run_dir) / f"step-{step:07d}.json")
        if meta.get("config_hash") != cfg_hash:
            keys = runs.diff_keys(meta.get("config", {}), config)
            raise AlignError(f"checkpoint step {step} in {run_dir} comes from another configuration (differs in: "
                             f"{', '.join(keys) or 'unknown'}): resume with the run's config.yaml or use --out NEW_DIR")
    if (run_dir / runs.RESULTS_FILE).exists():
        return "finished"
    return "resume"


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> tuple[Any, Any]:
    """The configured optimizer over the model's param groups and its warm-up + cosine ``LambdaLR``."""
    from align.optim import create_optimizer, optimizer_info

    o = cfg.optim
    kwargs: dict[str, Any] = dict(lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                  betas=tuple(o.betas), eps=o.eps)
    if optimizer_info(o.name).two_pass:
        kwargs.update(rho=o.rho, base=o.base, max_grad_norm=o.grad_clip)
        if o.eta is not None:
            kwargs["eta"] = o.eta
    try:
        opt = create_optimizer(o.name, model.param_groups(o.weight_decay), **kwargs)
    except ValueError as exc:
        raise AlignError(f"optim: {exc}") from None
    steps, warmup = cfg.schedule.steps, cfg.schedule.warmup_steps
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps, warmup))


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, log: Log | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir`` (or continue it with ``resume``) → the results dict (also results.json)."""
    from align.device import pick_device
    from align.evaluate import NonFiniteFeatures, evaluate_model, head_sharpness
    from align.heads import build_model
    from align.losses import loss_for
    from align.optim import optimizer_info
    from align.optim.step import backward_closure, take_step
    from align.progress import progress_bar

    log = log or (lambda message: None)
    started = time.perf_counter()
    run_dir = Path(run_dir)

    # 1. Everything that can fail on user input, before anything is written.
    device = pick_device(cfg.device)
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
    # Roles: what trains, what picks the best head, what reports it.
    data = {"train": loaded["train"], "val": loaded.get(cfg.eval.split),
            "test": loaded[cfg.eval.test_split] if cfg.eval.test_split else None}
    if holdout:
        data["train"], data["val"] = holdout_split(loaded["train"], holdout)
    config = hashed_config(cfg)
    cfg_hash = runs.config_hash(config)
    state_kind = prepare_run_dir(run_dir, cfg_hash, config, resume)
    if state_kind == "finished":
        log(f"{run_dir} is already finished; its results are in {run_dir / runs.RESULTS_FILE}")
        return runs.read_results(run_dir)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.head, cfg.loss, cfg.image_dim, cfg.text_dim).to(device)
    loss_fn = loss_for(cfg.loss)
    sampler = Sampler(data["train"].caption_to_image, data["train"].num_images, cfg.schedule.batch_size,
                      cfg.seed, device)
    train_image = data["train"].image.to(device=device, dtype=torch.float32)
    train_text = data["train"].text.to(device=device, dtype=torch.float32)

    o = cfg.optim
    two_pass = optimizer_info(o.name).two_pass
    opt, sched = build_optimizer(cfg, model)
    steps = cfg.schedule.steps
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise AlignError("precision=bf16 needs a CUDA device here: use --set precision=fp32")

    # 2. The loop's state: fresh, or restored from the newest checkpoint.
    step, stuck, wall_before = 0, 0, 0.0
    losses: deque[float] = deque(maxlen=LOSS_WINDOW)
    loss_at_step: float | None = None
    best: dict[str, Any] = {"step": None, "score": None, "val": None, "state": None}
    max_val: dict[str, float] = {}
    last_val: dict[str, Any] | None = None
    diverged: dict[str, Any] | None = None
    found = runs.latest_checkpoint(run_dir) if state_kind == "resume" else None
    if found is not None:
        tensors, meta = found
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict(runs.unflatten_state(meta["optimizer"], tensors))
        sched.load_state_dict(runs.unflatten_state(meta["scheduler"], tensors))
        _set_rng(tensors)
        ts = meta["train_state"]
        step, stuck, wall_before = ts["step"], ts["stuck"], ts["wall_time_s"]
        losses.extend(float("nan") if v is None else v for v in ts["recent_losses"])
        loss_at_step, max_val, last_val = ts["loss_at_step"], ts["max_val"], ts["last_val"]
        diverged = ts["diverged"]
        best = dict(ts["best"], state={k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
                    if ts["best"]["step"] is not None else None)
        runs.truncate_metrics(run_dir, step)
        log(f"resuming {run_dir} from step {step}")
    elif state_kind == "resume":
        runs.truncate_metrics(run_dir, 0)
        log(f"{run_dir} has no checkpoint yet: starting from step 0")
    run_dir.mkdir(parents=True, exist_ok=True)
    if state_kind == "fresh":
        runs.truncate_metrics(run_dir, 0)  # a stray metrics.jsonl without a run is not ours to append to
    config_path = run_dir / runs.CONFIG_FILE
    runs.write_config(run_dir, f"# align train --config {config_path} --resume   (continue or finish this run)\n"
                      f"# align train --config {config_path} --out NEW_DIR   (run it again elsewhere)\n"
                      + dump_config(cfg))
    uniform = uniform_loss(cfg.loss.kind, cfg.schedule.batch_size)

    def save(step_now: int) -> None:
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
        if best["state"] is not None:
            tensors.update({f"best.{k}": v for k, v in best["state"].items()})
        tensors.update(_rng_tensors())
        meta = {"config_hash": cfg_hash, "config": config,
                "optimizer": runs.flatten_state(opt.state_dict(), "optim", tensors),
                "scheduler": runs.flatten_state(sched.state_dict(), "sched", tensors),
                "train_state": {"step": step_now, "stuck": stuck, "recent_losses": list(losses),
                                "loss_at_step": loss_at_step, "max_val": max_val, "last_val": last_val,
                                "wall_time_s": wall_before + time.perf_counter() - started,
                                "best": {k: best[k] for k in ("step", "score", "val")}, "diverged": diverged}}
        runs.save_checkpoint(run_dir, step_now, tensors, meta, keep=cfg.keep_checkpoints)

    def safe_eval(split: str) -> dict[str, float] | None:
        try:
            return evaluate_model(model, data[split], cfg.eval, device)
        except NonFiniteFeatures:
            return None

    def validate(step_now: int) -> dict[str, Any] | None:
        nonlocal last_val
        metrics = safe_eval("val")
        if metrics is None:
            return None
        last_val = dict(metrics, step=step_now)
        runs.append_metrics(run_dir, {"kind": "val", "step": step_now, **metrics})
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value) and key.endswith(("knn", "cknna", "@1", "@5", "@10")):
                max_val[key] = max(value, max_val.get(key, -math.inf))
        score = metrics[cfg.eval.select]
        if math.isfinite(score) and (best["score"] is None or score > best["score"]):
            best.update(step=step_now, score=score, val=metrics,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
            runs.save_head(run_dir, "best", best["state"], {"step": step_now, "select": cfg.eval.select,
                                                            "score": score, "val": metrics, "config_hash": cfg_hash})
        return metrics

    # 3. Train.
    with progress_bar(steps, f"training {o.name}", enabled=progress) as bar:
        bar.advance(step)
        while step < steps and diverged is None:
            rows = sampler.batch(step)
            lr = opt.param_groups[0]["lr"]
            image, text = train_image[rows[0]], train_text[rows[1]]
            loss, grad_norm_t = take_step(opt, backward_closure(lambda: loss_fn(**model(image, text)), use_bf16),
                                          o.grad_clip)
            loss_value, grad_norm = float(loss), float(grad_norm_t)
            if not math.isfinite(loss_value):
                diverged = {"step": step + 1, "reason": f"non-finite training loss ({loss_value}) at step {step + 1}"}
                runs.append_metrics(run_dir, {"kind": "train", "step": step + 1, "loss": loss_value, "lr": lr,
                                              "grad_norm": grad_norm})
                break  # that step was not taken: steps_done stays at the last finite one
            model.clamp_logit_scale_()
            record: dict[str, Any] = {"kind": "train", "step": step + 1, "loss": loss_value, "lr": lr,
                                      "log_scale": float(model.log_scale.detach()), "grad_norm": grad_norm}
            if two_pass:
                stats = opt.last_stats
                record.update(perturbation_norm=stats.get("perturbation_norm"),
                              effective_radius=stats.get("effective_radius"), skipped=stats.get("skipped"))
            sched.step()
            step += 1
            losses.append(loss_value)
            if step == cfg.loss_at_step:
                loss_at_step = _window_mean(list(losses))
            runs.append_metrics(run_dir, record)
            bar.advance(1)
            if step % 10 == 0:
                bar.describe(f"training {o.name}  loss {loss_value:.4f}")

            collapsed = abs(loss_value - uniform) < cfg.diverge_tol and grad_norm < cfg.diverge_grad_tol
            stuck = stuck + 1 if collapsed else 0
            if stuck >= cfg.diverge_patience:
                diverged = {"step": step, "reason": f"collapsed: training loss stuck at the uniform value "
                            f"{uniform:.4f} with ‖g‖ < {cfg.diverge_grad_tol:g} for {stuck} steps "
                            f"(since step {step - stuck + 1})"}
                break
            if (step % cfg.eval.every == 0 or step == steps) and validate(step) is None:
                diverged = {"step": step, "reason": f"the head's features became NaN/inf by step {step}"}
                break
            if step % cfg.checkpoint_every == 0 and step != steps:
                save(step)

    # 4. Final checkpoint and evaluation (a diverged run still reports its best head).
    save(step)
    if diverged is not None:
        log(f"run diverged: {diverged['reason']}")
    final_val = None
    if last_val is not None and last_val["step"] == step:
        final_val = {k: v for k, v in last_val.items() if k != "step"}
    elif _finite_model(model):
        final_val = safe_eval("val")
    final_ok = final_val is not None
    final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def test_and_sharpness(state: dict[str, Tensor] | None) -> tuple[dict | None, dict | None]:
        if state is None:
            return None, None
        model.load_state_dict(state)
        test = safe_eval("test") if cfg.eval.test_split else None
        sharp = None
        if cfg.eval.sharpness and (test is not None or not cfg.eval.test_split):
            batches = sampler.fixed_batches(cfg.eval.sharpness_batches)
            sharp = head_sharpness(model, loss_fn, train_image, train_text, batches, cfg.eval)
        return test, sharp

    best_test, best_sharp = test_and_sharpness(best["state"])
    if final_ok and best["step"] == step:  # the final head is the best one
        final_test, final_sharp = best_test, best_sharp
    else:
        final_test, final_sharp = test_and_sharpness(final_state if final_ok else None)
    model.load_state_dict(final_state)

    results = {
        "status": "diverged" if diverged else "done",
        "diverged_at": diverged["step"] if diverged else None,
        "diverge_reason": diverged["reason"] if diverged else None,
        "steps_done": step,
        "best_step": best["step"],
        "select": cfg.eval.select,
        "best_val": best["val"], "final_val": final_val, "best_test": best_test, "final_test": final_test,
        "max_val": max_val,
        "loss_at_step": loss_at_step, "loss_at_step_T": cfg.loss_at_step,
        "final_loss": _window_mean(list(losses)),
        "sharpness": {"best": best_sharp, "final": final_sharp},
        "optimizer": o.name, "two_pass": two_pass,
        "skipped_perturbations": int(getattr(opt, "skipped_steps", 0)),
        "config_hash": cfg_hash,
        "device": str(device), "precision": "bf16" if use_bf16 else "fp32",
        "wall_time_s": wall_before + time.perf_counter() - started,
    }
    runs.write_results(run_dir, results)
    return runs.json_safe(results)
