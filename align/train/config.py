"""The configuration of one training run (``config.yaml`` of a run directory), checked before any data is read.

Every value a user can get wrong is refused here, at load, with one line naming the key: a zero ``eval.every``
would otherwise fail as a ZeroDivisionError after training has started, and a NaN learning rate would be reported
as the optimizer's divergence. Numbers refuse booleans (``lr: true`` is not 1.0).

What a config implies lives here too: the part its checkpoints must match (``hashed_config``), what the runs of
one pack share (``pack_key``) and whether it trains under bf16 autocast (``TrainConfig.uses_bf16``).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, create_model, field_validator, model_validator

from align.cache.key import CachesConfig, DataSection, EmbedConfig
from align.common.config import MAX_SEED, Integer, Number, StrictModel
from align.common.errors import AlignError
from align.data.datasets import LABELLED_KINDS
from align.optim.hparams import Hparam
from align.optim.registry import (BASE_OPTIMIZERS, METHOD_HPARAMS, OPTIMIZERS, base_betas, hparam_spec,
                                  optimizer_info, resolve_hparams)
from align.train.heads import HeadConfig
from align.train.identity import config_hash, hashed_view
from align.train.losses import LossConfig
from align.train.tracking import report_targets


FP32_MAX = torch.finfo(torch.float32).max  # the largest sharpness radius the fp32 measurement can hold


def _finite_positive(value: float | None, what: str) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return value


class _OptimSettings(StrictModel):
    """The optimizer and its base optimizer's settings (the first keys of ``optim:``)."""

    name: str = "adamw"  # a registered optimizer (align.optim.OPTIMIZERS)
    lr: Number = 1e-3  # peak learning rate (after warm-up)
    weight_decay: Number = Field(0.0, ge=0)  # on Linear weights only; never on biases, norms or the logit scale
    momentum: Number = Field(0.9, ge=0)  # SGD momentum (sgd, or the SAM family with base=sgd)
    betas: tuple[Number, Number] | None = None  # Adam/AdamW/Lion, each in [0, 1); None: the base's own (a run's
    # config.yaml holds the resolved pair: Adam's (0.9, 0.999), Lion's (0.9, 0.99))
    eps: Number = Field(1e-8, gt=0)  # Adam/AdamW

    @field_validator(*METHOD_HPARAMS, check_fields=False)
    @classmethod
    def _method_value(cls, value: Any, info: ValidationInfo) -> Any:
        """In the range of some method that has it (the configured method's own range is checked with the name)."""
        if value is None:
            return value
        specs = [h for i in OPTIMIZERS.values() for h in i.hparams if h.name == info.field_name]
        errors = []
        for spec in specs:
            try:
                return spec.check(value)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])


def _method_field(spec: Hparam) -> tuple[Any, Any]:
    """The config field of a method hyper-parameter: optional; None takes the method's default."""
    kind = Literal[spec.choices] if spec.choices else Integer if spec.integer else Number  # type: ignore[valid-type]
    return kind | None, Field(None, description=spec.doc)


# The SAM family's own hyper-parameters, one field each (from the registry); None takes the method's default
# (`align.optim.default_hparams`), and a study's shared value reaches only the methods that have it.
_OptimMethodHparams = create_model("_OptimMethodHparams", __base__=_OptimSettings,
                                   **{n: _method_field(hparam_spec(n)) for n in METHOD_HPARAMS})


class OptimConfig(_OptimMethodHparams):  # type: ignore[misc, valid-type]
    """Which registered optimizer and its hyper-parameters (rho and the method keys apply to the SAM family)."""

    base: str = "adamw"  # base optimizer of the SAM family (align.optim.BASE_OPTIMIZERS)
    grad_clip: Number | None = None  # max ‖g‖ of the gradient the base optimizer steps with (SAM: the second)
    # The SAM family under torchrun: global averages the ranks' first gradients before δ (the single-process
    # step); local takes δ from each rank's own gradient and averages only the second. Other optimizers and
    # single-process runs ignore it.
    perturbation: Literal["global", "local"] = "global"

    def method_hparams(self) -> dict[str, Any]:
        """The SAM-family hyper-parameters that were set (the rest take the method's defaults)."""
        return {k: getattr(self, k) for k in METHOD_HPARAMS if getattr(self, k) is not None}

    def stepping_base(self) -> str:
        """The base optimizer that steps: ``base`` for the SAM family, the optimizer itself otherwise."""
        return self.base if optimizer_info(self.name).two_pass else self.name

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {value!r}; choose one of {', '.join(OPTIMIZERS)}")
        return value

    @field_validator("base")
    @classmethod
    def _known_base(cls, value: str) -> str:
        if value not in BASE_OPTIMIZERS:
            raise ValueError(f"unknown base optimizer {value!r}; choose one of {', '.join(BASE_OPTIMIZERS)}")
        return value

    @field_validator("lr")
    @classmethod
    def _lr(cls, value: float) -> float:
        return _finite_positive(value, "lr")

    @field_validator("grad_clip")
    @classmethod
    def _grad_clip(cls, value: float | None) -> float | None:
        return _finite_positive(value, "grad_clip")

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not all(math.isfinite(b) and 0 <= b < 1 for b in value):  # torch refuses them
            raise ValueError(f"each of betas must be in [0, 1), got {list(value)}")  # only when it builds Adam
        return value

    @field_validator("weight_decay", "momentum", "eps")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be finite, got {value!r}")
        return value

    @model_validator(mode="after")
    def _fits_the_method(self) -> "OptimConfig":
        """The method's own ranges and cross-checks (GSAM: ρ_min ≤ ρ) for the keys it has, and optim.perturbation
        local only where it is implemented. Keys it lacks are left for the run (refused there) or, in a study's
        shared section, for the methods that have them."""
        info = optimizer_info(self.name)
        if info.two_pass:
            resolve_hparams(self.name, {k: v for k, v in self.method_hparams().items() if info.hparam(k)})
            if self.perturbation == "local" and not info.local_perturbation:
                raise ValueError(f"optim.perturbation local is not implemented for {self.name}: use global")
        return self


class ScheduleConfig(StrictModel):
    """Length, batch size and learning-rate schedule (linear warm-up, then cosine decay to 0)."""

    steps: Integer = 400
    batch_size: Integer = 128  # images per step (the contrastive batch; the uniform loss is ln(batch_size))
    warmup_steps: Integer = 20
    # The images' order in each epoch (``align.train.run_data.Sampler``): random, a uniform permutation; blocks,
    # contiguous blocks of block_rows images shuffled, then rows shuffled within windows of a few blocks, so that a
    # cache larger than memory is read mostly in sequence (batches then mix fewer distant images).
    order: Literal["random", "blocks"] = "random"
    block_rows: Integer = Field(8192, ge=1)  # images per block of the blocks order (ignored by random)

    @model_validator(mode="after")
    def _positive(self) -> "ScheduleConfig":
        if self.steps < 1 or self.batch_size < 2 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("need steps >= 1, batch_size >= 2 and 0 <= warmup_steps <= steps")
        return self


class EvalConfig(StrictModel):
    """Validation during training and the final test/sharpness evaluation."""

    every: Integer = Field(50, ge=1)  # validate every N steps (and at the end)
    split: str = "val"  # the validation split (ignored when holdout_images > 0)
    holdout_images: Integer = Field(0, ge=0)  # > 0: validate on this many training images held out instead
    # (for sets without a validation split, e.g. Flickr30k's hub copy with train and test only)
    test_split: str | None = "test"  # evaluated at the end for the best and the final head; None: skip
    ks: list[Integer] = [1, 5, 10]
    knn_k: Integer = Field(8, ge=1)  # k of mutual-k-NN and CKNNA (the paper uses 8)
    select: Literal["mean_R@1", "mutual_knn", "zeroshot_top1"] = "mean_R@1"  # picks the best checkpoint
    # (zeroshot_top1: labelled sets such as mnist, whose captions name only the class)
    backend: Literal["faiss", "torch"] = "faiss"  # k-NN search of retrieval and alignment metrics
    sharpness: bool = True  # sharpness of the best and final heads at the training loss
    sharpness_final: bool = True  # False: the best head's only (a study's table uses the best head's)
    sharpness_rho: Number = Field(0.05, gt=0)
    sharpness_batches: Integer = Field(4, ge=1)  # fixed training batches (of schedule.batch_size) it averages
    sharpness_ascent_steps: Integer = Field(5, ge=0)
    # Worst cases within other balls of the same ρ, beside the Euclidean one (align.metrics.sharpness): adaptive
    # (ASAM's, unchanged by a function-preserving rescaling of the head) and monge (M-SAM's metric).
    sharpness_geometries: list[Literal["adaptive", "monge"]] = []
    hessian_iters: Integer = Field(20, ge=1)  # power iterations for the top Hessian eigenvalue
    hutchinson_samples: Integer = Field(16, ge=1)  # Rademacher probes for the Hessian trace

    @field_validator("sharpness_rho")
    @classmethod
    def _sharpness_rho(cls, value: float) -> float:
        # The perturbation is fp32 (no autocast): a larger radius is inf there, and every sharpness figure NaN.
        if not (math.isfinite(value) and 0 < value <= FP32_MAX):
            raise ValueError(f"sharpness_rho must be a number > 0 and at most {FP32_MAX:.3g} (it perturbs fp32 "
                             f"weights), got {value!r}")
        return value

    @field_validator("ks")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value) or 1 not in value:
            raise ValueError("ks must be positive and include 1 (mean_R@1 needs it)")
        return sorted(set(value))


class TrainConfig(StrictModel):
    """Everything one training run needs; ``config.yaml`` of a run directory is this, resolved."""

    data: DataSection  # the embed settings (EmbedConfig), or finished caches named per split (CachesConfig)
    head: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    seed: Integer = Field(0, ge=0, lt=MAX_SEED)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    image_dim: Integer | None = Field(None, ge=1)  # expected cached embedding dims; None: taken from the cache
    text_dim: Integer | None = Field(None, ge=1)  # (and recorded)
    out_dir: str | None = None  # where `align train --config RUN/config.yaml` writes; None: <runs>/<config name>
    loss_at_step: Integer = Field(200, ge=1)  # the "loss at step T" reported for comparisons
    checkpoint_every: Integer = Field(100, ge=1)  # steps between resumable checkpoints (and one at the end)
    keep_checkpoints: Integer = Field(2, ge=1)
    diverge_patience: Integer = Field(20, ge=1)  # consecutive collapsed steps before a run is declared diverged
    diverge_tol: Number = Field(1e-3, gt=0)  # |loss − uniform loss| below this counts as collapsed ...
    diverge_grad_tol: Number = Field(1e-3, gt=0)  # ... together with ‖g‖ below this
    # Collapse as the paper counts divergence (it does not end a run): a step is on the uniform plateau when its
    # training loss L has |L − L_u| ≤ uniform_plateau_tol · L_u (L_u: the uniform-prediction loss, ln B for CLIP);
    # a run whose longest stretch of consecutive plateau steps is ≥ collapse_fraction of schedule.steps collapsed.
    uniform_plateau_tol: Number = Field(0.05, gt=0, lt=1)
    collapse_fraction: Number = Field(0.1, gt=0, le=1)
    # Experiment trackers the run reports to besides metrics.jsonl (align.train.tracking): tensorboard, wandb,
    # mlflow (a list, or comma-separated text); [] or none: no tracker. Neither key enters the config hash.
    report_to: list[str] = []
    report_group: str | None = None  # the trackers' group (wandb) or experiment (MLflow); a study sets its name

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> list[str]:
        return report_targets(value)

    RESOLVES_BETAS: ClassVar[bool] = True  # a study's shared optim section leaves betas unset for each cell

    @model_validator(mode="after")
    def _betas_of_the_base(self) -> "TrainConfig":
        """Unset betas become the stepping base optimizer's own, so a run's config.yaml holds the pair it used."""
        if type(self).RESOLVES_BETAS and self.optim.betas is None:
            self.optim.betas = base_betas(self.optim.stepping_base(), None)
        return self

    @model_validator(mode="after")
    def _select_fits_data(self) -> "TrainConfig":
        """An embed section says whether its set is labelled; named caches say it in their manifests (checked with
        the splits' roles, ``align.train.run_data.check_roles``)."""
        if (self.eval.select.startswith("zeroshot") and isinstance(self.data, EmbedConfig)
                and self.data.dataset.kind not in LABELLED_KINDS):
            raise ValueError(f"eval.select={self.eval.select} needs a labelled dataset ({', '.join(LABELLED_KINDS)}), "
                             f"not kind {self.data.dataset.kind!r}")
        return self

    @model_validator(mode="after")
    def _caches_cover_roles(self) -> "TrainConfig":
        """Named caches hold every split the run trains, validates and tests on."""
        if not isinstance(self.data, CachesConfig):
            return self
        roles = [("train", "training", "")]
        if not self.eval.holdout_images:
            roles.append((self.eval.split, "eval.split", ", or validate on eval.holdout_images"))
        if self.eval.test_split is not None:
            roles.append((self.eval.test_split, "eval.test_split", ", or set eval.test_split: null"))
        for split, role, fix in roles:
            if split not in self.data.caches:
                raise ValueError(f"data.caches has no {split!r} entry, which {role} needs: add data.caches.{split}: "
                                 f"NAME{fix}")
        return self

    @field_validator("diverge_tol", "diverge_grad_tol")
    @classmethod
    def _tolerance(cls, value: float, info: ValidationInfo) -> float:
        return _finite_positive(value, info.field_name)  # inf would call every run diverged, with a false reason

    def uses_bf16(self, device: torch.device) -> bool:
        """Whether the run trains under bf16 autocast on ``device`` (``precision``: auto = on CUDA only);
        AlignError where it cannot."""
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        if bf16 and device.type != "cuda":
            raise AlignError("precision=bf16 needs a CUDA device here: use --set precision=fp32")
        return bf16


def hashed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The part of the config a checkpoint must match: all but where the run lives and which device runs it
    (``align.train.identity.hashed_view``)."""
    return hashed_view(cfg.model_dump(mode="json"))


PACK_FREE = ("optim", "seed", "out_dir")  # what may differ between the runs of one pack (and the logit clamp)


def pack_key(cfg: TrainConfig) -> str:
    """What runs must share to train in one pack: everything but the optimizer, the seed, the run directory and
    the logit-scale clamp (same data, head, loss, schedule, evaluation, device and precision)."""
    data = hashed_config(cfg)
    for key in PACK_FREE:
        data.pop(key, None)
    data["loss"] = {k: v for k, v in data["loss"].items() if k != "clamp"}
    return config_hash(data)

