"""The optimizer registry: names → builders, their default hyper-parameters, display labels and plot colours.

Training loops ask ``optimizer_info(name).two_pass`` (the capability), never compare names. Plots take each
method's label and colour from here, so a method looks the same in every figure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from torch.optim import Optimizer

from align.optim.defaults import ASAM_DEFAULTS, BASE_CLASSES, FSAM_DEFAULTS, MSAM_DEFAULTS, SAM_DEFAULTS
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
    "msam": OptimizerInfo("msam", True, "Monge SAM: δ = ρ g/(‖g‖√(1+‖g‖²))", "M-SAM", "#d62728", MSAM, MSAM_DEFAULTS),
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


# What the base optimizers take besides lr, with the values an omitted one takes (SGD uses momentum, Adam and AdamW
# betas and eps; all of them weight decay).
BASE_HPARAMS: Mapping[str, Any] = MappingProxyType({"weight_decay": 0.0, "momentum": 0.0, "betas": (0.9, 0.999),
                                                    "eps": 1e-8})


def _base(name: str, lr: float, given: Mapping[str, Any]) -> tuple[type[Optimizer], dict[str, Any]]:
    """The base optimizer class ``name`` and its keyword arguments from the ``BASE_HPARAMS`` in ``given``."""
    if name not in BASE_CLASSES:
        raise ValueError(f"unknown base optimizer {name!r}; choose one of {', '.join(BASE_OPTIMIZERS)}")
    hp = {k: given.get(k, v) for k, v in BASE_HPARAMS.items()}
    if name == "sgd":
        return BASE_CLASSES[name], dict(lr=lr, momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    return BASE_CLASSES[name], dict(lr=lr, betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"])


def create_optimizer(name: str, params: Iterable[Any], *, lr: float, base: str | None = None,
                     max_grad_norm: float | None = None, **hparams: Any) -> Optimizer:
    """Build a registered optimizer. ``hparams``: the base optimizer's (``BASE_HPARAMS``: weight_decay, momentum,
    betas, eps) and the SAM family's own (rho, eta, alpha, metric_beta, norm_scope: whichever
    ``default_hparams(name)`` lists). ``base``/``max_grad_norm`` and the method hyper-parameters belong to the SAM
    family; the base optimizers ignore them, so one set of arguments builds every entry.

    Hyper-parameters left out or None take the entry's defaults, the same values the classes use as constructor
    defaults; one a SAM-family method does not have is a ValueError.
    """
    info = optimizer_info(name)
    method = {k: v for k, v in hparams.items() if k not in BASE_HPARAMS}
    if info.sam_class is None:
        if max_grad_norm is not None:
            raise ValueError("max_grad_norm is applied by the SAM family; clip in the training loop for base optimizers")
        cls, kwargs = _base(name, lr, hparams)
        return cls(params, **kwargs)
    d = info.defaults
    unknown = sorted(k for k, v in method.items() if v is not None and (k not in d or k == "base"))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} {'is not a parameter' if len(unknown) == 1 else 'are not parameters'}"
                         f" of {name}")
    cls, kwargs = _base(base if base is not None else d["base"], lr, hparams)
    hparams = {k: (method[k] if method.get(k) is not None else v) for k, v in d.items() if k != "base"}
    return info.sam_class(params, cls, max_grad_norm=max_grad_norm, **hparams, **kwargs)
