"""Sharpness measures on quadratics 0.5 θᵀAθ with known A (closed forms) and on a real head."""
import math

import numpy as np
import pytest
import torch

from align.train.heads import HeadConfig, build_model
from align.train.losses import LossConfig, clip_loss
from align.metrics.sharpness import hessian_top_eigenvalue, hessian_trace, worst_case_sharpness


def quadratic(a: np.ndarray, theta: np.ndarray, split: int):
    """Loss closure over two parameter tensors (θ split at ``split``) for 0.5 θᵀAθ, float64."""
    mat = torch.from_numpy(a)
    p1 = torch.tensor(theta[:split], requires_grad=True)
    p2 = torch.tensor(theta[split:], requires_grad=True)

    def loss():
        t = torch.cat([p1, p2])
        return 0.5 * t @ mat @ t

    return loss, [p1, p2]


def spd(eigs, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


def test_top_eigenvalue_equals_max_eig():
    a = spd([6.0, 3.0, 1.0, 0.5, -0.2], seed=0)
    loss, params = quadratic(a, np.ones(5), split=2)
    assert hessian_top_eigenvalue(loss, params, iters=20) == pytest.approx(np.linalg.eigvalsh(a).max(), rel=1e-8)


def test_trace_exact_for_diagonal_hessian():
    a = np.diag([4.0, -1.0, 0.25, 7.0])
    loss, params = quadratic(a, np.zeros(4), split=3)
    assert hessian_trace(loss, params, samples=3) == pytest.approx(np.trace(a), abs=1e-12)


def test_trace_within_hutchinson_tolerance():
    a = spd([5.0, 2.0, 1.0, 1.0, 0.5, 0.1], seed=1)
    loss, params = quadratic(a, np.zeros(6), split=1)
    samples = 400
    # Rademacher probes: Var(zᵀAz) = 2 Σ_{i≠j} A_ij²; allow five standard errors.
    sd = math.sqrt(2 * (np.sum(a ** 2) - np.sum(np.diag(a) ** 2)) / samples)
    assert abs(hessian_trace(loss, params, samples=samples, seed=3) - np.trace(a)) < 5 * sd


def test_first_order_worst_case_closed_form_and_restore():
    a = spd([3.0, 1.0, 0.2], seed=2)
    theta = np.array([0.5, -1.0, 2.0])
    loss, params = quadratic(a, theta, split=1)
    rho = 0.3
    out = worst_case_sharpness(loss, params, rho)
    g = a @ theta
    n = np.linalg.norm(g)
    assert out["grad_norm"] == pytest.approx(n, rel=1e-12)
    assert out["loss"] == pytest.approx(0.5 * theta @ a @ theta, rel=1e-12)
    assert out["first_order"] == pytest.approx(rho * n + 0.5 * rho ** 2 * g @ a @ g / n ** 2, rel=1e-10)
    assert out["ascent"] == out["first_order"]
    assert np.array_equal(torch.cat([p.detach() for p in params]).numpy(), theta)  # restored exactly


def test_ascent_reaches_the_worst_case_on_the_sphere():
    a = np.diag([4.0, 0.5])
    theta = np.array([0.05, 1.0])  # gradient points mostly along the flat direction
    loss, params = quadratic(a, theta, split=1)
    rho = 0.8
    out = worst_case_sharpness(loss, params, rho, ascent_steps=60, step_size=0.1)
    # Brute force: a convex function's maximum over the ball lies on the sphere.
    ang = np.linspace(0, 2 * np.pi, 200001)
    pts = theta[None, :] + rho * np.stack([np.cos(ang), np.sin(ang)], 1)
    best = (0.5 * np.einsum("ni,ij,nj->n", pts, a, pts)).max() - 0.5 * theta @ a @ theta
    assert out["first_order"] < best - 0.1  # the first-order point is far from the worst case here
    assert out["ascent"] == pytest.approx(best, abs=1e-4)
    assert out["ascent_radius"] <= rho + 1e-12
    assert np.array_equal(torch.cat([p.detach() for p in params]).numpy(), theta)


def test_runs_on_a_head_and_restores_it():
    torch.manual_seed(0)
    model = build_model(HeadConfig(out_dim=4), LossConfig(), 6, 5)
    x, y = torch.randn(16, 6), torch.randn(16, 5)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]

    def loss():
        return clip_loss(**model(x, y))

    out = worst_case_sharpness(loss, params, 0.05, ascent_steps=3)
    assert out["ascent"] >= out["first_order"] > 0
    top = hessian_top_eigenvalue(loss, params, iters=10)
    tr = hessian_trace(loss, params, samples=4)
    assert math.isfinite(top) and math.isfinite(tr)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
