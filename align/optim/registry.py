"""The optimizer registry: one entry per method — its class, its stacked-heads rule, its hyper-parameters (name,
symbol, default, range, grid axis), display label and plot colour — and everything derived from them.

Training loops ask ``optimizer_info(name).two_pass`` (the capability), never compare names. Every other list of
methods or of method hyper-parameters (the training config's keys, a study's grid axes, the tables' labels, the
per-head hyper-parameters of a pack) is derived here; tests/test_registry_names.py fails on a new one spelled
elsewhere. Adding a method: one file under align/optim/ (class + batched rule + its ``Hparam`` s), one entry below.

Names users trip on: M-SAM here is Monge SAM, not Momentum-SAM ("MSAM", Becker et al. 2024) or micro-batch mSAM;
FSAM here is Fisher SAM, not Friendly SAM ("F-SAM", registry name ``friendly_sam``).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.optim import Optimizer

from align.optim import asam, friendly_sam, fsam, gsam, looksam, msam, sam
from align.optim.hparams import Hparam
from align.optim.lion import DEFAULT_BETAS as LION_BETAS
from align.optim.lion import Lion
from align.optim.stacked import BatchedRule
from align.optim.two_pass import DEFAULT_BASE_CLASS, SharpnessAware

ADAM_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class BaseInfo:
    """A base optimizer: its class, which of ``BASE_HPARAMS`` it takes, its default betas and the per-parameter
    state its checkpoint holds (``momentum_buffer`` only with momentum)."""

    cls: type[Optimizer]
    knobs: tuple[str, ...]
    state_keys: tuple[str, ...]
    betas: tuple[float, float] | None = None

    def state_copies(self, momentum: float) -> int:
        """Copies of each trainable value its state keeps (``step`` is a count, not a copy)."""
        keys = [k for k in self.state_keys if k != "step"]
        return 0 if keys == ["momentum_buffer"] and momentum == 0 else len(keys)


@dataclass(frozen=True)
class OptimizerInfo:
    """One registry entry: two passes per step (on some steps) or one, its description, label and plot colour; for
    the SAM family its class, hyper-parameters and stacked-heads rule; for a base optimizer its ``BaseInfo``."""

    name: str
    two_pass: bool
    description: str
    label: str
    color: str
    sam_class: type[SharpnessAware] | None = None
    hparams: tuple[Hparam, ...] = ()
    rule: BatchedRule | None = None
    base: BaseInfo | None = None
    in_default_grid: bool = False  # in GridConfig's default optimizers
    local_perturbation: bool = True  # optim.perturbation local (δ from each rank's own gradient) is implemented
    check: Callable[[Mapping[str, Any]], None] | None = None  # a check across its resolved hyper-parameters
    passes: Callable[[Mapping[str, Any], int], int] | None = None  # forward/backward passes of N steps

    @property
    def defaults(self) -> Mapping[str, Any]:
        """What an omitted hyper-parameter becomes (the class's constructor defaults), ``base`` included."""
        if self.sam_class is None:
            return MappingProxyType({})
        return MappingProxyType({**{h.name: h.default for h in self.hparams}, "base": DEFAULT_BASE})

    def hparam(self, name: str) -> Hparam | None:
        """The entry's hyper-parameter ``name`` (None if it has none)."""
        return next((h for h in self.hparams if h.name == name), None)

    def forward_backward_passes(self, hparams: Mapping[str, Any], steps: int) -> int:
        """Passes over ``steps`` steps with these hyper-parameters (LookSAM: steps + ⌈steps/k⌉)."""
        if self.passes is not None:
            return self.passes(resolve_hparams(self.name, hparams), steps)
        return (2 if self.two_pass else 1) * steps


def _gsam_check(values: Mapping[str, Any]) -> None:
    gsam.check_radii(values["rho"], values["rho_min"])


SGD = BaseInfo(torch.optim.SGD, ("momentum", "weight_decay"), ("momentum_buffer",))
ADAM = BaseInfo(torch.optim.Adam, ("betas", "eps", "weight_decay"), ("step", "exp_avg", "exp_avg_sq"), ADAM_BETAS)
ADAMW = BaseInfo(torch.optim.AdamW, ("betas", "eps", "weight_decay"), ("step", "exp_avg", "exp_avg_sq"), ADAM_BETAS)
LION = BaseInfo(Lion, ("betas", "weight_decay"), ("exp_avg",), LION_BETAS)

OPTIMIZERS: dict[str, OptimizerInfo] = {info.name: info for info in (
    OptimizerInfo("sgd", False, "SGD with (optional) momentum", "SGD", "#7f7f7f", base=SGD, in_default_grid=True),
    OptimizerInfo("adam", False, "Adam", "Adam", "#bcbd22", base=ADAM),
    OptimizerInfo("adamw", False, "AdamW (decoupled weight decay)", "AdamW", "#8c564b", base=ADAMW,
                  in_default_grid=True),
    OptimizerInfo("sam", True, "SAM (Foret et al., ICLR 2021): δ = ρ g/‖g‖", "SAM", "#1f77b4", sam.SAM, sam.HPARAMS,
                  sam.RULE, in_default_grid=True),
    OptimizerInfo("msam", True, "Monge SAM (Jacobsen & Arvanitidis 2025; not Momentum-SAM 'MSAM', Becker et al. "
                  "2024, nor micro-batch mSAM): δ = ρ g/(‖g‖√(1+α²‖g‖²))", "M-SAM", "#d62728", msam.MSAM,
                  msam.HPARAMS, msam.RULE, in_default_grid=True),
    OptimizerInfo("asam", True, "Adaptive SAM (Kwon et al., ICML 2021): δ = ρ T²g/‖Tg‖", "ASAM", "#2ca02c",
                  asam.ASAM, asam.HPARAMS, asam.RULE, in_default_grid=True),
    OptimizerInfo("fsam", True, "Fisher SAM (Kim et al., ICML 2022; not Friendly SAM 'F-SAM', friendly_sam): "
                  "δ = ρ F⁻¹g/√(gᵀF⁻¹g)", "Fisher SAM", "#9467bd", fsam.FisherSAM, fsam.HPARAMS, fsam.RULE,
                  in_default_grid=True),
    OptimizerInfo("gsam", True, "GSAM (Zhuang et al., ICLR 2022): SAM's δ with ρ_t following the lr, base steps "
                  "with g_p − α g⊥", "GSAM", "#ff7f0e", gsam.GSAM, gsam.HPARAMS, gsam.RULE, local_perturbation=False,
                  check=_gsam_check),
    OptimizerInfo("friendly_sam", True, "Friendly SAM 'F-SAM' (Li et al., CVPR 2024; not Fisher SAM, fsam): "
                  "δ = ρ d/‖d‖, d = g − σ m, m ← λ m + (1 − λ) g", "Friendly SAM", "#17becf",
                  friendly_sam.FriendlySAM, friendly_sam.HPARAMS, friendly_sam.RULE, local_perturbation=False),
    OptimizerInfo("looksam", True, "LookSAM (Liu et al., CVPR 2022): SAM every k steps, its orthogonal component "
                  "g_v reused in between with one pass", "LookSAM", "#e377c2", looksam.LookSAM, looksam.HPARAMS,
                  looksam.RULE, local_perturbation=False,
                  passes=lambda hp, steps: looksam.looksam_passes(hp["k"], steps)),
    OptimizerInfo("lion", False, "Lion (Chen et al. 2023): sign(β1 m + (1 − β1) g) steps, decoupled weight decay",
                  "Lion", "#393b79", base=LION),
)}

BASE_OPTIMIZERS = tuple(n for n, i in OPTIMIZERS.items() if i.base is not None)
BASE_CLASSES: Mapping[str, type[Optimizer]] = MappingProxyType({n: OPTIMIZERS[n].base.cls for n in BASE_OPTIMIZERS})
DEFAULT_BASE = next(n for n, cls in BASE_CLASSES.items() if cls is DEFAULT_BASE_CLASS)
TWO_PASS_METHODS = tuple(n for n, i in OPTIMIZERS.items() if i.two_pass)  # the SAM family, in registry order
DEFAULT_GRID = tuple(n for n, i in OPTIMIZERS.items() if i.in_default_grid)

# The SAM family's config keys before the registry carried them, in their config order: they stay in every config
# hash even when unset (null), so runs trained before keep their hash; keys added since leave it while unset.
HASHED_WHEN_UNSET = ("rho", "eta", "alpha", "metric_beta", "norm_scope")


def _method_hparams() -> tuple[str, ...]:
    seen = list(HASHED_WHEN_UNSET)
    for info in OPTIMIZERS.values():
        seen += [h.name for h in info.hparams if h.name not in seen]
    return tuple(seen)


METHOD_HPARAMS = _method_hparams()  # every method hyper-parameter: the training config's keys, in their order
# The method hyper-parameters a study grid can sweep besides lr and ρ (grid.method_axes), in the fixed order that
# run keys, configuration keys and table columns use.
METHOD_AXES = tuple(n for n in METHOD_HPARAMS if any(h.axis for i in OPTIMIZERS.values() for h in i.hparams
                                                     if h.name == n))


def hparam_spec(name: str) -> Hparam:
    """The first declaration of method hyper-parameter ``name`` (its symbol and kind are the same everywhere)."""
    return next(h for i in OPTIMIZERS.values() for h in i.hparams if h.name == name)


AXIS_SYMBOLS: Mapping[str, str] = MappingProxyType({n: hparam_spec(n).symbol for n in METHOD_AXES})


def optimizer_info(name: str) -> OptimizerInfo:
    """The registry entry for ``name``; ValueError listing the valid names otherwise."""
    try:
        return OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def default_hparams(name: str) -> dict[str, Any]:
    """The defaults ``create_optimizer(name, ...)`` uses for the method's own hyper-parameters and ``base`` ({} for
    the base optimizers)."""
    return dict(optimizer_info(name).defaults)


def resolve_hparams(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Method ``name`` 's hyper-parameters: ``given`` (None: the default) checked against its ranges, the rest at
    their defaults. ValueError for one it does not have, a value out of range, or a failed cross-check."""
    info = optimizer_info(name)
    unknown = sorted(k for k, v in given.items() if v is not None and info.hparam(k) is None)
    if unknown:
        raise ValueError(f"{', '.join(unknown)} {'is not a parameter' if len(unknown) == 1 else 'are not parameters'}"
                         f" of {name}")
    out = {h.name: h.check(given[h.name] if given.get(h.name) is not None else h.default, name) for h in info.hparams}
    if info.check is not None:
        info.check(out)
    return out


# What the base optimizers take besides lr, with the values an omitted one takes (None: the base's own betas).
BASE_HPARAMS: Mapping[str, Any] = MappingProxyType({"weight_decay": 0.0, "momentum": 0.0, "betas": None,
                                                    "eps": 1e-8})


def base_betas(base: str, betas: Iterable[float] | None) -> tuple[float, float]:
    """``betas`` if given, else the base optimizer's own (Adam's (0.9, 0.999), Lion's (0.9, 0.99); SGD has none
    and reads as Adam's)."""
    if betas is not None:
        return tuple(betas)  # type: ignore[return-value]
    return OPTIMIZERS[base].base.betas or ADAM_BETAS


def _base(name: str, lr: float, given: Mapping[str, Any]) -> tuple[type[Optimizer], dict[str, Any]]:
    """The base optimizer class ``name`` and its keyword arguments from the ``BASE_HPARAMS`` in ``given``."""
    if name not in BASE_CLASSES:
        raise ValueError(f"unknown base optimizer {name!r}; choose one of {', '.join(BASE_OPTIMIZERS)}")
    info = OPTIMIZERS[name].base
    hp = {k: given[k] if given.get(k) is not None else v for k, v in BASE_HPARAMS.items()}
    hp["betas"] = base_betas(name, given.get("betas"))
    return info.cls, dict(lr=lr, **{k: hp[k] for k in info.knobs})


def create_optimizer(name: str, params: Iterable[Any], *, lr: float, base: str | None = None,
                     max_grad_norm: float | None = None, **hparams: Any) -> Optimizer:
    """Build a registered optimizer. ``hparams``: the base optimizer's (``BASE_HPARAMS``: weight_decay, momentum,
    betas, eps) and the SAM family's own (whichever ``default_hparams(name)`` lists). ``base``/``max_grad_norm``
    and the method hyper-parameters belong to the SAM family; the base optimizers ignore them, so one set of
    arguments builds every entry.

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
    unknown = sorted(k for k, v in method.items() if v is not None and info.hparam(k) is None)
    if unknown:
        raise ValueError(f"{', '.join(unknown)} {'is not a parameter' if len(unknown) == 1 else 'are not parameters'}"
                         f" of {name}")
    cls, kwargs = _base(base if base is not None else DEFAULT_BASE, lr, hparams)
    own = {h.name: method[h.name] if method.get(h.name) is not None else h.default for h in info.hparams}
    return info.sam_class(params, cls, max_grad_norm=max_grad_norm, **own, **kwargs)


def forward_backward_passes(name: str, hparams: Mapping[str, Any], steps: int) -> int:
    """The forward/backward passes a run of ``steps`` steps takes (the study's plan counts them)."""
    return optimizer_info(name).forward_backward_passes(hparams, steps)
