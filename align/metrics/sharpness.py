"""Sharpness of a loss at given parameters: worst case within a radius (Euclidean, adaptive or Monge ball), top
Hessian eigenvalue, Hessian trace.

Pure: each function takes ``loss_fn`` (a closure that recomputes the scalar loss from the current values of
``params``; it must not step an optimizer) and the list of parameter tensors (requires_grad=True). The
parameters are restored exactly (copied back, not subtracted) before returning. The radius ρ is over all given
parameters together, as in SAM (Euclidean unless a worst case's geometry says otherwise); use the same loss
reduction as in training (M-SAM's radius and every sharpness number depend on the loss's scale).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from align.common.errors import AlignError

LossClosure = Callable[[], Tensor]  # recomputes the scalar loss at the current params (no backward)


def _params(params: Sequence[Tensor]) -> list[Tensor]:
    ps = list(params)
    if not ps:
        raise AlignError("sharpness needs at least one parameter tensor")
    if not all(p.requires_grad for p in ps):
        raise AlignError("sharpness parameters must have requires_grad=True")
    return ps


def _grad(loss_fn: LossClosure, params: list[Tensor]) -> tuple[float, list[Tensor]]:
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(loss.detach()), [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def _norm(vs: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in vs))


@torch.no_grad()
def _set(params: list[Tensor], base: list[Tensor], delta: list[Tensor]) -> None:
    for p, b, d in zip(params, base, delta):
        p.copy_(b + d)


GEOMETRIES = ("euclidean", "adaptive", "monge")  # the balls worst_case_sharpness searches (its docstring)


def _coordinates(geometry: str, base: list[Tensor], g: list[Tensor]) -> Callable[[list[Tensor]], list[Tensor]]:
    """The linear map A taking ball coordinates u (‖u‖ ≤ ρ) to the perturbation δ = A u of ``geometry``.

    A is symmetric, so the gradient of L(θ + A u) with respect to u is A ∇L. adaptive: A = diag(|θ|) (ASAM with
    η = 0: the ball ‖δ / |θ|‖ ≤ ρ); monge: A = G^(-1/2) with G = I + g gᵀ, g the gradient at θ
    (G^(-1/2) = I + (1/√(1+‖g‖²) − 1) ĝ ĝᵀ: the ellipsoid δᵀGδ ≤ ρ²)."""
    if geometry == "euclidean":
        return lambda vs: vs
    if geometry == "adaptive":
        scales = [b.abs() for b in base]
        return lambda vs: [t * v for t, v in zip(scales, vs)]
    gnorm = _norm(g)
    unit = [gi / gnorm for gi in g]
    shrink = 1.0 / math.sqrt(1.0 + gnorm * gnorm) - 1.0

    def monge(vs: list[Tensor]) -> list[Tensor]:
        along = sum(float((ui.double() * v.double()).sum()) for ui, v in zip(unit, vs))
        return [v + (shrink * along) * ui for v, ui in zip(vs, unit)]

    return monge


def worst_case_sharpness(loss_fn: LossClosure, params: Sequence[Tensor], rho: float, ascent_steps: int = 0,
                         step_size: float | None = None, geometry: str = "euclidean") -> dict[str, float]:
    """Max loss increase within a ball of radius ρ: first-order and, if ascent_steps > 0, projected ascent.

    ``geometry`` picks the ball: "euclidean" ‖δ‖ ≤ ρ (SAM's); "adaptive" ‖δ / |θ|‖ ≤ ρ (ASAM's with η = 0, |θ|
    elementwise over every given parameter, biases included: unchanged by rescalings θ → Dθ with D diagonal and
    positive that leave the loss unchanged, such as Dinh's W1 → c W1, b1 → c b1, W2 → W2/c); "monge" δᵀGδ ≤ ρ² with
    M-SAM's metric G = I + g gᵀ at θ. The search runs in ball coordinates u, δ = A u (``_coordinates``): the
    first-order point is u = ρ A g / ‖A g‖; the ascent takes ``ascent_steps`` normalised-gradient steps in u of
    length ``step_size`` (default ρ / 2), each projected back onto ‖u‖ ≤ ρ; ``ascent`` is the largest increase seen
    (never below ``first_order``). Returns {loss, grad_norm (‖A g‖), first_order, ascent, ascent_radius (‖u‖)}.
    """
    ps = _params(params)
    if rho <= 0:
        raise AlignError(f"sharpness radius rho must be positive, got {rho}")
    if geometry not in GEOMETRIES:
        raise AlignError(f"sharpness geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    base = [p.detach().clone() for p in ps]
    try:
        loss0, g = _grad(loss_fn, ps)
        to_delta = _coordinates(geometry, base, g) if _norm(g) > 0 else (lambda vs: vs)
        g = to_delta(g)
        gnorm = _norm(g)
        out = {"loss": loss0, "grad_norm": gnorm, "first_order": 0.0, "ascent": 0.0, "ascent_radius": 0.0}
        if not math.isfinite(loss0) or not math.isfinite(gnorm) or gnorm == 0.0:
            return out  # a stationary (or broken) point: no ascent direction at first order
        u = [rho * gi / gnorm for gi in g]
        _set(ps, base, to_delta(u))
        with torch.no_grad():
            first = float(loss_fn()) - loss0
        out["first_order"] = out["ascent"] = first
        out["ascent_radius"] = rho
        eta = rho / 2 if step_size is None else step_size
        for _ in range(ascent_steps):
            loss_t, gt = _grad(loss_fn, ps)  # gradient at the current perturbed point
            if loss_t - loss0 > out["ascent"]:
                out["ascent"], out["ascent_radius"] = loss_t - loss0, _norm(u)
            gt = to_delta(gt)  # ... with respect to u
            gn = _norm(gt)
            if not math.isfinite(gn) or gn == 0.0:
                break
            u = [d + eta * gi / gn for d, gi in zip(u, gt)]
            un = _norm(u)
            if un > rho:
                u = [d * (rho / un) for d in u]
            _set(ps, base, to_delta(u))
        if ascent_steps > 0:
            with torch.no_grad():
                last = float(loss_fn()) - loss0
            if last > out["ascent"]:
                out["ascent"], out["ascent_radius"] = last, _norm(u)
        return out
    finally:
        _set(ps, base, [torch.zeros_like(b) for b in base])


def _hvp(loss_fn: LossClosure, params: list[Tensor], v: list[Tensor]) -> list[Tensor]:
    """Hessian-vector product H v by double back-propagation."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * vi).sum() for g, vi in zip(grads, v))
    hv = torch.autograd.grad(dot, params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def _random_like(params: list[Tensor], gen: torch.Generator, rademacher: bool) -> list[Tensor]:
    out = []
    for p in params:
        if rademacher:
            z = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int64).to(p.dtype) * 2 - 1
        else:
            z = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        out.append(z.to(p.device))
    return out


def hessian_top_eigenvalue(loss_fn: LossClosure, params: Sequence[Tensor], iters: int = 20, seed: int = 0) -> float:
    """Largest-magnitude Hessian eigenvalue by power iteration on Hessian-vector products (Rayleigh quotient).

    For a positive semi-definite Hessian (a minimum) this is the top eigenvalue; convergence is geometric in
    |λ₂/λ₁|, so ``iters`` bounds the accuracy.
    """
    ps = _params(params)
    gen = torch.Generator().manual_seed(seed)
    v = _random_like(ps, gen, rademacher=False)
    n = _norm(v)
    v = [x / n for x in v]
    eig = 0.0
    for _ in range(max(1, iters)):
        hv = _hvp(loss_fn, ps, v)
        eig = float(sum(float((h.double() * x.double()).sum()) for h, x in zip(hv, v)))  # vᵀHv, ‖v‖ = 1
        n = _norm(hv)
        if n == 0.0 or not math.isfinite(n):
            break
        v = [h / n for h in hv]
    return eig


def hessian_trace(loss_fn: LossClosure, params: Sequence[Tensor], samples: int = 32, seed: int = 0) -> float:
    """Hutchinson estimate of tr(H): mean of zᵀHz over Rademacher probes z (exact for a diagonal H)."""
    ps = _params(params)
    if samples < 1:
        raise AlignError(f"hessian_trace needs at least one sample, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(samples):
        z = _random_like(ps, gen, rademacher=True)
        hz = _hvp(loss_fn, ps, z)
        total += float(sum(float((h.double() * x.double()).sum()) for h, x in zip(hz, z)))
    return total / samples
