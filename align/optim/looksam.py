"""LookSAM (Liu et al., CVPR 2022), SAM at a fraction of its cost — the ``torch.optim`` class and its stacked-heads
rule.

Every k-th step (the first included) is SAM's: δ = ρ g/‖g‖, g_s = ∇ℓ(θ + δ), and LookSAM keeps g_s's component
orthogonal to g, g_v = g_s − (⟨g_s, g⟩/‖g‖²) g. The k − 1 steps in between take one pass: the base optimizer steps
with g + α (‖g‖/‖g_v‖) g_v. k = 1 is SAM bit for bit. Over ``steps`` steps it takes steps + ⌈steps/k⌉ passes.

Norms and the projection are over all perturbed tensors together, as in the paper; pytorch_optimizer's ``LookSAM``
takes them tensor by tensor (tests/test_peer_oracles.py shows the difference). A full step that did not perturb
(ρ = 0, or a zero or non-finite gradient) keeps no g_v: with δ = 0 there is no sharpness direction to reuse.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from align.optim.hparams import Hparam
from align.optim.sam import RHO, SAM
from align.optim.stacked import (
    BatchedRule,
    Descent,
    FirstStep,
    HeadHparams,
    MethodState,
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

K = Hparam("k", "k", 10, "a full SAM step every k steps; the others reuse g_v with one pass", low=1.0, integer=True)
ALPHA = Hparam("alpha", "α", 0.7, "weight of the reused orthogonal component, scaled to ‖g‖", low=0.0, high=1.0)
HPARAMS = (RHO, K, ALPHA)


def looksam_passes(k: int, steps: int) -> int:
    """Passes of ``steps`` steps: one each, plus the second of every full step (steps 0, k, 2k, ...)."""
    return steps + math.ceil(steps / k)


class LookSAM(SAM):
    """LookSAM: SAM's step every k steps, the stored orthogonal component reused in between (one pass).

    ``second_pass_due`` says whether the coming step is a full one; ``step(closure)`` and ``take_step`` call the
    closure once on the others. In a manual loop, call ``first_step(zero_grad=opt.second_pass_due)`` and the
    closure only when it was due. The step count and g_v are in ``state_dict()["sam"]`` ("steps", "orthogonal").
    """

    takes_norm_scope = False

    def __init__(self, params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer = DEFAULT_BASE_CLASS,
                 *args: Any, k: int = K.default, alpha: float = ALPHA.default, **kwargs: Any) -> None:
        self.k, self.alpha = K.check(k), ALPHA.check(alpha)
        self.steps = 0
        self._orthogonal: dict[Tensor, Tensor] = {}
        self._first: list[tuple[Tensor, Tensor]] = []
        super().__init__(params, base_optimizer, *args, **kwargs)

    @property
    def second_pass_due(self) -> bool:
        return self.steps % self.k == 0

    def _remember_first(self, params: list[Tensor], grads: list[Tensor]) -> None:
        self._first = [(p, g.detach().clone()) for p, g in zip(params, grads)] if self.second_pass_due else []

    def _descent_(self) -> None:
        if self.second_pass_due:
            self._keep_orthogonal(applied=self._stats.get("delta_norm") is not None)
        elif self._orthogonal:
            pairs = [(p, v) for p, v in self._orthogonal.items() if p.grad is not None]
            g, v = [p.grad for p, _ in pairs], [v for _, v in pairs]
            n, nv = norm_of(g).item(), norm_of(v).item()
            if pairs and math.isfinite(n) and usable_norm(nv):
                torch._foreach_add_(g, v, alpha=self.alpha * n / nv)
        self.steps += 1

    def _keep_orthogonal(self, applied: bool) -> None:
        """g_v = g_s − (⟨g_s, g⟩/‖g‖²) g from the full step's two gradients (none where δ was not applied)."""
        pairs = [(p, g) for p, g in self._first if p.grad is not None]
        self._first, self._orthogonal = [], {}
        if not applied or not pairs:
            return
        g_s, g = [p.grad for p, _ in pairs], [first for _, first in pairs]
        squared = norm_of(g).item() ** 2
        c = dot_of(g_s, g).item() / squared if usable_norm(squared) else 0.0
        self._orthogonal = dict(zip([p for p, _ in pairs], torch._foreach_add(g_s, g, alpha=-c)))

    def _save_extra(self, sam: dict[str, Any]) -> None:
        sam["steps"] = self.steps
        if self._orthogonal:
            sam[RULE.state_key] = tensors_to_index(self, self._orthogonal)

    def _load_extra(self, sam: dict[str, Any]) -> None:
        self.steps = int(sam.get("steps", 0))
        self._orthogonal = tensors_by_index(self, sam.get(RULE.state_key, {}))


def _batched_second_pass(hp: HeadHparams, state: MethodState | None) -> Tensor:
    """[K] heads whose coming step is a full one (their count of steps taken is a multiple of k)."""
    return state.count % torch.clamp(hp.k, min=1) == 0  # k is 0 on the rows of other methods


def _batched_descent(d: Descent) -> Params:
    """Full steps keep g_v and step with g_s; the others step with g + α (‖g‖/‖g_v‖) g_v (one pass)."""
    state, names, hp = d.state, d.pert, d.hp
    full = d.second & d.active
    squared = global_norm([d.first[k] for k in names]).double() ** 2
    c = dot([d.grads[k] for k in names], [d.first[k] for k in names]).double() / torch.where(
        squared > 0, squared, torch.ones_like(squared))
    c = torch.where(usable(squared), c, torch.zeros_like(c))
    keep = full & d.applied
    for k in names:
        g_v = d.grads[k] + col(-c, d.grads[k]) * d.first[k]
        state.tensors[k].copy_(where_heads(keep, g_v, where_heads(full, torch.zeros_like(g_v), state.tensors[k])))
    state.has = torch.where(full, keep, state.has)
    reuse = d.active & ~d.second & state.has
    n = global_norm([d.grads[k] for k in names]).double()
    nv = global_norm([state.tensors[k] for k in names]).double()
    reuse = reuse & torch.isfinite(n) & usable(nv)
    weight = hp.alpha * n / torch.where(usable(nv), nv, torch.ones_like(nv))
    out = dict(d.grads)
    for k in names:
        out[k] = where_heads(reuse, d.grads[k] + col(weight, d.grads[k]) * state.tensors[k], d.grads[k])
    state.count += d.active.long()
    return out


def _batched_first_step(s: FirstStep) -> tuple[Params, Tensor]:
    """SAM's δ = ρ g/‖g‖ (the engine asks only the heads at a full step)."""
    return scaled(s.grads, s.pert, s.hp.rho / s.grad_norm.double()), s.grad_norm


RULE = BatchedRule(_batched_first_step, state_key="orthogonal", second_pass=_batched_second_pass,
                   descent=_batched_descent, counts_steps=True)
