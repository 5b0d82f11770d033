"""The norm scope of SAM's ‖g‖: which gradients set SAM's and M-SAM's radius, against hand closed forms on a tiny
model with an unperturbed logit scale."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align.optim import ASAM, MSAM, SAM, FisherSAM, FriendlySAM, LookSAM


def _scaled_regression():
    """ℓ = ½(eˢ wᵀx − y)² with a perturbed weight w and an unperturbed logit scale s; closed-form gradients."""
    w0, s0, x, y = np.array([0.5, -1.0, 2.0]), 0.3, np.array([1.0, 2.0, -0.5]), 0.25
    r = math.exp(s0) * (w0 @ x) - y
    gw, gs = r * math.exp(s0) * x, r * math.exp(s0) * (w0 @ x)
    w = torch.nn.Parameter(torch.tensor(w0))
    s = torch.nn.Parameter(torch.tensor(s0, dtype=torch.float64))
    xt = torch.tensor(x)

    def loss():
        return 0.5 * (torch.exp(s) * (w @ xt) - y) ** 2
    return w, s, loss, gw, gs


@pytest.mark.parametrize("cls", [SAM, MSAM])
@pytest.mark.parametrize("scope", ["perturbed", "all_trainable"])
def test_norm_scope_sets_the_radius_and_never_perturbs_the_logit_scale(cls, scope):
    w, s, loss, gw, gs = _scaled_regression()
    rho = 0.2
    opt = cls([{"params": [w]}, {"params": [s], "perturb": False}], torch.optim.SGD, rho=rho, lr=0.1,
              norm_scope=scope)
    loss().backward()
    w_before, s_before = w.detach().clone(), s.detach().clone()
    opt.first_step()
    n = math.sqrt(gw @ gw + gs * gs) if scope == "all_trainable" else math.sqrt(gw @ gw)
    radius = rho / n if cls is SAM else rho / (n * math.sqrt(1 + n * n))
    np.testing.assert_allclose((w.detach() - w_before).numpy(), radius * gw, rtol=1e-12)
    assert torch.equal(s.detach(), s_before)
    assert opt.last_stats["grad_norm"] == pytest.approx(n, rel=1e-12)


def test_all_trainable_averaged_metric_is_the_full_space_solution_on_the_perturbed_part():
    w, s, loss, gw, gs = _scaled_regression()
    opt = MSAM([{"params": [w]}, {"params": [s], "perturb": False}], torch.optim.SGD, rho=0.3, lr=0.0,
               metric_beta=0.5, alpha=0.8, norm_scope="all_trainable")
    loss().backward()
    opt.first_step(zero_grad=True)      # step 1: m = g
    loss().backward()
    opt.second_step(zero_grad=True)
    g1 = np.append(gw, gs)
    w.data += torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)  # move to get a different gradient
    w_now = w.detach().numpy().copy()
    loss().backward()
    g2 = np.array([*w.grad.numpy(), s.grad.item()])
    opt.first_step()
    m = 0.5 * g1 + 0.5 * g2
    G = np.eye(4) + 0.8**2 * np.outer(m, m)
    full = 0.3 * np.linalg.solve(G, g2) / math.sqrt(g2 @ np.linalg.solve(G, g2))
    np.testing.assert_allclose(w.detach().numpy() - w_now, full[:3], rtol=1e-11)
    assert s.item() == 0.3  # never perturbed


def test_norm_scope_is_validated_and_refused_where_it_sets_nothing():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="norm_scope"):
        SAM(p, torch.optim.SGD, lr=0.1, norm_scope="everything")
    for cls in (ASAM, FisherSAM, FriendlySAM, LookSAM):  # they normalise their own vector over the perturbed tensors
        with pytest.raises(ValueError, match="SAM, M-SAM and GSAM only"):
            cls(p, torch.optim.SGD, lr=0.1, norm_scope="all_trainable")
    assert ASAM(p, torch.optim.SGD, lr=0.1, norm_scope="perturbed").norm_scope == "perturbed"
