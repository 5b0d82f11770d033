"""M-SAM's research knobs (metric scale α, averaged metric β) and the norm scope, against independent solutions:
SLSQP on the constrained problem, explicit matrix inverses, hand closed forms and a copy of the paper's rule."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from align.optim import ASAM, MSAM, SAM, FisherSAM


def _flat(xs) -> np.ndarray:
    return np.concatenate([np.asarray(x).ravel() for x in xs])


def _solve_constrained(g: np.ndarray, G: np.ndarray, rho: float) -> np.ndarray:
    """max gᵀδ s.t. δᵀGδ ≤ ρ², numerically (SLSQP from a neutral start)."""
    res = minimize(lambda d: -g @ d, x0=np.full(g.size, 1e-3), jac=lambda d: -g,
                   constraints=[{"type": "ineq", "fun": lambda d: rho**2 - d @ G @ d, "jac": lambda d: -2 * G @ d}],
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    assert res.x @ G @ res.x <= rho**2 + 1e-7
    return res.x


def _params(shapes, seed=1):
    rng = np.random.default_rng(seed)
    return [torch.nn.Parameter(torch.tensor(rng.normal(size=s), dtype=torch.float64)) for s in shapes]


def _first_step_delta(opt, ps, grads) -> np.ndarray:
    """Set .grad, run first_step, read δ off the moved weights, restore θ (lr = 0 second step)."""
    for p, g in zip(ps, grads):
        p.grad = torch.tensor(g, dtype=p.dtype)
    before = [p.detach().clone() for p in ps]
    opt.first_step()
    delta = _flat([(p.detach() - b).numpy() for p, b in zip(ps, before)])
    opt.second_step(zero_grad=True)
    return delta


# --- the metric scale α ---------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,scale", [(0.3, 1.0), (2.5, 0.4), (0.7, 3.0)])
def test_alpha_closed_form_solves_the_scaled_monge_problem(alpha, scale):
    rng = np.random.default_rng(11)
    shapes = [(3, 2), (4,)]
    grads = [rng.normal(size=s) * scale for s in shapes]
    g, rho = _flat(grads), 0.6
    G = np.eye(g.size) + alpha**2 * np.outer(g, g)
    ps = _params(shapes)
    delta = _first_step_delta(MSAM(ps, torch.optim.SGD, rho=rho, lr=0.0, alpha=alpha), ps, grads)
    np.testing.assert_allclose(delta, _solve_constrained(g, G, rho), atol=1e-5)
    assert delta @ G @ delta == pytest.approx(rho**2, rel=1e-12)
    n = np.linalg.norm(g)
    assert np.linalg.norm(delta) == pytest.approx(rho / math.sqrt(1 + alpha**2 * n * n), rel=1e-12)


class _PaperMSAM(SAM):
    """The paper's M-SAM rule as it stood before α and β existed (an independent copy for bit-identity)."""

    def _perturbation(self, params, grads, groups, grad_norm):
        n = grad_norm
        ok = math.isfinite(n) and n > 0
        scale = [g["rho"] / (n * math.sqrt(1.0 + n * n)) for g in groups] if ok else [0.0] * len(groups)
        return torch._foreach_mul(grads, scale), n


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=gen), torch.randn(32, 1, generator=gen)


def _train(opt, model, steps, x, y):
    for _ in range(steps):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y).backward())


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.Adam, dict(lr=0.01))])
@pytest.mark.parametrize("reference,knobs", [(SAM, dict(alpha=0.0)), (_PaperMSAM, dict(alpha=1.0)),
                                             (_PaperMSAM, dict(metric_beta=0.0)), (_PaperMSAM, {})])
def test_alpha_zero_is_sam_and_alpha_one_beta_zero_is_the_paper_msam_bit_for_bit(base, kw, reference, knobs):
    x, y = _data()
    m1, m2 = _model(), _model()
    _train(reference(m1.parameters(), base, rho=0.3, **kw), m1, 6, x, y)
    _train(MSAM(m2.parameters(), base, rho=0.3, **knobs, **kw), m2, 6, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


# --- the averaged metric β ------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (1.0, 0.9), (2.0, 0.3)])
def test_averaged_metric_solves_the_constrained_problem_with_the_ema(alpha, beta):
    rng = np.random.default_rng(12)
    shapes = [(2, 3), (2,)]
    ps = _params(shapes)
    opt = MSAM(ps, torch.optim.SGD, rho=0.4, lr=0.0, alpha=alpha, metric_beta=beta)
    m = None
    for step in range(4):
        grads = [rng.normal(size=s) * (0.5 + step) for s in shapes]
        g = _flat(grads)
        m = g.copy() if m is None else beta * m + (1 - beta) * g  # the documented EMA, first step m = g
        delta = _first_step_delta(opt, ps, grads)
        G = np.eye(g.size) + alpha**2 * np.outer(m, m)
        np.testing.assert_allclose(delta, _solve_constrained(g, G, 0.4), atol=2e-5)
        assert delta @ G @ delta == pytest.approx(0.4**2, rel=1e-12)
        expected = 0.4 * np.linalg.solve(G, g) / math.sqrt(g @ np.linalg.solve(G, g))
        np.testing.assert_allclose(delta, expected, rtol=1e-11, atol=1e-14)
    cosine = delta @ g / (np.linalg.norm(delta) * np.linalg.norm(g))
    assert cosine < 1 - 1e-6  # no longer parallel to g
    np.testing.assert_allclose(_flat([t.numpy() for t in opt.state_dict()["sam"]["metric_ema"].values()]), m,
                               rtol=1e-13)


def test_averaged_metric_stays_accurate_when_g_is_parallel_to_a_large_m():
    # gᵀG⁻¹g ≈ n²/(1 + α²‖m‖²) ≪ n² here: a difference of large terms would lose it, the split into r ⊥ m does not.
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float32))
    opt = MSAM([p], torch.optim.SGD, rho=0.1, lr=0.0, alpha=1.0, metric_beta=0.5)
    g = np.array([300.0, -400.0, 1200.0])  # n = 1300
    delta = _first_step_delta(opt, [p], [g])  # m = g: the exact answer is M-SAM's ρ g / (n √(1 + n²))
    expected = 0.1 * g / (1300.0 * math.sqrt(1 + 1300.0**2))
    np.testing.assert_allclose(delta, expected, rtol=1e-5)


def test_resume_with_averaged_metric_is_bit_identical():
    x, y = _data()
    m1 = _model()
    kw = dict(rho=0.2, lr=0.05, momentum=0.9, alpha=1.5, metric_beta=0.8)
    o1 = MSAM(m1.parameters(), torch.optim.SGD, **kw)
    _train(o1, m1, 3, x, y)
    saved_model, saved_opt = copy.deepcopy(m1.state_dict()), copy.deepcopy(o1.state_dict())
    ema = saved_opt["sam"]["metric_ema"]
    assert sorted(ema) == [0, 1, 2, 3] and all(isinstance(t, torch.Tensor) for t in ema.values())

    m2 = _model(seed=7)
    m2.load_state_dict(saved_model)
    o2 = MSAM(m2.parameters(), torch.optim.SGD, **kw)
    o2.load_state_dict(saved_opt)
    _train(o1, m1, 4, x, y)
    _train(o2, m2, 4, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # without m the continuation differs: the state really carries it
    m3 = _model(seed=7)
    m3.load_state_dict(saved_model)
    o3 = MSAM(m3.parameters(), torch.optim.SGD, **kw)
    o3.load_state_dict({k: v for k, v in copy.deepcopy(saved_opt).items() if k != "sam"})
    _train(o3, m3, 4, x, y)
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))


@pytest.mark.parametrize("kw", [dict(alpha=-0.1), dict(alpha=math.nan), dict(alpha=math.inf), dict(metric_beta=1.0),
                                dict(metric_beta=-0.01), dict(metric_beta=math.nan)])
def test_invalid_knobs_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        MSAM([torch.nn.Parameter(torch.zeros(1))], torch.optim.SGD, lr=0.1, **kw)
