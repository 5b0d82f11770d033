"""ASAM, Adaptive SAM (Kwon et al., ICML 2021): δ = ρ T² g / ‖T g‖ with T = |θ| + η on weight tensors — the
``torch.optim`` class and its stacked-heads rule.

Following the ASAM code, T acts on weight tensors (ndim > 1) only; biases and norm scales use T = I. ρ lives on the
|θ|-scaled coordinates, so its usual range is about ten times SAM's (the paper's ρ = 0.5, η = 0.01).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from align.optim.hparams import Hparam
from align.optim.stacked import BatchedRule, FirstStep, Params, col, global_norm, scaled
from align.optim.two_pass import (
    DEFAULT_BASE_CLASS,
    RHO_DOC,
    SharpnessAware,
    norm_of,
    usable_norm,
)

RHO = Hparam("rho", "ρ", 0.5, RHO_DOC + " in |θ|-scaled coordinates", low=0.0, axis=False)
ETA = Hparam("eta", "η", 0.01, "T = |θ| + η: the floor of the weight scaling", low=0.0)
HPARAMS = (RHO, ETA)


class ASAM(SharpnessAware):
    """Adaptive SAM (Kwon et al., 2021): δ = ρ T² g / ‖T g‖ with T = |θ| + η on weight tensors, T = 1 elsewhere.

    η is kept per param group (like ρ).
    """

    group_hparams = (ETA,)

    def __init__(self, params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer = DEFAULT_BASE_CLASS,
                 rho: float = RHO.default, eta: float = ETA.default, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, eta=eta, **kwargs)

    def _perturbation(self, params, grads, groups, grad_norm):
        t = [p.detach().abs().add_(g["eta"]) if p.ndim > 1 else None for p, g in zip(params, groups)]
        w_idx = [i for i, ti in enumerate(t) if ti is not None]
        tg = list(grads)
        if w_idx:
            scaled_w = torch._foreach_mul([grads[i] for i in w_idx], [t[i] for i in w_idx])
            for i, s in zip(w_idx, scaled_w):
                tg[i] = s
        nv = norm_of(tg).item()
        # T (T g) for weights, g for the rest; then × ρ / ‖T g‖ per tensor.
        direction = list(tg)
        if w_idx:
            twice = torch._foreach_mul([tg[i] for i in w_idx], [t[i] for i in w_idx])
            for i, s in zip(w_idx, twice):
                direction[i] = s
        scale = [g["rho"] / nv for g in groups] if usable_norm(nv) else [0.0] * len(groups)
        return torch._foreach_mul(direction, scale), nv


def _batched_first_step(s: FirstStep):
    """ASAM for stacked heads: δ = ρ T² g / ‖T g‖ with T = |θ| + η on weight tensors, T = 1 elsewhere."""
    params, g, pert, hp = s.params, s.grads, s.pert, s.hp
    t = {k: params[k].detach().abs() + col(hp.eta, params[k]) for k in pert if params[k].ndim > 2}  # [K, ...]
    tg = {k: g[k] * t[k] if k in t else g[k] for k in pert}
    nv = global_norm([tg[k] for k in pert])
    direction: Params = {k: tg[k] * t[k] if k in t else tg[k] for k in pert}
    return scaled(direction, pert, hp.rho / nv.double()), nv


RULE = BatchedRule(_batched_first_step)
