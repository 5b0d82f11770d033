"""M-SAM, Monge SAM (Jacobsen & Arvanitidis, arXiv 2502.08448): δ = ρ g / (‖g‖ √(1+α²‖g‖²)) — the ``torch.optim``
class and its stacked-heads rule.

Not Momentum-SAM ("MSAM", Becker et al. 2024, which perturbs along the momentum) and not micro-batch mSAM: the M
is Monge's metric of the loss surface seen as a graph.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from align.optim.hparams import Hparam
from align.optim.sam import HPARAMS as SAM_HPARAMS
from align.optim.sam import SAM
from align.optim.stacked import (
    BatchedRule,
    FirstStep,
    Params,
    col,
    dot,
    global_norm,
    scaled,
    usable,
    where_heads,
)
from align.optim.two_pass import (
    DEFAULT_BASE_CLASS,
    dot_of,
    norm_of,
    tensors_by_index,
    tensors_to_index,
    usable_norm,
)

ALPHA = Hparam("alpha", "α", 1.0, "metric scale: G = I + α² g gᵀ (0: SAM, 1: the paper's M-SAM)", low=0.0)
METRIC_BETA = Hparam("metric_beta", "β", 0.0, "averaged metric: G = I + α² m mᵀ, m ← β m + (1 − β) g (0: M-SAM)",
                     low=0.0, high=1.0, high_open=True)
HPARAMS = (*SAM_HPARAMS, ALPHA, METRIC_BETA)


class MSAM(SAM):
    """Monge SAM (Jacobsen & Arvanitidis, 2025): δ = ρ g / (‖g‖ √(1+α²‖g‖²)).

    δ maximises gᵀδ subject to δᵀGδ ≤ ρ² in the Monge metric G = I + α² g gᵀ of the loss surface seen as a
    graph. Where the loss is steep (α‖g‖ ≫ 1) it tends to plain gradient descent; where flat, to SAM. ``alpha``
    scales the metric: α = 1 is the paper's M-SAM, α = 0 is SAM (both bit for bit).

    ``metric_beta`` = β > 0 uses the averaged metric G = I + α² m mᵀ, with m an exponential moving average of
    the first-pass gradients, m ← β m + (1 − β) g. m starts at a tensor's first gradient (m = g: the first step
    is M-SAM), so it is never biased towards 0 and needs no Adam-style correction. Derivation: the Lagrangian
    of max gᵀδ s.t. δᵀGδ ≤ ρ² gives g = 2λGδ, so δ ∝ G⁻¹g and the active constraint fixes
    δ = ρ G⁻¹g / √(gᵀG⁻¹g). Sherman–Morrison: G⁻¹ = I − α² m mᵀ/(1 + α²‖m‖²), hence G⁻¹g = g − c m with
    c = α² mᵀg/(1 + α²‖m‖²). With g = k m + r, k = mᵀg/‖m‖², r ⊥ m, this is G⁻¹g = r + k m/(1 + α²‖m‖²) and
    gᵀG⁻¹g = ‖r‖² + k mᵀg/(1 + α²‖m‖²), the forms computed: no difference of large terms when g ∥ m and
    α‖m‖ ≫ 1. δ is not parallel to g. β = 0 is M-SAM bit for bit.
    m covers the tensors that count in ‖g‖ (see ``norm_scope``) and is updated by every first_step that
    computes a perturbation with a usable gradient; it is saved in ``state_dict()["sam"]["metric_ema"]``
    (by parameter index) so that a resumed run continues bit for bit.
    """

    def __init__(self, params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer = DEFAULT_BASE_CLASS,
                 *args: Any, alpha: float = ALPHA.default, metric_beta: float = METRIC_BETA.default,
                 **kwargs: Any) -> None:
        self.alpha, self.metric_beta = ALPHA.check(alpha), METRIC_BETA.check(metric_beta)
        self._metric_ema: dict[Tensor, Tensor] = {}
        super().__init__(params, base_optimizer, *args, **kwargs)

    def _perturbation(self, params, grads, groups, grad_norm):
        if self.metric_beta > 0.0:
            return self._averaged_metric_perturbation(params, grads, groups, grad_norm)
        n = grad_norm
        a = self.alpha * n  # α = 1: a is n exactly, so the scale is the paper's ρ / (n √(1 + n n)) bit for bit
        scale = [g["rho"] / (n * math.sqrt(1.0 + a * a)) for g in groups] if usable_norm(n) else [0.0] * len(groups)
        return torch._foreach_mul(grads, scale), n

    def _averaged_metric_perturbation(self, params: list[Tensor], grads: list[Tensor], groups: list[dict],
                                      grad_norm: float) -> tuple[list[Tensor], float]:
        """δ = ρ G⁻¹g / √(gᵀG⁻¹g) with G = I + α² m mᵀ; returns δ and √(gᵀG⁻¹g) (the guard)."""
        if not usable_norm(grad_norm):
            return [], grad_norm  # a zero or non-finite gradient neither perturbs nor enters m
        extra = self._norm_only_params()
        scope_g = grads + [p.grad for p in extra]
        m = self._update_metric(params + extra, scope_g)
        a2 = self.alpha * self.alpha
        mm = norm_of(m).item() ** 2
        direction, q = grads, grad_norm * grad_norm  # m = 0: G = I, SAM
        if mm > 0.0:
            mg = dot_of(m, scope_g).item()
            k = mg / mm  # g = k m + r with r ⊥ m
            r = torch._foreach_add(scope_g, m, alpha=-k)
            shrink = k / (1.0 + a2 * mm)
            q = norm_of(r).item() ** 2 + shrink * mg
            direction = torch._foreach_add(r[:len(grads)], m[:len(grads)], alpha=shrink)  # G⁻¹g, perturbed part
        root = math.sqrt(q)
        if not usable_norm(root):
            return [], root
        return torch._foreach_mul(direction, [g["rho"] / root for g in groups]), root

    def _update_metric(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """m ← β m + (1 − β) g for each tensor (m = g on its first step); returns m in the order of ``params``."""
        known = [i for i, p in enumerate(params) if p in self._metric_ema]
        for i, p in enumerate(params):
            if p not in self._metric_ema:
                self._metric_ema[p] = grads[i].detach().clone()
        if known:
            ms = [self._metric_ema[params[i]] for i in known]
            torch._foreach_mul_(ms, self.metric_beta)
            torch._foreach_add_(ms, [grads[i] for i in known], alpha=1.0 - self.metric_beta)
        return [self._metric_ema[p] for p in params]

    def _save_extra(self, sam: dict[str, Any]) -> None:
        """The metric average m (β > 0), keyed by the parameter's index over all groups."""
        if self._metric_ema:
            sam[RULE.state_key] = tensors_to_index(self, self._metric_ema)

    def _load_extra(self, sam: dict[str, Any]) -> None:
        self._metric_ema = tensors_by_index(self, sam.get(RULE.state_key, {}))


def _batched_first_step(s: FirstStep) -> tuple[Params, Tensor]:
    """M-SAM for stacked heads: δ = ρ g / (‖g‖ √(1 + α²‖g‖²)); with β > 0 the averaged metric."""
    nd = s.grad_norm.double()
    a = s.hp.alpha * nd
    d = scaled(s.grads, s.pert, s.hp.rho / (nd * torch.sqrt(1.0 + a * a)))
    averaged = s.mask & (s.hp.metric_beta > 0)
    if not bool(averaged.any()):
        return d, s.grad_norm
    d_avg, root = _averaged_metric(s, averaged)
    return {k: where_heads(averaged, d_avg[k], d[k]) for k in s.pert}, torch.where(averaged, root,
                                                                                   s.grad_norm.to(root.dtype))


def _averaged_metric(s: FirstStep, mask: Tensor) -> tuple[Params, Tensor]:
    """δ = ρ G⁻¹g / √(gᵀG⁻¹g), G = I + α² m mᵀ, m ← β m + (1 − β) g (m = g at first), as ``MSAM``'s Sherman–Morrison
    form; the scope is the perturbed tensors plus, for heads with norm_scope all_trainable, the others."""
    if s.state is None:
        raise ValueError("M-SAM with metric_beta > 0 needs its state (align.optim.batched.init_method_state)")
    g, hp, n, metric = s.grads, s.hp, s.grad_norm, s.state
    scope = s.pert + s.extra
    ok = mask & usable(n)  # a zero or non-finite gradient neither perturbs nor enters m
    in_scope = hp.norm_scope != 0
    sg = {k: g[k] if k in s.pert else where_heads(in_scope, g[k], torch.zeros_like(g[k])) for k in scope}
    for k in scope:
        m_k = metric.tensors[k]
        blended = m_k * col(hp.metric_beta, m_k) + col(1 - hp.metric_beta, sg[k]) * sg[k]
        m_k.copy_(where_heads(ok, where_heads(metric.has, blended, sg[k]), m_k))
    metric.has |= ok
    m = {k: metric.tensors[k] for k in scope}
    a2 = hp.alpha * hp.alpha
    mm = global_norm([m[k] for k in scope]).double() ** 2
    mg = dot([m[k] for k in scope], [sg[k] for k in scope]).double()
    safe_mm = torch.where(mm > 0, mm, torch.ones_like(mm))
    k_ = mg / safe_mm  # g = k m + r with r ⊥ m
    r = {k: sg[k] + col(-k_, sg[k]) * m[k] for k in scope}
    shrink = k_ / (1.0 + a2 * mm)
    q = torch.where(mm > 0, global_norm([r[k] for k in scope]).double() ** 2 + shrink * mg, n.double() ** 2)
    direction = {k: where_heads(mm > 0, r[k] + col(shrink, m[k]) * m[k], g[k]) for k in s.pert}
    root = torch.sqrt(q)
    root = torch.where(usable(n), root, n.double())
    return scaled(direction, s.pert, hp.rho / root), root


RULE = BatchedRule(_batched_first_step, state_key="metric_ema", state_scope="scope",
                   keeps_state=lambda hp: hp.metric_beta > 0)
