"""The batched engine's common parts (core, pure): K heads' tensors stacked along a leading dimension, the per-head
hyper-parameters, the per-head norms, and what a method's batched rule is given and returns.

A pack holds K heads of one architecture. ``params`` maps each parameter name to a tensor [K, ...] (head k's
tensor is ``params[name][k]``) and every per-head hyper-parameter is a [K] tensor (``HeadHparams``). Every
reduction here is taken slice by slice and every update is elementwise, so a head's numbers do not depend on the
other heads of its pack. A method's file (``align.optim.sam``, ``msam``, ...) holds its ``BatchedRule`` beside its
``torch.optim`` class; ``align.optim.batched`` runs the rules of the methods a pack holds.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

Params = dict[str, Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """How the optimizer treats one stacked parameter: the flags of its param group."""

    decay: bool  # in the weight-decay group (Linear weights)
    perturb: bool  # perturbed by the SAM family (False: the logit scale unless configured)


class HeadHparams:
    """Per-head hyper-parameters, each a [K] tensor read as an attribute (``hp.lr``, ``hp.rho``): float64 values,
    int64 codes (``base``, ``method``, a whole-number knob), bool flags. Which names exist is the registry's
    business (``align.optim.batched.head_hparams`` makes one dict per head)."""

    def __init__(self, values: Mapping[str, Tensor]) -> None:
        self.__dict__["values"] = dict(values)

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def stack(cls, heads: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> "HeadHparams":
        """From one ``head_hparams`` dict per head (a bool is a flag, an int a code, anything else a float)."""
        out = {}
        for name, first in heads[0].items():
            dtype = torch.bool if isinstance(first, bool) else torch.int64 if isinstance(first, int) else torch.float64
            out[name] = torch.tensor([h[name] for h in heads], dtype=dtype, device=device)
        return cls(out)

    @functools.cached_property
    def host(self) -> dict[str, list]:
        """The same values as Python lists (read once: the fused base steps take host scalars)."""
        return {name: t.tolist() for name, t in self.values.items()}

    def select(self, index: Tensor) -> "HeadHparams":
        """The hyper-parameters of the heads at ``index`` (a pack that drops finished heads)."""
        return HeadHparams({name: t[index] for name, t in self.values.items()})

    @property
    def two_pass(self) -> Tensor:
        """[K] bool: heads of the SAM family (a second forward/backward on some or all steps)."""
        return self.method != 0


# -- per-head reductions ------------------------------------------------------------------------------------

def col(values: Tensor, like: Tensor) -> Tensor:
    """A [K] tensor as [K, 1, ..., 1] in ``like``'s dtype, to broadcast against a stacked [K, ...] tensor."""
    return values.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def norms(tensors: Sequence[Tensor]) -> Tensor:
    """[P, K]: the 2-norm of each head's slice of each stacked tensor.

    Slice by slice (one multi-tensor kernel), never as a reduction over a [K, N] view: the reduction strategy for
    a [K, N] tensor depends on K, and a head's numbers must not depend on the pack it trains in.
    """
    k = tensors[0].shape[0]
    flat = torch._foreach_norm([s for t in tensors for s in t.unbind(0)])
    return torch.stack(flat).reshape(len(tensors), k)


def _sum_squares(rows: Sequence[Tensor]) -> Tensor:
    """Σᵢ rowsᵢ² over [K] tensors, added in a fixed order (elementwise: the same for any K)."""
    total = rows[0] * rows[0]
    for row in rows[1:]:
        total = total + row * row
    return total


def global_norm(tensors: Sequence[Tensor], keep: Sequence[Tensor | None] | None = None,
                per: Sequence[Tensor] | None = None) -> Tensor:
    """[K]: each head's ‖concat(its slices)‖₂; ``keep[i]`` ([K] bool) leaves tensor i out for the other heads;
    ``per``: the tensors' ``norms``, when already known."""
    per = list(norms(tensors)) if per is None else list(per)
    if keep is not None:
        per = [n if m is None else torch.where(m, n, torch.zeros_like(n)) for n, m in zip(per, keep)]
    return torch.sqrt(_sum_squares(per))


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """[K]: each head's Σᵢ ⟨aᵢ, bᵢ⟩, slice by slice like ``norms``."""
    per = [torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(ta.unbind(0), tb.unbind(0))])
           for ta, tb in zip(a, b)]
    total = per[0]
    for row in per[1:]:
        total = total + row
    return total


def usable(norm: Tensor) -> Tensor:
    """[K] bool: a norm one can divide by (finite and > 0), as ``align.optim.two_pass.usable_norm``."""
    return torch.isfinite(norm) & (norm > 0)


def where_heads(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Head k's slice of ``a`` where ``mask[k]``, of ``b`` elsewhere."""
    return torch.where(col(mask, a).bool(), a, b)


def scaled(g: Params, names: Sequence[str], scale: Tensor) -> Params:
    """g · scale per head, the scale rounded to each tensor's dtype (the reference multiplies by a Python float)."""
    return {n: g[n] * col(scale, g[n]) for n in names}


# -- what a method's rule sees ------------------------------------------------------------------------------

@dataclass
class MethodState:
    """A method's own state for the heads of a pack: a tensor per parameter name, [K, ...] (M-SAM's metric average,
    Friendly SAM's gradient average, LookSAM's orthogonal component), which heads hold one yet, and each head's count
    of steps taken (LookSAM's schedule)."""

    tensors: Params
    has: Tensor  # [K] bool
    count: Tensor  # [K] int64

    @classmethod
    def zeros(cls, params: Params, names: Sequence[str]) -> "MethodState":
        first = next(iter(params.values()))
        k = first.shape[0]
        return cls({n: torch.zeros_like(params[n]) for n in names}, torch.zeros(k, dtype=torch.bool,
                                                                               device=first.device),
                   torch.zeros(k, dtype=torch.int64, device=first.device))

    def select(self, index: Tensor) -> "MethodState":
        return MethodState({n: t[index] for n, t in self.tensors.items()}, self.has[index], self.count[index])

    def put_(self, index: Tensor, rows: "MethodState") -> None:
        """Write the rows of ``select(index)`` back in place."""
        for n, t in self.tensors.items():
            t.index_copy_(0, index, rows.tensors[n])
        self.has.index_copy_(0, index, rows.has)
        self.count.index_copy_(0, index, rows.count)


@dataclass
class FirstStep:
    """The first step of a method's heads: θ, g and each head's SAM norm n, which heads perturb now (``mask``),
    the method's own state (None where it keeps none) and each head's scheduled lr / peak lr (GSAM's ρ schedule)."""

    params: Params  # θ of the perturbed tensors, [K, ...]
    grads: Params  # g of the perturbed and the other tensors with a gradient
    pert: list[str]  # the perturbed tensors
    extra: list[str]  # tensors with a gradient that are not perturbed (in ‖g‖ with norm_scope all_trainable)
    hp: HeadHparams
    grad_norm: Tensor  # [K] ‖g‖ over each head's norm scope
    mask: Tensor  # [K] bool: heads that perturb at this step
    state: MethodState | None = None
    lr_ratio: Tensor | None = None  # [K] float64; None: 1 (no schedule)

    def select(self, index: Tensor) -> "FirstStep":
        names = self.pert + self.extra
        return replace(self, params={n: self.params[n][index] for n in self.pert},
                       grads={n: self.grads[n][index] for n in names}, hp=self.hp.select(index),
                       grad_norm=self.grad_norm[index], mask=self.mask[index],
                       state=None if self.state is None else self.state.select(index),
                       lr_ratio=None if self.lr_ratio is None else self.lr_ratio[index])


@dataclass
class Descent:
    """The gradient a method's heads step with: the first gradient g (at θ) and ``grads``, the gradient at θ + δ
    where the head took a second pass (``second``) and g elsewhere; ``active``: heads that step now."""

    first: Params
    grads: Params
    pert: list[str]
    extra: list[str]
    hp: HeadHparams
    second: Tensor  # [K] bool
    applied: Tensor  # [K] bool: the head was perturbed (θ + δ with δ ≠ 0 possible)
    active: Tensor  # [K] bool
    state: MethodState | None = None

    def select(self, index: Tensor) -> "Descent":
        names = self.pert + self.extra
        return replace(self, first={n: self.first[n][index] for n in names},
                       grads={n: self.grads[n][index] for n in names}, hp=self.hp.select(index),
                       second=self.second[index], applied=self.applied[index], active=self.active[index],
                       state=None if self.state is None else self.state.select(index))


Rule = Callable[[FirstStep], tuple[Params, Tensor]]


@dataclass(frozen=True)
class BatchedRule:
    """A method's stacked-heads form, beside its torch.optim class in the method's file.

    ``first_step``: δ for the perturbed tensors and the norm whose zero/non-finite value skips the perturbation.
    ``state``: the parameter tensors it keeps state for ("perturbed" or "scope": the norm scope) and under which
    key the class's ``state_dict()["sam"]`` holds them; ``keeps_state(hp)``: [K] heads that need it (None: all).
    ``second_pass(hp, state)``: [K] heads that take a second pass now (None: all). ``descent``: the gradient to
    step with (None: the second gradient). ``counts_steps``: the state counts each head's steps.
    """

    first_step: Rule
    state_key: str | None = None
    state_scope: str = "perturbed"
    keeps_state: Callable[[HeadHparams], Tensor] | None = None
    second_pass: Callable[[HeadHparams, MethodState | None], Tensor] | None = None
    descent: Callable[[Descent], Params] | None = None
    counts_steps: bool = False
