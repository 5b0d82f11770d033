"""The norm scope of SAM's ‖g‖: which gradients set SAM's and M-SAM's radius, against hand closed forms on a tiny
model with an unperturbed logit scale."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align.optim import ASAM, MSAM, SAM, FisherSAM


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


def test_norm_scope_is_validated_and_refused_where_it_sets_nothing():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="norm_scope"):
        SAM(p, torch.optim.SGD, lr=0.1, norm_scope="everything")
    for cls in (ASAM, FisherSAM):
        with pytest.raises(ValueError, match="SAM and M-SAM only"):
            cls(p, torch.optim.SGD, lr=0.1, norm_scope="all_trainable")
    assert ASAM(p, torch.optim.SGD, lr=0.1, norm_scope="perturbed").norm_scope == "perturbed"
