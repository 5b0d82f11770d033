"""SAM (Foret et al., ICLR 2021): δ = ρ g / ‖g‖ — the ``torch.optim`` class and its stacked-heads rule.

``SAM`` is the two-pass machinery of ``align.optim.two_pass`` with SAM's perturbation; ``_batched_first_step`` is the
same δ for K stacked heads (``align.optim.stacked``), each head with its own ρ and its own global norm.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from align.optim.hparams import Hparam
from align.optim.stacked import BatchedRule, FirstStep, Params, scaled
from align.optim.two_pass import (
    DEFAULT_BASE_CLASS,
    RHO_DOC,
    SharpnessAware,
    usable_norm,
)

RHO = Hparam("rho", "ρ", 0.05, RHO_DOC, low=0.0, axis=False)
NORM_SCOPE = Hparam("norm_scope", "scope", "perturbed",
                    "which gradients make up ‖g‖, the norm that sets the radius: the perturbed tensors, or all "
                    "trainable ones (the logit scale counts, still unperturbed)",
                    choices=("perturbed", "all_trainable"), axis=False)
HPARAMS = (RHO, NORM_SCOPE)
ALL_TRAINABLE = NORM_SCOPE.choices.index("all_trainable")  # its code in the stacked heads' hyper-parameters


class SAM(SharpnessAware):
    """Sharpness-Aware Minimization (Foret et al., 2021) wrapped around any base optimizer: δ = ρ g/‖g‖.

    ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)``; see ``SharpnessAware`` for the arguments.
    """

    takes_norm_scope = True

    def __init__(self, params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer = DEFAULT_BASE_CLASS,
                 rho: float = RHO.default, max_grad_norm: float | None = None,
                 norm_scope: str = NORM_SCOPE.default, **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, max_grad_norm=max_grad_norm, norm_scope=norm_scope,
                         **base_kwargs)

    def _radius(self, group: dict) -> float:
        """ρ of a param group at this step (GSAM schedules it)."""
        return group["rho"]

    def _perturbation(self, params: list[Tensor], grads: list[Tensor], groups: list[dict],
                      grad_norm: float) -> tuple[list[Tensor], float]:
        scale = [self._radius(g) / grad_norm for g in groups] if usable_norm(grad_norm) else [0.0] * len(groups)
        return torch._foreach_mul(grads, scale), grad_norm


def _batched_first_step(s: FirstStep) -> tuple[Params, Tensor]:
    """SAM for stacked heads: δ = ρ g / ‖g‖, each head's n over its norm scope."""
    return scaled(s.grads, s.pert, s.hp.rho / s.grad_norm.double()), s.grad_norm


RULE = BatchedRule(_batched_first_step)
