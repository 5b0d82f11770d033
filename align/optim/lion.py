"""Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023), a base optimizer: the
``torch.optim`` class and the update it and the stacked heads share.

    c = β1 m + (1 − β1) g          θ ← θ (1 − lr·wd) − lr · sign(c)          m ← β2 m + (1 − β2) g

Decoupled weight decay as AdamW's. Usable alone (registry name ``lion``) and as the base of every SAM-family
method (``base: lion``). SAIL, the closest peer for heads on frozen encoders, trains with it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

DEFAULT_BETAS = (0.9, 0.99)  # the Lion paper's


def lion_update_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *, lr: float,
                 beta1: float, beta2: float, weight_decay: float) -> None:
    """One Lion step of tensors that share lr, betas and weight decay, in place (the class's step, and each set of
    equal heads of a pack on its own slices: elementwise, so a head's update depends on its own values only)."""
    if not params:
        return
    update = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(update, grads, alpha=1.0 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)


class Lion(Optimizer):
    """Lion: sign(β1 m + (1 − β1) g) steps of size lr, decoupled weight decay, m ← β2 m + (1 − β2) g.

    State per parameter: ``exp_avg`` (m), zero at the start. lr is typically 3–10× smaller than AdamW's.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = DEFAULT_BETAS,
                 weight_decay: float = 0.0) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each of betas must be in [0, 1), got {list(betas)}")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            beta1, beta2 = group["betas"]
            lion_update_(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                         lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
        return loss
