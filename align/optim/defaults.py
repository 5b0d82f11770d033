"""Default hyper-parameters of the SAM family: the one place the classes and the registry read them from.

ρ = 0.05 is SAM's radius (Foret et al.); ASAM's ρ lives on another scale (the perturbation is measured relative
to |θ|), so it takes the ASAM paper's 0.5 with η = 0.01. Fisher SAM's η = 1.0. The base optimizer defaults to
AdamW, as in the training configs; the toy experiments pass SGD explicitly.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch.optim import Optimizer

BASE_CLASSES: Mapping[str, type[Optimizer]] = MappingProxyType(
    {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW})
DEFAULT_BASE = "adamw"
DEFAULT_BASE_CLASS = BASE_CLASSES[DEFAULT_BASE]

SAM_DEFAULTS: Mapping[str, Any] = MappingProxyType({"rho": 0.05, "base": DEFAULT_BASE, "norm_scope": "perturbed"})
# M-SAM's research knobs: α = 1 is the paper's Monge metric (α = 0 is SAM), β = 0 the metric of the current gradient.
MSAM_DEFAULTS: Mapping[str, Any] = MappingProxyType({**SAM_DEFAULTS, "alpha": 1.0, "metric_beta": 0.0})
ASAM_DEFAULTS: Mapping[str, Any] = MappingProxyType({"rho": 0.5, "eta": 0.01, "base": DEFAULT_BASE})
FSAM_DEFAULTS: Mapping[str, Any] = MappingProxyType({"rho": 0.05, "eta": 1.0, "base": DEFAULT_BASE})
