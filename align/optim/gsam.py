"""GSAM, surrogate-gap guided SAM (Zhuang et al., ICLR 2022) — the ``torch.optim`` class and its stacked-heads rule.

    δ = ρ_t g / ‖g‖ (SAM's),  g_p = ∇ℓ(θ + δ),  g⊥ = g − (⟨g, g_p⟩/‖g_p‖²) g_p,  the base steps with g_p − α g⊥

g⊥ is the component of the first gradient orthogonal to g_p: descending g_p − α g⊥ lowers the perturbed loss and
ascends the surrogate gap's complement. ρ_t follows the learning rate between ρ (= ρ_max, at the peak lr) and
ρ_min (at lr 0), as the paper and pytorch_optimizer's ``ProportionScheduler`` with min_lr 0:
ρ_t = ρ_min + (ρ − ρ_min) · lr_t / lr_max. α = 0 with ρ_min = ρ is SAM bit for bit.

The class takes lr_max from each param group's ``initial_lr`` (what torch's LR schedulers record as the base lr),
else its lr (no scheduler: ρ_t = ρ). g and g⊥ cover the tensors of the norm scope; the others step with g_p.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from align.optim.hparams import Hparam
from align.optim.sam import HPARAMS as SAM_HPARAMS
from align.optim.sam import SAM
from align.optim.stacked import (
    BatchedRule,
    Descent,
    FirstStep,
    Params,
    col,
    dot,
    global_norm,
    scaled,
    usable,
    where_heads,
)
from align.optim.two_pass import DEFAULT_BASE_CLASS, dot_of, norm_of, usable_norm

ALPHA = Hparam("alpha", "α", 0.4, "weight of the ascent along g⊥, the first gradient's part orthogonal to g_p",
               low=0.0, high=1.0)
RHO_MIN = Hparam("rho_min", "ρ_min", 0.0, "ρ at learning rate 0; ρ (= ρ_max) is reached at the peak lr",
                 low=0.0, axis=False)
HPARAMS = (*SAM_HPARAMS, ALPHA, RHO_MIN)


def check_radii(rho: float, rho_min: float) -> None:
    """ρ_min ≤ ρ: ρ_t runs from ρ_min at lr 0 up to ρ at the peak lr."""
    if rho_min > rho:
        raise ValueError(f"gsam: rho_min ({rho_min:g}) must not exceed rho ({rho:g}), the radius at the peak lr")


class GSAM(SAM):
    """GSAM: SAM's perturbation with ρ_t scheduled by the lr, then the base optimizer steps with g_p − α g⊥."""

    def __init__(self, params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer = DEFAULT_BASE_CLASS,
                 *args: Any, alpha: float = ALPHA.default, rho_min: float = RHO_MIN.default, **kwargs: Any) -> None:
        self.alpha, self.rho_min = ALPHA.check(alpha), RHO_MIN.check(rho_min)
        self._first: list[tuple[Tensor, Tensor]] = []
        super().__init__(params, base_optimizer, *args, **kwargs)
        for group in self.param_groups:
            check_radii(group["rho"], self.rho_min)

    def _radius(self, group: dict) -> float:
        peak = group.get("initial_lr", group["lr"])
        ratio = group["lr"] / peak if peak > 0 else 1.0
        return self.rho_min + (group["rho"] - self.rho_min) * ratio

    def _remember_first(self, params: list[Tensor], grads: list[Tensor]) -> None:
        scope = list(zip(params, grads)) + [(p, p.grad) for p in self._norm_only_params()]
        self._first = [(p, g.detach().clone()) for p, g in scope] if self.alpha != 0.0 else []

    def _descent_(self) -> None:
        pairs = [(p, g) for p, g in self._first if p.grad is not None]
        self._first = []
        if not pairs:
            return
        g_p = [p.grad for p, _ in pairs]
        g = [first for _, first in pairs]
        squared = norm_of(g_p).item() ** 2
        if not usable_norm(squared):
            return
        c = dot_of(g, g_p).item() / squared
        perpendicular = torch._foreach_add(g, g_p, alpha=-c)  # g⊥ = g − (⟨g, g_p⟩/‖g_p‖²) g_p
        torch._foreach_add_(g_p, perpendicular, alpha=-self.alpha)


def _batched_first_step(s: FirstStep) -> tuple[Params, Tensor]:
    """GSAM for stacked heads: SAM's δ with ρ_t = ρ_min + (ρ − ρ_min) · lr_t / lr_max."""
    rho = s.hp.rho if s.lr_ratio is None else s.hp.rho_min + (s.hp.rho - s.hp.rho_min) * s.lr_ratio
    return scaled(s.grads, s.pert, rho / s.grad_norm.double()), s.grad_norm


def _batched_descent(d: Descent) -> Params:
    """g_p − α g⊥ for the heads that took the second pass, over each head's norm scope."""
    in_scope = d.hp.norm_scope != 0
    names = d.pert + d.extra

    def scope(t: Params, k: str) -> Tensor:
        return t[k] if k in d.pert else where_heads(in_scope, t[k], torch.zeros_like(t[k]))

    g = {k: scope(d.first, k) for k in names}
    g_p = {k: scope(d.grads, k) for k in names}
    squared = global_norm([g_p[k] for k in names]).double() ** 2
    c = dot([g[k] for k in names], [g_p[k] for k in names]).double() / torch.where(squared > 0, squared,
                                                                                    torch.ones_like(squared))
    ok = d.second & d.active & (d.hp.alpha != 0) & usable(squared) & torch.isfinite(c)
    out = dict(d.grads)
    for k in names:
        perpendicular = g[k] + col(-c, g[k]) * g_p[k]
        changed = ok if k in d.pert else ok & in_scope
        out[k] = where_heads(changed, g_p[k] + col(-d.hp.alpha, g_p[k]) * perpendicular, d.grads[k])
    return out


RULE = BatchedRule(_batched_first_step, descent=_batched_descent)
