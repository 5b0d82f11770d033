"""Friendly SAM, F-SAM (Li et al., CVPR 2024) — the ``torch.optim`` class and its stacked-heads rule.

    m ← λ m + (1 − λ) g   (m₀ = 0),     d = g − σ m,     δ = ρ d / ‖d‖

m, an average of past gradients, estimates the full-batch gradient; taking σ m out of g leaves the batch's own
noise, along which F-SAM perturbs. σ = 0 is SAM bit for bit. Not Fisher SAM (``fsam``).

The paper updates m before d is formed and defines m by its recursion (m₀ = 0 here). The authors' code and
pytorch_optimizer's ``FriendlySAM`` instead form d from the previous m and start m at the first gradient (their
first step is SAM's); this file follows the paper, and tests/test_peer_oracles.py shows the difference.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from align.optim.hparams import Hparam
from align.optim.stacked import (
    BatchedRule,
    FirstStep,
    Params,
    col,
    global_norm,
    scaled,
    where_heads,
)
from align.optim.two_pass import (
    DEFAULT_BASE_CLASS,
    RHO_DOC,
    SharpnessAware,
    norm_of,
    tensors_by_index,
    tensors_to_index,
    usable_norm,
)

RHO = Hparam("rho", "ρ", 0.05, RHO_DOC, low=0.0, axis=False)
SIGMA = Hparam("sigma", "σ", 1.0, "how much of the gradient average m is taken out of g (0: SAM)", low=0.0)
LMBDA = Hparam("lmbda", "λ", 0.9, "decay of the gradient average m ← λ m + (1 − λ) g", low=0.0, high=1.0,
               high_open=True)
HPARAMS = (RHO, SIGMA, LMBDA)


class FriendlySAM(SharpnessAware):
    """Friendly SAM: δ = ρ d/‖d‖ with d = g − σ m, m ← λ m + (1 − λ) g.

    m covers the perturbed tensors, is updated by every first step with a finite gradient (a non-finite one neither
    perturbs nor enters m) and is saved in ``state_dict()["sam"]["momentum"]``, so a resumed run continues bit for
    bit. ‖d‖ is over the perturbed tensors (``norm_scope`` sets nothing here).
    """

    def __init__(self, params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer = DEFAULT_BASE_CLASS,
                 rho: float = RHO.default, sigma: float = SIGMA.default, lmbda: float = LMBDA.default,
                 **kwargs: Any) -> None:
        self.sigma, self.lmbda = SIGMA.check(sigma), LMBDA.check(lmbda)
        self._momentum: dict[Tensor, Tensor] = {}
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def _perturbation(self, params, grads, groups, grad_norm):
        if not math.isfinite(grad_norm):
            return [], grad_norm
        m = self._update_momentum(params, grads)
        d = grads if self.sigma == 0.0 else torch._foreach_add(grads, m, alpha=-self.sigma)
        nd = norm_of(d).item()
        scale = [g["rho"] / nd for g in groups] if usable_norm(nd) else [0.0] * len(groups)
        return torch._foreach_mul(d, scale), nd

    def _update_momentum(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """m ← λ m + (1 − λ) g for each tensor (m₀ = 0); returns m in the order of ``params``."""
        for p in params:
            if p not in self._momentum:
                self._momentum[p] = torch.zeros_like(p)
        ms = [self._momentum[p] for p in params]
        torch._foreach_mul_(ms, self.lmbda)
        torch._foreach_add_(ms, grads, alpha=1.0 - self.lmbda)
        return ms

    def _save_extra(self, sam: dict[str, Any]) -> None:
        if self._momentum:
            sam[RULE.state_key] = tensors_to_index(self, self._momentum)

    def _load_extra(self, sam: dict[str, Any]) -> None:
        self._momentum = tensors_by_index(self, sam.get(RULE.state_key, {}))


def _batched_first_step(s: FirstStep) -> tuple[Params, Tensor]:
    """Friendly SAM for stacked heads: m ← λ m + (1 − λ) g, d = g − σ m, δ = ρ d/‖d‖."""
    g, hp, state = s.grads, s.hp, s.state
    ok = s.mask & torch.isfinite(s.grad_norm)
    for k in s.pert:
        m = state.tensors[k]
        m.copy_(where_heads(ok, m * col(hp.lmbda, m) + col(1.0 - hp.lmbda, g[k]) * g[k], m))
    state.has |= ok
    d = {k: where_heads(hp.sigma != 0, g[k] - col(hp.sigma, g[k]) * state.tensors[k], g[k]) for k in s.pert}
    nd = global_norm([d[k] for k in s.pert])
    return scaled(d, s.pert, hp.rho / nd.double()), nd


RULE = BatchedRule(_batched_first_step, state_key="momentum")
