"""align.optim.step against closed forms on a diagonal quadratic ℓ(θ) = ½ Σ aᵢθᵢ² (gradient a ⊙ θ)."""
from __future__ import annotations

import math

import pytest
import torch

from align.optim import MSAM, SAM, create_optimizer
from align.optim.step import backward_closure, finish, first_pass, take_step

D = torch.float64
A = torch.tensor([[3.0, 0.5]], dtype=D)


def _quadratic(p: torch.Tensor) -> torch.Tensor:
    return 0.5 * (A * p * p).sum()


def _param(values: list[float]) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([values], dtype=D))


def _closure(*params: torch.nn.Parameter):
    # float64 end to end: backward_closure's float32 cast would round the loss, so the test's closure is exact.
    def closure() -> torch.Tensor:
        loss = sum(_quadratic(p) for p in params)
        loss.backward()
        return loss.detach()

    return closure


def _msam_update(theta: list[float], lr: float, rho: float, clip: float | None = None) -> list[float]:
    """θ − lr·g̃ with g̃ = a ⊙ (θ + δ), δ = ρ g / (‖g‖ √(1 + ‖g‖²)), g = a ⊙ θ; g̃ clipped to ``clip``."""
    a = A[0].tolist()
    g = [ai * ti for ai, ti in zip(a, theta)]
    n = math.hypot(*g)
    pert = [ti + rho * gi / (n * math.sqrt(1 + n * n)) for ti, gi in zip(theta, g)]
    g2 = [ai * pi for ai, pi in zip(a, pert)]
    scale = min(1.0, clip / (math.hypot(*g2) + 1e-6)) if clip is not None else 1.0  # torch's clip_grad_norm_ rule
    return [ti - lr * scale * gi for ti, gi in zip(theta, g2)]


def test_single_pass_step_returns_loss_and_norm_at_theta_and_clips_the_gradient():
    theta = [1.0, -2.0]
    p = _param(theta)
    opt = torch.optim.SGD([p], lr=0.1)
    loss, norm = take_step(opt, _closure(p), grad_clip=1.0)
    g = [3.0 * 1.0, 0.5 * -2.0]
    assert loss.ndim == 0 and norm.ndim == 0
    assert float(loss) == pytest.approx(0.5 * (3.0 * 1.0 + 0.5 * 4.0))
    assert float(norm) == pytest.approx(math.hypot(*g))
    clip = 1.0 / (math.hypot(*g) + 1e-6)
    expected = [t - 0.1 * clip * gi for t, gi in zip(theta, g)]
    torch.testing.assert_close(p.detach()[0], torch.tensor(expected, dtype=D))
    assert p.grad is None  # gradients are cleared after the step


@pytest.mark.parametrize("clip", [None, 0.5])
def test_two_pass_step_matches_the_msam_closed_form(clip):
    theta = [0.8, -1.5]
    p = _param(theta)
    opt = MSAM([p], torch.optim.SGD, rho=0.3, lr=0.05, max_grad_norm=clip)
    loss, norm = take_step(opt, _closure(p), grad_clip=clip)
    assert float(loss) == pytest.approx(0.5 * (3.0 * 0.64 + 0.5 * 2.25))
    assert float(norm) == pytest.approx(math.hypot(3.0 * 0.8, 0.5 * -1.5))
    torch.testing.assert_close(p.detach()[0], torch.tensor(_msam_update(theta, 0.05, 0.3, clip), dtype=D))


@pytest.mark.parametrize("name", ["adamw", "msam"])
def test_a_non_finite_loss_is_not_stepped_on(name):
    p = _param([1.0, 2.0])
    opt = create_optimizer(name, [p], lr=0.1)

    def closure() -> torch.Tensor:
        loss = _quadratic(p) * float("inf")
        loss.backward()
        return loss.detach()

    loss, norm = take_step(opt, closure)
    assert math.isinf(float(loss)) and not math.isfinite(float(norm))
    assert torch.equal(p.detach(), torch.tensor([[1.0, 2.0]], dtype=D))
    assert not opt.state  # no moments, no step count: the optimizer never ran
    assert getattr(opt, "skipped_steps", 0) == 0


def test_one_batched_closure_drives_independent_optimizers():
    """The toy's use: each run keeps its own ‖g‖, although one backward fills every gradient."""
    starts = [[0.8, -1.5], [-0.3, 2.0]]
    params = [_param(s) for s in starts]
    opts = [MSAM([p], torch.optim.SGD, rho=0.3, lr=0.05) for p in params]
    closure = _closure(*params)  # one forward + backward over every run
    for _ in range(2):
        first_pass(opts, closure)
        finish(opts, closure)
    for p, s in zip(params, starts):
        torch.testing.assert_close(p.detach()[0], torch.tensor(_msam_update(_msam_update(s, 0.05, 0.3), 0.05, 0.3),
                                                               dtype=D))


def test_backward_closure_returns_the_detached_float32_loss():
    p = _param([1.0, -2.0])
    loss = backward_closure(lambda: _quadratic(p))()
    assert loss.dtype == torch.float32 and not loss.requires_grad and float(loss) == pytest.approx(2.5)
    torch.testing.assert_close(p.grad, torch.tensor([[3.0, -1.0]], dtype=D))


def test_mixed_kinds_and_a_clip_the_sam_family_would_ignore_are_rejected():
    a, b = _param([1.0, 1.0]), _param([1.0, 1.0])
    sam, sgd = SAM([a], torch.optim.SGD, lr=0.1), torch.optim.SGD([b], lr=0.1)
    with pytest.raises(ValueError, match="one kind"):
        finish([sam, sgd], _closure(a, b))
    with pytest.raises(ValueError, match="max_grad_norm"):
        take_step(sam, _closure(a), grad_clip=1.0)
