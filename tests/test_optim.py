"""align.optim against independent references: closed forms, a numerical optimiser, numpy transcriptions."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from align.optim import ASAM, MSAM, OPTIMIZERS, SAM, FisherSAM, create_optimizer, default_hparams, optimizer_info
from align.optim.step import backward_closure, take_step


def _perturbation(opt_cls, grads: list[np.ndarray], params: list[np.ndarray] | None = None, **kw) -> list[np.ndarray]:
    """δ that ``opt_cls.first_step`` applies for the given gradients (read off the moved weights)."""
    params = params or [np.random.default_rng(1).normal(size=g.shape) for g in grads]
    ps = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in params]
    for p, g in zip(ps, grads):
        p.grad = torch.tensor(g, dtype=torch.float64)
    opt = opt_cls(ps, torch.optim.SGD, lr=0.1, **kw)
    before = [p.detach().clone() for p in ps]
    opt.first_step()
    return [(p.detach() - b).numpy() for p, b in zip(ps, before)]


def _flat(xs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([x.ravel() for x in xs])


def _max_inner_product_in_ellipsoid(g: np.ndarray, metric: np.ndarray, rho: float):
    """max gᵀδ  s.t.  δᵀ metric δ ≤ ρ², solved numerically (SLSQP) from a neutral start → scipy's result."""
    return minimize(lambda d: -g @ d, x0=np.full(g.size, 1e-3), jac=lambda d: -g,
                    constraints=[{"type": "ineq", "fun": lambda d: rho**2 - d @ metric @ d,
                                  "jac": lambda d: -2 * metric @ d}],
                    method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})


def _assert_solves_the_constrained_problem(delta: np.ndarray, g: np.ndarray, metric: np.ndarray, rho: float) -> None:
    """δ is the numerical optimum of max gᵀδ s.t. δᵀ metric δ ≤ ρ² (float64: to 1e-6 ρ), and no better point exists."""
    res = _max_inner_product_in_ellipsoid(g, metric, rho)
    # SLSQP may stop on "positive directional derivative" once at machine precision: judge it by its answer.
    assert res.x @ metric @ res.x <= rho**2 * (1 + 1e-9)
    np.testing.assert_allclose(delta, res.x, rtol=0, atol=1e-6 * rho)
    assert delta @ metric @ delta == pytest.approx(rho**2, rel=1e-12)  # on the boundary
    best = res.x * rho / math.sqrt(res.x @ metric @ res.x)  # the numerical answer moved onto the boundary: feasible
    assert g @ delta >= g @ best * (1 - 1e-12)  # no feasible point found does better than ours
    sam = rho * g / np.linalg.norm(g)
    assert np.linalg.norm(res.x - sam) > 1e-2 * rho  # the metric matters here: the optimum is not SAM's δ


# --- M-SAM: the closed form is the solution of the constrained problem -------------------------------

@pytest.mark.parametrize("seed,scale", [(0, 0.3), (1, 1.0), (2, 3.0), (3, 0.05)])
def test_msam_closed_form_solves_the_monge_constrained_problem(seed, scale):
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=(3, 2)) * scale, rng.normal(size=4) * scale]
    g = _flat(grads)
    rho = 0.7
    G = np.eye(g.size) + np.outer(g, g)
    res = _max_inner_product_in_ellipsoid(g, G, rho)
    # SLSQP may stop on "positive directional derivative" once at machine precision: judge it by its answer.
    assert res.x @ G @ res.x <= rho**2 + 1e-7
    delta = _flat(_perturbation(MSAM, grads, rho=rho))
    np.testing.assert_allclose(delta, res.x, atol=1e-5)
    assert g @ delta >= g @ res.x - 1e-9  # no feasible point does better than the closed form
    assert delta @ G @ delta == pytest.approx(rho**2, rel=1e-12)
    n = np.linalg.norm(g)
    assert np.linalg.norm(delta) == pytest.approx(rho / math.sqrt(1 + n * n), rel=1e-12)


def test_msam_limits_small_gradient_is_sam_large_gradient_is_no_perturbation():
    rng = np.random.default_rng(4)
    direction = [rng.normal(size=(4, 3)), rng.normal(size=3)]
    rho = 0.5
    tiny = [d * 1e-7 for d in direction]
    np.testing.assert_allclose(_flat(_perturbation(MSAM, tiny, rho=rho)), _flat(_perturbation(SAM, tiny, rho=rho)),
                               rtol=1e-9)
    huge = [d * 1e6 for d in direction]
    assert np.linalg.norm(_flat(_perturbation(MSAM, huge, rho=rho))) < rho * 1e-5
    # SAM's radius does not depend on the gradient's size.
    assert np.linalg.norm(_flat(_perturbation(SAM, huge, rho=rho))) == pytest.approx(rho)


def test_one_group_norm_over_all_groups_and_per_group_rho():
    rng = np.random.default_rng(5)
    g1, g2 = rng.normal(size=3), rng.normal(size=2)
    p1 = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p1.grad, p2.grad = torch.tensor(g1), torch.tensor(g2)
    opt = SAM([{"params": [p1], "rho": 0.1}, {"params": [p2], "rho": 0.4}], torch.optim.SGD, lr=0.1)
    opt.first_step()
    n = math.sqrt(g1 @ g1 + g2 @ g2)
    np.testing.assert_allclose(p1.detach().numpy(), 0.1 * g1 / n, rtol=1e-12)
    np.testing.assert_allclose(p2.detach().numpy(), 0.4 * g2 / n, rtol=1e-12)


def test_group_with_perturb_false_is_neither_moved_nor_counted():
    a = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    a.grad, b.grad = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([100.0], dtype=torch.float64)
    opt = MSAM([{"params": [a]}, {"params": [b], "perturb": False}], torch.optim.SGD, rho=1.0, lr=0.1)
    opt.first_step()
    np.testing.assert_allclose(a.detach().numpy(), np.array([3.0, 4.0]) / (5 * math.sqrt(26)), rtol=1e-12)
    assert b.item() == 0.0


# --- ASAM and Fisher SAM: numpy transcriptions of their formulas --------------------------------------

def test_asam_perturbation_matches_numpy_transcription():
    rng = np.random.default_rng(6)
    params = [rng.normal(size=(4, 3)), rng.normal(size=3), rng.normal(size=(2, 2, 2))]
    grads = [rng.normal(size=p.shape) for p in params]
    rho, eta = 0.3, 0.01
    t = [np.abs(p) + eta if p.ndim > 1 else np.ones_like(p) for p in params]  # T = I on 1-D tensors
    norm_tg = np.linalg.norm(_flat([ti * g for ti, g in zip(t, grads)]))
    expected = [rho * ti**2 * g / norm_tg for ti, g in zip(t, grads)]
    got = _perturbation(ASAM, grads, params, rho=rho, eta=eta)
    for e, d in zip(expected, got):
        np.testing.assert_allclose(d, e, rtol=1e-12)


def test_fisher_sam_perturbation_matches_numpy_transcription():
    rng = np.random.default_rng(7)
    grads = [rng.normal(size=(3, 3)), rng.normal(size=5) * 0.1]
    rho, eta = 0.2, 0.5
    g = _flat(grads)
    f_inv = 1.0 / (1.0 + eta * g**2)
    expected = rho * f_inv * g / math.sqrt(g @ (f_inv * g))
    got = _flat(_perturbation(FisherSAM, grads, rho=rho, eta=eta))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


# --- ASAM and Fisher SAM: δ solves each paper's constrained problem ----------------------------------------

@pytest.mark.parametrize("seed,scale,eta,rho", [(0, 1.0, 0.01, 0.5), (1, 0.1, 0.01, 0.1), (2, 3.0, 0.1, 2.0),
                                                (3, 0.5, 1.0, 1.0)])
def test_asam_solves_the_problem_in_weight_scaled_coordinates(seed, scale, eta, rho):
    """Kwon et al.: max gᵀδ s.t. ‖T⁻¹δ‖ ≤ ρ, T = diag(|θ|) + ηI on weight tensors (ndim > 1) and T = I on biases and
    other 1-D tensors (the ASAM code's choice, paper-notes.md), i.e. δᵀ diag(1/T²) δ ≤ ρ²."""
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=(3, 2)) * scale, rng.normal(size=3) * scale, rng.normal(size=(2, 1, 2)) * scale]
    grads = [rng.normal(size=p.shape) for p in params]
    t = _flat([np.abs(p) + eta if p.ndim > 1 else np.ones_like(p) for p in params])
    delta = _flat(_perturbation(ASAM, grads, params, rho=rho, eta=eta))
    _assert_solves_the_constrained_problem(delta, _flat(grads), np.diag(1 / t**2), rho)


@pytest.mark.parametrize("seed,scale,eta,rho", [(0, 1.0, 1.0, 0.2), (1, 0.1, 100.0, 0.05), (2, 3.0, 0.5, 1.0),
                                                (3, 0.01, 1e4, 0.1)])
def test_fisher_sam_solves_the_problem_in_the_fisher_metric(seed, scale, eta, rho):
    """Kim et al.: max gᵀδ s.t. δᵀFδ ≤ ρ² with the regularised diagonal Fisher F = I + η diag(g²) (F⁻¹ = 1/(1 + ηg²),
    paper-notes.md); one metric over every perturbed tensor."""
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=(3, 3)) * scale, rng.normal(size=5) * scale]
    g = _flat(grads)
    delta = _flat(_perturbation(FisherSAM, grads, rho=rho, eta=eta))
    _assert_solves_the_constrained_problem(delta, g, np.diag(1 + eta * g**2), rho)


# --- full steps --------------------------------------------------------------------------------------

def test_one_two_pass_step_on_a_quadratic_equals_hand_computation():
    # ℓ(θ) = ½ θᵀAθ, ∇ℓ = Aθ. Hand computation of one M-SAM step with plain SGD.
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    theta0 = np.array([1.0, -2.0])
    rho, lr = 0.3, 0.1
    g = A @ theta0
    n = np.linalg.norm(g)
    delta = rho * g / (n * math.sqrt(1 + n * n))
    expected = theta0 - lr * A @ (theta0 + delta)

    theta = torch.nn.Parameter(torch.tensor(theta0))
    At = torch.tensor(A)
    opt = MSAM([theta], torch.optim.SGD, rho=rho, lr=lr)
    opt.step(lambda: (0.5 * theta @ At @ theta).backward())
    np.testing.assert_allclose(theta.detach().numpy(), expected, rtol=1e-14)
    stats = opt.last_stats
    assert stats["grad_norm"] == pytest.approx(n, rel=1e-12)
    assert stats["perturbation_norm"] == pytest.approx(rho / math.sqrt(1 + n * n), rel=1e-12)
    assert stats["effective_radius"] == pytest.approx(rho / (n * math.sqrt(1 + n * n)), rel=1e-12)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=g), torch.randn(32, 1, generator=g)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                     (torch.optim.Adam, dict(lr=0.01)),
                                     (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1))])
@pytest.mark.parametrize("cls", [SAM, MSAM, ASAM, FisherSAM])
def test_rho_zero_is_bit_identical_to_the_bare_base_optimizer(cls, base, kw):
    x, y = _data()
    m1, m2 = _model(), _model()
    bare = base(m1.parameters(), **kw)
    wrapped = cls(m2.parameters(), base, rho=0.0, **kw)
    for _ in range(5):
        bare.zero_grad()
        _loss(m1, x, y).backward()
        bare.step()
        wrapped.step(lambda: _loss(m2, x, y).backward())
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [SAM, MSAM, ASAM, FisherSAM])
def test_closure_path_equals_the_shared_two_pass_step(cls):
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = cls(m1.parameters(), torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9)
    o2 = cls(m2.parameters(), torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9)
    for _ in range(4):
        o1.step(lambda: _loss(m1, x, y).backward())
        take_step(o2, backward_closure(lambda: _loss(m2, x, y)))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_second_step_restores_weights_exactly_and_steps_with_the_perturbed_gradient():
    x, y = _data()
    m = _model()
    ref = copy.deepcopy(m)
    opt = MSAM(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    _loss(m, x, y).backward()
    opt.first_step(zero_grad=True)
    perturbed = [p.detach().clone() for p in m.parameters()]
    _loss(m, x, y).backward()
    grads_at_perturbed = [p.grad.clone() for p in m.parameters()]
    opt.second_step()
    # Independent reference: the original weights minus lr × the gradient taken at the perturbed weights.
    for p, p0, g, pt in zip(m.parameters(), ref.parameters(), grads_at_perturbed, perturbed):
        assert not torch.equal(pt, p0)
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * g, rtol=1e-6, atol=1e-7)
    # The restore is an exact copy, not θ + δ − δ: with lr = 0 the weights come back bit for bit.
    m_zero, ref_zero = _model(), _model()
    opt = MSAM(m_zero.parameters(), torch.optim.SGD, rho=0.37, lr=0.0)
    opt.step(lambda: _loss(m_zero, x, y).backward())
    assert opt.last_stats["perturbation_norm"] > 0
    for p, p0 in zip(m_zero.parameters(), ref_zero.parameters()):
        assert torch.equal(p, p0)


@pytest.mark.parametrize("name", ["sam", "msam", "asam", "fsam"])
@pytest.mark.parametrize("base", ["sgd", "adam", "adamw"])
def test_state_dict_round_trip_gives_bit_identical_next_steps(name, base):
    x, y = _data()
    m1 = _model()
    o1 = create_optimizer(name, m1.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01, rho=0.1, base=base)
    for _ in range(3):
        o1.step(lambda: _loss(m1, x, y).backward())
    saved_model = copy.deepcopy(m1.state_dict())
    saved_opt = copy.deepcopy(o1.state_dict())
    assert saved_opt["state"], "the base optimizer's state (momentum / moments) must be in the state dict"

    m2 = _model(seed=99)
    m2.load_state_dict(saved_model)
    o2 = create_optimizer(name, m2.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01, rho=0.1, base=base)
    o2.load_state_dict(saved_opt)
    assert o2.param_groups is o2.base_optimizer.param_groups
    for _ in range(3):
        o1.step(lambda: _loss(m1, x, y).backward())
        o2.step(lambda: _loss(m2, x, y).backward())
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_zero_and_non_finite_gradients_skip_the_perturbation():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = MSAM([p], torch.optim.SGD, rho=0.5, lr=0.1)
    p.grad = torch.zeros(2)
    opt.first_step()
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0]))
    assert opt.skipped_steps == 1 and opt.last_stats["skipped"]
    opt.second_step()
    assert torch.isfinite(p).all()
    p.grad = torch.tensor([float("inf"), 1.0])
    opt.first_step()
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0]))
    assert opt.skipped_steps == 2


def test_parameters_without_gradient_are_left_alone():
    a = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2))
    opt = SAM([a, frozen], torch.optim.SGD, rho=0.5, lr=0.1)
    a.grad = torch.tensor([1.0, 0.0])
    opt.first_step()
    assert torch.equal(frozen.detach(), torch.ones(2))
    assert torch.allclose(a.detach(), torch.tensor([1.5, 1.0]))


def test_lr_scheduler_drives_the_shared_groups():
    x, y = _data()
    m = _model()
    opt = create_optimizer("msam", m.parameters(), lr=0.1, rho=0.05, base="adamw")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for step in range(3):
        take_step(opt, backward_closure(lambda: _loss(m, x, y)))
        sched.step()
        assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (step + 1))


def test_built_base_optimizer_instance_is_wrapped_and_shares_groups():
    m = _model()
    base = torch.optim.AdamW(m.parameters(), lr=0.01)
    opt = MSAM(None, base, rho=0.1)
    assert opt.param_groups is base.param_groups and opt.param_groups[0]["rho"] == 0.1
    with pytest.raises(ValueError, match="parameters of the given base optimizer"):
        MSAM(list(_model().parameters()), torch.optim.AdamW(m.parameters(), lr=0.01))


def test_gradscaler_recipe_gives_the_fp32_perturbation():
    x, y = _data()
    m_ref, m_amp = _model(), _model()
    ref = MSAM(m_ref.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    _loss(m_ref, x, y).backward()
    ref.first_step()
    expected = [p.detach().clone() for p in m_ref.parameters()]

    opt = MSAM(m_amp.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(m_amp, x, y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    opt.first_step(zero_grad=True)
    for p, e in zip(m_amp.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=2e-3, rtol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(m_amp, x, y)
    scaler.scale(loss).backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in m_amp.parameters())

    # Without unscaling, the scaled gradient (×2¹⁴) makes M-SAM's perturbation vanish: the failure the recipe avoids.
    m_bad = _model()
    bad = MSAM(m_bad.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    (_loss(m_bad, x, y) * 2.0**14).backward()
    bad.first_step()
    assert bad.last_stats["perturbation_norm"] < 1e-3 * ref.last_stats["perturbation_norm"]


def test_max_grad_norm_clips_only_the_second_gradient():
    p = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    opt = SAM([p], torch.optim.SGD, rho=1.0, lr=1.0, max_grad_norm=1.0)
    p.grad = torch.tensor([30.0, 40.0])
    opt.first_step()
    assert torch.allclose(p.detach(), torch.tensor([0.6, 0.8]))  # first gradient unclipped: direction g/‖g‖, radius ρ
    p.grad = torch.tensor([3.0, 4.0])  # "second" gradient, norm 5 → clipped to 1
    opt.second_step()
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8]))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registered_optimizer_decreases_a_regression_loss(name):
    x, y = _data()
    m = _model()
    opt = create_optimizer(name, m.parameters(), lr=0.05, rho=0.05, momentum=0.9)
    start = _loss(m, x, y).item()
    for _ in range(30):
        if optimizer_info(name).two_pass:
            opt.step(lambda: _loss(m, x, y).backward())
        else:
            opt.zero_grad()
            _loss(m, x, y).backward()
            opt.step()
    assert _loss(m, x, y).item() < 0.8 * start


def test_bf16_autocast_step_is_close_to_fp32():
    x, y = _data()
    m32, m16 = _model(), _model()
    o32 = MSAM(m32.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    o16 = MSAM(m16.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    o32.step(lambda: _loss(m32, x, y).backward())

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(m16, x, y)
        loss.backward()
    o16.step(closure)
    for a, b in zip(m32.parameters(), m16.parameters()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


def test_registry_capabilities_and_bad_input():
    rng = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=rng), torch.randn(8, 2, generator=rng)
    for name, info in OPTIMIZERS.items():  # the flag against one real step: closure calls, through take_step and .step
        model = torch.nn.Linear(3, 2)
        calls = []

        def closure():
            calls.append(name)
            loss = _loss(model, x, y)
            loss.backward()
            return loss.detach()

        before = [p.detach().clone() for p in model.parameters()]
        take_step(create_optimizer(name, model.parameters(), lr=0.1), closure)
        assert len(calls) == (2 if info.two_pass else 1), (name, len(calls))
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), name  # it did step
        calls.clear()
        create_optimizer(name, model.parameters(), lr=0.1).step(closure)
        assert len(calls) == (2 if info.two_pass else 1), (name, len(calls))
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="rho"):
        MSAM(p, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'.*msam"):
        create_optimizer("adagrad", p, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(p, "sgd", rho=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(p, torch.nn.Linear, rho=0.1)
    with pytest.raises(ValueError, match="closure"):
        SAM(p, torch.optim.SGD, lr=0.1).step()
    with pytest.raises(ValueError, match="eta"):
        ASAM(p, torch.optim.SGD, eta=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="eta is not a parameter of msam"):
        create_optimizer("msam", p, lr=0.1, eta=0.5)
    assert create_optimizer("asam", p, lr=0.1).param_groups[0]["eta"] == 0.01
    assert create_optimizer("fsam", p, lr=0.1).param_groups[0]["eta"] == 1.0


# The papers' values (SAM: Foret et al.; ASAM: Kwon et al., ρ on its own relative scale; Fisher SAM: η = 1).
PAPER_DEFAULTS = {"sam": (0.05, None), "msam": (0.05, None), "asam": (0.5, 0.01), "fsam": (0.05, 1.0),
                  "gsam": (0.05, None), "friendly_sam": (0.05, None), "looksam": (0.05, None)}
# The methods' own knobs, which live on the optimizer object: M-SAM's; GSAM's α and ρ_min and Friendly SAM's σ, λ
# (pytorch_optimizer's and the F-SAM code's defaults); LookSAM's k and α (pytorch_optimizer's).
KNOBS = {"sam": {"norm_scope": "perturbed"}, "msam": {"norm_scope": "perturbed", "alpha": 1.0, "metric_beta": 0.0},
         "gsam": {"norm_scope": "perturbed", "alpha": 0.4, "rho_min": 0.0}, "friendly_sam": {"sigma": 1.0, "lmbda": 0.9},
         "looksam": {"k": 10, "alpha": 0.7}}


@pytest.mark.parametrize("name", [n for n, i in OPTIMIZERS.items() if i.two_pass])
def test_building_by_class_and_by_name_gives_the_same_defaults(name):
    info = optimizer_info(name)
    by_class = info.sam_class([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    by_name = create_optimizer(name, [torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    for opt in (by_class, by_name):
        group = opt.param_groups[0]
        assert (group["rho"], group.get("eta")) == PAPER_DEFAULTS[name]
        assert type(opt.base_optimizer) is torch.optim.AdamW  # the training configs' base
    rho, eta = PAPER_DEFAULTS[name]
    knobs = KNOBS
    assert default_hparams(name) == {"rho": rho, "base": "adamw", **({"eta": eta} if eta is not None else {}),
                                     **knobs.get(name, {})}
    for key in knobs.get(name, {}):  # the research knobs live on the optimizer object
        assert getattr(by_class, key) == getattr(by_name, key) == default_hparams(name)[key]
    assert default_hparams("adamw") == {}
    # An explicit base still wins, as the toy experiments need (plain SGD, no momentum).
    sgd = create_optimizer(name, [torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, base="sgd")
    assert type(sgd.base_optimizer) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.0


def test_every_entry_has_its_own_label_and_colour():
    labels = {n: i.label for n, i in OPTIMIZERS.items()}
    assert labels == {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "sam": "SAM", "msam": "M-SAM", "asam": "ASAM",
                      "fsam": "Fisher SAM", "gsam": "GSAM", "friendly_sam": "Friendly SAM", "looksam": "LookSAM",
                      "lion": "Lion"}
    colors = [i.color for i in OPTIMIZERS.values()]
    assert len(set(colors)) == len(colors)
