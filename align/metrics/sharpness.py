"""Sharpness of a loss at given parameters: worst case within a radius, top Hessian eigenvalue, Hessian trace.

Pure: each function takes ``loss_fn`` (a closure that recomputes the scalar loss from the current values of
``params``) and the list of parameter tensors (requires_grad=True). Parameters are restored exactly (copied
back) before returning; no optimizer state is touched.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor

LossFn = Callable[[], Tensor]


def worst_case_sharpness(loss_fn: LossFn, params: Sequence[Tensor], rho: float, ascent_steps: int = 0,
                         step_size: float | None = None) -> dict[str, float]:
    """Max loss increase within ‖δ‖ ≤ ρ: first-order (δ = ρ g/‖g‖) and, if ascent_steps > 0, projected ascent.

    Returns {loss, grad_norm, first_order, ascent (= first_order when ascent_steps = 0), ascent_radius}.
    """
    raise NotImplementedError


def hessian_top_eigenvalue(loss_fn: LossFn, params: Sequence[Tensor], iters: int = 20, seed: int = 0) -> float:
    """Largest-magnitude Hessian eigenvalue by power iteration on Hessian-vector products."""
    raise NotImplementedError


def hessian_trace(loss_fn: LossFn, params: Sequence[Tensor], samples: int = 32, seed: int = 0) -> float:
    """Hutchinson estimate of tr(H) with Rademacher probes: mean of zᵀHz."""
    raise NotImplementedError
