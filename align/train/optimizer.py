"""A run's optimizer from its config (orchestration): the per-head hyper-parameters a pack steps with, and the
torch optimizer with its warm-up + cosine schedule that one head would use alone (the reference path the pack's
steps are compared with in benchmarks and tests).
"""
from __future__ import annotations

from typing import Any

import torch

from align.common.errors import AlignError
from align.optim import create_optimizer, optimizer_info
from align.optim.batched import head_hparams
from align.train.config import TrainConfig
from align.train.run_data import lr_factor


def head_hparams_of(cfg: TrainConfig) -> dict[str, Any]:
    """The run's optimizer as per-head hyper-parameters (``align.optim.batched.head_hparams``); AlignError on a
    knob the method lacks (alpha for SAM), as building the optimizer would."""
    o = cfg.optim
    method = dict(o.method_hparams(), base=o.base) if optimizer_info(o.name).two_pass else {}
    try:
        return head_hparams(o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, betas=o.betas,
                            eps=o.eps, grad_clip=o.grad_clip, perturbation=o.perturbation, **method)
    except ValueError as exc:
        raise AlignError(f"optim: {exc}") from None


def optimizer_and_schedule(cfg: TrainConfig, model: torch.nn.Module) -> tuple[Any, Any]:
    """The configured torch optimizer over a model's param groups and its warm-up + cosine ``LambdaLR``: the reference
    path of one head (benchmarks and tests compare the pack's steps with it)."""
    o = cfg.optim
    kwargs: dict[str, Any] = dict(lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                  betas=o.betas, eps=o.eps)
    if optimizer_info(o.name).two_pass:  # one the method does not have (alpha for SAM) is a one-line error
        kwargs.update(o.method_hparams(), base=o.base, max_grad_norm=o.grad_clip)
    try:
        opt = create_optimizer(o.name, model.param_groups(o.weight_decay), **kwargs)
    except ValueError as exc:
        raise AlignError(f"optim: {exc}") from None
    steps, warmup = cfg.schedule.steps, cfg.schedule.warmup_steps
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps, warmup))
