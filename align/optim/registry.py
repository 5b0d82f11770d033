"""The optimizer registry: names → builders, and what each one needs from a training loop.

Training loops ask ``optimizer_info(name).two_pass`` (the capability), never compare names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from align.optim.sam import ASAM, MSAM, SAM, FisherSAM


@dataclass(frozen=True)
class OptimizerInfo:
    """One registry entry: its builder and whether it needs two forward/backward passes per step."""

    name: str
    two_pass: bool
    description: str
    sam_class: type[SAM] | None = None


OPTIMIZERS: dict[str, OptimizerInfo] = {
    "sgd": OptimizerInfo("sgd", False, "SGD with (optional) momentum"),
    "adam": OptimizerInfo("adam", False, "Adam"),
    "adamw": OptimizerInfo("adamw", False, "AdamW (decoupled weight decay)"),
    "sam": OptimizerInfo("sam", True, "SAM: δ = ρ g/‖g‖", SAM),
    "msam": OptimizerInfo("msam", True, "Monge SAM: δ = ρ g/(‖g‖√(1+‖g‖²))", MSAM),
    "asam": OptimizerInfo("asam", True, "Adaptive SAM: δ = ρ T²g/‖Tg‖", ASAM),
    "fsam": OptimizerInfo("fsam", True, "Fisher SAM: δ = ρ F⁻¹g/√(gᵀF⁻¹g)", FisherSAM),
}
BASE_OPTIMIZERS = ("sgd", "adam", "adamw")


def optimizer_info(name: str) -> OptimizerInfo:
    """The registry entry for ``name``; ValueError listing the valid names otherwise."""
    try:
        return OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def _base(name: str, lr: float, weight_decay: float, momentum: float, betas: tuple[float, float],
          eps: float) -> tuple[type[Optimizer], dict[str, Any]]:
    if name == "sgd":
        return torch.optim.SGD, dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown base optimizer {name!r}; choose one of {', '.join(BASE_OPTIMIZERS)}")


def create_optimizer(name: str, params: Iterable[Any], *, lr: float, weight_decay: float = 0.0,
                     momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     rho: float = 0.05, eta: float | None = None, base: str = "sgd",
                     max_grad_norm: float | None = None) -> Optimizer:
    """Build a registered optimizer. ``rho``/``eta``/``base``/``max_grad_norm`` apply to the SAM family only.

    ``eta`` defaults to 0.01 for ASAM (the ASAM paper) and 1.0 for Fisher SAM.
    """
    info = optimizer_info(name)
    if info.sam_class is None:
        if max_grad_norm is not None:
            raise ValueError("max_grad_norm is applied by the SAM family; clip in the training loop for base optimizers")
        cls, kwargs = _base(name, lr, weight_decay, momentum, betas, eps)
        return cls(params, **kwargs)
    cls, kwargs = _base(base, lr, weight_decay, momentum, betas, eps)
    if info.sam_class in (ASAM, FisherSAM):
        kwargs["eta"] = eta if eta is not None else (0.01 if info.sam_class is ASAM else 1.0)
    elif eta is not None:
        raise ValueError(f"eta is not a parameter of {name}")
    return info.sam_class(params, cls, rho=rho, max_grad_norm=max_grad_norm, **kwargs)
