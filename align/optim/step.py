"""One optimizer step for every registered optimizer: the one place that spells out the SAM family's two passes.

A closure runs forward + backward at the current weights and returns the loss, detached. ``take_step`` is the
training step; ``first_pass`` and ``finish`` are its two halves, for callers that drive many optimizers with one
batched closure (the toy runs: one optimizer per run, so that each run keeps its own gradient norm).

Clipping: a single-pass optimizer clips its only gradient here (``grad_clip``); the SAM family clips the second
gradient inside ``second_step`` (its ``max_grad_norm``), never the first, which sets the perturbation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from align.optim.two_pass import SharpnessAware

Closure = Callable[[], Tensor]


def backward_closure(forward: Callable[[], Tensor], bf16: bool = False) -> Closure:
    """A closure: ``forward()`` (under CUDA bf16 autocast when asked) as float32, backpropagated, returned detached."""

    def closure() -> Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = forward().float()
        loss.backward()
        return loss.detach()

    return closure


def is_two_pass(opt: Optimizer) -> bool:
    """Whether ``opt`` takes a second forward/backward per step (the SAM family)."""
    return isinstance(opt, SharpnessAware)


def first_pass(optimizers: Sequence[Optimizer], closure: Closure) -> Tensor:
    """Clear every optimizer's gradients, then forward + backward at θ; returns the closure's loss."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return closure()


def finish(optimizers: Sequence[Optimizer], closure: Closure, grad_clip: float | None = None) -> None:
    """Complete the step whose gradients at θ are in ``.grad``; the gradients are cleared afterwards.

    SAM family: ``first_step``, one ``closure`` call at θ + δ for all of them (none when no optimizer's
    ``second_pass_due``: LookSAM between its full steps), ``second_step``. Single-pass: clip to ``grad_clip`` when
    given, then ``step``. The optimizers must all be of one kind.
    """
    kinds = {is_two_pass(opt) for opt in optimizers}
    if len(kinds) > 1:
        raise ValueError("finish() drives optimizers of one kind: all of the SAM family or none")
    if kinds == {True}:
        if grad_clip is not None and any(opt.max_grad_norm != grad_clip for opt in optimizers):
            raise ValueError("the SAM family clips the second gradient itself: build it with max_grad_norm=grad_clip")
        due = any(opt.second_pass_due for opt in optimizers)
        for opt in optimizers:
            opt.first_step(zero_grad=due)  # without a second pass the gradients at θ are the ones to step with
        if due:
            closure()
        for opt in optimizers:
            opt.second_step(zero_grad=True)
        return
    for opt in optimizers:
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(_params(opt), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def take_step(opt: Optimizer, closure: Closure, grad_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """One step of any registered optimizer → (loss at θ, ‖g‖ at θ over all its parameters), 0-d tensors.

    A non-finite loss is not stepped on: weights and optimizer state stay as they were (the caller decides what
    that means). The guard reads one bool from the device; beyond it only the optimizer's own reads happen.
    """
    loss = first_pass([opt], closure)
    grad_norm = _grad_norm(_params(opt))
    if not bool(torch.isfinite(loss)):
        return loss, grad_norm
    finish([opt], closure, grad_clip)
    return loss, grad_norm


def _params(opt: Optimizer) -> list[Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _grad_norm(params: list[Tensor]) -> Tensor:
    """‖concat(grads)‖₂ as a 0-d float32 tensor on the device (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
