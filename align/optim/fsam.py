"""Fisher SAM (Kim et al., ICML 2022), diagonal Fisher F = g²: δ = ρ F⁻¹g / √(gᵀF⁻¹g), F⁻¹ = 1/(1 + η g²) — the
``torch.optim`` class and its stacked-heads rule.

FSAM here is Fisher SAM, not Friendly SAM (F-SAM, Li et al. 2024: ``align.optim.friendly_sam``).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from align.optim.hparams import Hparam
from align.optim.stacked import BatchedRule, FirstStep, col, global_norm, scaled
from align.optim.two_pass import (
    DEFAULT_BASE_CLASS,
    RHO_DOC,
    SharpnessAware,
    norm_of,
    usable_norm,
)

RHO = Hparam("rho", "ρ", 0.05, RHO_DOC + " in the Fisher metric", low=0.0, axis=False)
ETA = Hparam("eta", "η", 1.0, "F⁻¹ = 1/(1 + η g²): how strongly the squared gradient shrinks δ", low=0.0)
HPARAMS = (RHO, ETA)


class FisherSAM(SharpnessAware):
    """Fisher SAM (Kim et al., 2022), diagonal Fisher F = g²: δ = ρ F⁻¹g / √(gᵀF⁻¹g), F⁻¹ = 1/(1 + η g²).

    η is kept per param group (like ρ).
    """

    group_hparams = (ETA,)

    def __init__(self, params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer = DEFAULT_BASE_CLASS,
                 rho: float = RHO.default, eta: float = ETA.default, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, eta=eta, **kwargs)

    def _perturbation(self, params, grads, groups, grad_norm):
        denom = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(denom, [g["eta"] for g in groups])
        torch._foreach_add_(denom, 1.0)                       # 1 + η g²  (= 1 / F⁻¹)
        f_inv_g = torch._foreach_div(grads, denom)            # F⁻¹ g
        nv = norm_of(torch._foreach_div(grads, torch._foreach_sqrt(denom))).item()  # √(gᵀF⁻¹g)
        scale = [g["rho"] / nv for g in groups] if usable_norm(nv) else [0.0] * len(groups)
        torch._foreach_mul_(f_inv_g, scale)
        return f_inv_g, nv


def _batched_first_step(s: FirstStep):
    """Fisher SAM for stacked heads: δ = ρ F⁻¹g / √(gᵀF⁻¹g), F⁻¹ = 1 / (1 + η g²)."""
    g, pert, hp = s.grads, s.pert, s.hp
    denom = {k: g[k] * g[k] * col(hp.eta, g[k]) + 1.0 for k in pert}
    f_inv_g = {k: g[k] / denom[k] for k in pert}
    nv = global_norm([g[k] / denom[k].sqrt() for k in pert])
    return scaled(f_inv_g, pert, hp.rho / nv.double()), nv


RULE = BatchedRule(_batched_first_step)
