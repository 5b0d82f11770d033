"""The optimizer registry: names → builders, their default hyper-parameters, display labels and plot colours.

Training loops ask ``optimizer_info(name).two_pass`` (the capability), never compare names. Plots take each
method's label and colour from here, so a method looks the same in every figure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from torch.optim import Optimizer

from align.optim.defaults import ASAM_DEFAULTS, BASE_CLASSES, FSAM_DEFAULTS, SAM_DEFAULTS
from align.optim.sam import ASAM, MSAM, SAM, FisherSAM


@dataclass(frozen=True)
class OptimizerInfo:
    """One registry entry: builder, two passes per step or one, defaults (rho/eta/base), label and plot colour."""

    name: str
    two_pass: bool
    description: str
    label: str
    color: str
    sam_class: type[SAM] | None = None
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


OPTIMIZERS: dict[str, OptimizerInfo] = {
    "sgd": OptimizerInfo("sgd", False, "SGD with (optional) momentum", "SGD", "#7f7f7f"),
    "adam": OptimizerInfo("adam", False, "Adam", "Adam", "#bcbd22"),
    "adamw": OptimizerInfo("adamw", False, "AdamW (decoupled weight decay)", "AdamW", "#8c564b"),
    "sam": OptimizerInfo("sam", True, "SAM: δ = ρ g/‖g‖", "SAM", "#1f77b4", SAM, SAM_DEFAULTS),
    "msam": OptimizerInfo("msam", True, "Monge SAM: δ = ρ g/(‖g‖√(1+‖g‖²))", "M-SAM", "#d62728", MSAM, SAM_DEFAULTS),
    "asam": OptimizerInfo("asam", True, "Adaptive SAM: δ = ρ T²g/‖Tg‖", "ASAM", "#2ca02c", ASAM, ASAM_DEFAULTS),
    "fsam": OptimizerInfo("fsam", True, "Fisher SAM: δ = ρ F⁻¹g/√(gᵀF⁻¹g)", "Fisher SAM", "#9467bd", FisherSAM,
                          FSAM_DEFAULTS),
}
BASE_OPTIMIZERS = tuple(BASE_CLASSES)


def optimizer_info(name: str) -> OptimizerInfo:
    """The registry entry for ``name``; ValueError listing the valid names otherwise."""
    try:
        return OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def default_hparams(name: str) -> dict[str, Any]:
    """The defaults ``create_optimizer(name, ...)`` uses for rho/eta/base ({} for the base optimizers)."""
    return dict(optimizer_info(name).defaults)


def _base(name: str, lr: float, weight_decay: float, momentum: float, betas: tuple[float, float],
          eps: float) -> tuple[type[Optimizer], dict[str, Any]]:
    if name not in BASE_CLASSES:
        raise ValueError(f"unknown base optimizer {name!r}; choose one of {', '.join(BASE_OPTIMIZERS)}")
    if name == "sgd":
        return BASE_CLASSES[name], dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    return BASE_CLASSES[name], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def create_optimizer(name: str, params: Iterable[Any], *, lr: float, weight_decay: float = 0.0,
                     momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     rho: float | None = None, eta: float | None = None, base: str | None = None,
                     max_grad_norm: float | None = None) -> Optimizer:
    """Build a registered optimizer. ``rho``/``eta``/``base``/``max_grad_norm`` apply to the SAM family only.

    ``rho``, ``eta`` and ``base`` left at None take the entry's defaults (``default_hparams(name)``), the same
    values the classes use as constructor defaults.
    """
    info = optimizer_info(name)
    if info.sam_class is None:
        if max_grad_norm is not None:
            raise ValueError("max_grad_norm is applied by the SAM family; clip in the training loop for base optimizers")
        cls, kwargs = _base(name, lr, weight_decay, momentum, betas, eps)
        return cls(params, **kwargs)
    d = info.defaults
    cls, kwargs = _base(base if base is not None else d["base"], lr, weight_decay, momentum, betas, eps)
    if "eta" in d:
        kwargs["eta"] = eta if eta is not None else d["eta"]
    elif eta is not None:
        raise ValueError(f"eta is not a parameter of {name}")
    return info.sam_class(params, cls, rho=rho if rho is not None else d["rho"], max_grad_norm=max_grad_norm, **kwargs)
