"""Optimizer math for K heads at once (core, pure): the engine that runs, for a pack of stacked heads, the batched
rule of each method the pack holds (``align.optim.stacked`` has the common parts, each method's file its rule).

A pack can mix learning rates, schedules, weight decays, base optimizers and methods. Slice by slice this is the
reference classes:

- ``base_step_``: ``torch.optim.SGD`` (momentum, coupled weight decay), ``Adam`` and ``AdamW`` (decoupled decay)
  through torch's fused kernels on each head's slices, with the ``step`` counter and the bias corrections, and
  ``align.optim.lion.Lion`` through the update its class runs;
- ``perturbation``: each method's first step (its ``BatchedRule``), with each head's own global gradient norm over
  its own perturbed tensors (``norm_scope`` per head), its own zero/non-finite guard and ``perturb=False``
  honoured; it also says which heads take a second pass now (LookSAM's schedule);
- ``descent_``: the gradient a method steps with where it is not the second gradient (GSAM, LookSAM);
- ``clip_grads_``: ``torch.nn.utils.clip_grad_norm_`` per head.

Hyper-parameters are resolved from the registry (``head_hparams``: its defaults, ranges and error messages). The
perturbations' scalars are computed in float64 on [K] tensors and rounded to the parameters' dtype where the
reference rounds a Python float; the base step hands each head's own floats to the fused kernel. Float64 packs agree
with the reference to rounding, float32 packs to a few ulps. No I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from align.optim.hparams import Hparam
from align.optim.lion import Lion, lion_update_
from align.optim.registry import (ADAM_BETAS, BASE_HPARAMS, BASE_OPTIMIZERS, DEFAULT_BASE, METHOD_HPARAMS,
                                  OPTIMIZERS, TWO_PASS_METHODS, base_betas, hparam_spec, optimizer_info,
                                  resolve_hparams)
from align.optim.sam import ALL_TRAINABLE
from align.optim.stacked import (BatchedRule, Descent, FirstStep, HeadHparams, MethodState, ParamSpec, Params, col,
                                 global_norm, norms, usable, where_heads)

__all__ = ["BASES", "METHODS", "NONE", "HeadHparams", "ParamSpec", "Perturbation", "base_step_", "clip_grads_",
           "col", "descent_", "global_norm", "head_hparams", "init_method_state", "init_state", "keeps_method_state",
           "load_method_checkpoint_", "method_checkpoint", "norms", "perturbation", "state_keys"]

BASES = BASE_OPTIMIZERS  # sgd, adam, adamw, lion: the codes are their positions
METHODS = ("none", *TWO_PASS_METHODS)  # the codes are their positions; 0: a single-pass head
NONE = 0
# The kernel of each base optimizer, found by its class: torch's fused SGD, Adam and AdamW, Lion's update.
_CODE_OF = {OPTIMIZERS[name].base.cls: code for code, name in enumerate(BASES)}
SGD, ADAM, ADAMW, LION = (_CODE_OF[cls] for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, Lion))
RULES: dict[int, BatchedRule] = {METHODS.index(n): OPTIMIZERS[n].rule for n in TWO_PASS_METHODS}
KNOBS: tuple[Hparam, ...] = tuple(hparam_spec(n) for n in METHOD_HPARAMS)  # each a [K] row of HeadHparams


def head_hparams(name: str, *, lr: float, base: str | None = None, grad_clip: float | None = None,
                 perturbation: str = "global", **hparams: Any) -> dict[str, Any]:
    """One head's resolved hyper-parameters from the registry (its defaults, its ValueErrors), as the reference
    optimizer ``create_optimizer`` builds from the same arguments holds them. ``grad_clip`` is the SAM family's
    ``max_grad_norm`` or the single-pass clip; ``perturbation`` ("global" | "local") matters only to the SAM family
    under torchrun. A method knob the head's method lacks is 0 (never read)."""
    if perturbation not in ("global", "local"):
        raise ValueError(f"perturbation must be global or local, got {perturbation!r}")
    info = optimizer_info(name)
    if info.two_pass and perturbation == "local" and not info.local_perturbation:
        raise ValueError(f"perturbation local is not implemented for {name}: use global")
    base_name = (base if base is not None else DEFAULT_BASE) if info.two_pass else name
    if base_name not in BASES:
        raise ValueError(f"unknown base optimizer {base_name!r}; choose one of {', '.join(BASES)}")
    own = resolve_hparams(name, {k: v for k, v in hparams.items() if k not in BASE_HPARAMS}) if info.two_pass else {}
    knobs = OPTIMIZERS[base_name].base.knobs
    given = {k: hparams[k] if hparams.get(k) is not None else v for k, v in BASE_HPARAMS.items()}
    b1, b2 = base_betas(base_name, hparams.get("betas")) if "betas" in knobs else ADAM_BETAS
    out = {"lr": float(lr), "weight_decay": float(given["weight_decay"]),
           "momentum": float(given["momentum"]) if "momentum" in knobs else 0.0, "beta1": float(b1),
           "beta2": float(b2), "eps": float(given["eps"]) if "eps" in knobs else 1e-8,
           "grad_clip": math.inf if grad_clip is None else float(grad_clip), "base": BASES.index(base_name),
           "method": METHODS.index(name) if info.two_pass else NONE}
    _check_base(out)
    for knob in KNOBS:
        value = own.get(knob.name, knob.default if knob.choices else 0)
        out[knob.name] = knob.choices.index(value) if knob.choices else int(value) if knob.integer else float(value)
    out["local_perturbation"] = info.two_pass and perturbation == "local"
    return out


def _check_base(hp: Mapping[str, Any]) -> None:
    """What torch's base optimizers refuse when they are built."""
    for key in ("lr", "weight_decay", "momentum", "eps"):
        if not (math.isfinite(hp[key]) and hp[key] >= 0):
            raise ValueError(f"{key} must be a finite number >= 0, got {hp[key]!r}")
    if not all(0.0 <= b < 1.0 for b in (hp["beta1"], hp["beta2"])):
        raise ValueError(f"each of betas must be in [0, 1), got {[hp['beta1'], hp['beta2']]}")


def keeps_method_state(name: str, hparams: Mapping[str, Any]) -> bool:
    """Whether method ``name`` with these hyper-parameters keeps a copy of each perturbed value besides the base
    optimizer's state (M-SAM with β > 0: its metric average; Friendly SAM: m; LookSAM: g_v)."""
    info = optimizer_info(name)
    if not info.two_pass or info.rule.state_key is None:
        return False
    if info.rule.keeps_state is None:
        return True
    return bool(info.rule.keeps_state(HeadHparams.stack([head_hparams(name, lr=1.0, **hparams)]))[0])


# -- the base optimizers ----------------------------------------------------------------------------------

def state_keys(base: int, momentum: float) -> tuple[str, ...]:
    """The per-parameter state base optimizer ``base`` (a code) keeps, as its torch optimizer's state_dict holds
    it: SGD's momentum buffer (none without momentum), Adam's and AdamW's step and moments, Lion's average."""
    keys = OPTIMIZERS[BASES[base]].base.state_keys
    return () if keys == ("momentum_buffer",) and momentum == 0 else keys


def init_state(params: Params, hp: HeadHparams) -> dict[str, dict[str, Tensor]]:
    """Zeroed optimizer state per parameter: ``step`` [K] (float32, as torch keeps it) and the buffers the pack's
    bases need (``momentum_buffer`` for SGD with momentum, ``exp_avg``/``exp_avg_sq`` for Adam and AdamW,
    ``exp_avg`` for Lion)."""
    needed = {key for b, m in zip(hp.host["base"], hp.host["momentum"]) for key in state_keys(b, m)} - {"step"}
    buffers = [key for b in range(len(BASES)) for key in OPTIMIZERS[BASES[b]].base.state_keys if key in needed]
    out = {}
    for name, p in params.items():
        state = {"step": torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)}
        for key in dict.fromkeys(buffers):
            state[key] = torch.zeros_like(p)
        out[name] = state
    return out


def base_step_(params: Params, grads: Mapping[str, Tensor | None], state: dict[str, dict[str, Tensor]],
               specs: Mapping[str, ParamSpec], hp: HeadHparams, lr: Sequence[float],
               active: Sequence[bool] | None = None) -> None:
    """One step of each head's base optimizer at its scheduled learning rate ``lr`` (one float per head), in place.

    The update is torch's own fused kernel (what ``torch.optim.SGD/Adam/AdamW(fused=True)`` run: coupled decay
    and momentum for SGD, coupled decay for Adam, decoupled θ·(1 − lr·wd) for AdamW, the step count and bias
    corrections) or Lion's update, called once per set of heads with equal hyper-parameters, on each head's own
    slices: elementwise, so a head's update does not depend on the others. Heads not ``active`` keep parameters
    and state exactly; parameters without a gradient are skipped.
    """
    h = hp.host
    names = [n for n in params if grads.get(n) is not None]
    if not names:
        return
    counts = state[names[0]]["step"].tolist()
    sets: dict[tuple, list[int]] = {}
    for k in range(len(lr)):
        if active is None or active[k]:
            first = h["base"][k] == SGD and counts[k] == 0
            key = (h["base"][k], lr[k], h["weight_decay"][k], h["momentum"][k], h["beta1"][k], h["beta2"][k],
                   h["eps"][k], first)
            sets.setdefault(key, []).append(k)
    for (base, lr_k, wd, momentum, beta1, beta2, eps, first), heads in sets.items():
        for decay in (True, False):
            sel = [n for n in names if specs[n].decay == decay]
            if not sel:
                continue
            p = [params[n][k] for k in heads for n in sel]
            g = [grads[n][k] for k in heads for n in sel]
            steps = [state[n]["step"][k] for k in heads for n in sel]
            torch._foreach_add_(steps, 1)
            kw = dict(weight_decay=wd if decay else 0.0, lr=lr_k, maximize=False)
            if base == SGD:
                buffers = [state[n]["momentum_buffer"][k] for k in heads for n in sel] if momentum != 0 else []
                torch._fused_sgd_(p, g, buffers, momentum=momentum, dampening=0.0, nesterov=False,
                                  is_first_step=first and momentum != 0, **kw)
            elif base == LION:
                lion_update_(p, g, [state[n]["exp_avg"][k] for k in heads for n in sel], lr=lr_k, beta1=beta1,
                             beta2=beta2, weight_decay=kw["weight_decay"])
            else:
                fused = torch._fused_adamw_ if base == ADAMW else torch._fused_adam_
                fused(p, g, [state[n]["exp_avg"][k] for k in heads for n in sel],
                      [state[n]["exp_avg_sq"][k] for k in heads for n in sel], [], steps, beta1=beta1, beta2=beta2,
                      eps=eps, amsgrad=False, **kw)


def clip_grads_(grads: Params, max_norm: Tensor) -> None:
    """``torch.nn.utils.clip_grad_norm_`` per head, in place: g · min(1, c / (‖g‖ + 1e-6)); c = inf leaves g."""
    names = [n for n, g in grads.items() if g is not None]
    if not names or not bool(torch.isfinite(max_norm).any()):
        return
    total = global_norm([grads[n] for n in names])
    coef = torch.clamp(max_norm.to(total.dtype) / (total + 1e-6), max=1.0)
    coef = torch.where(torch.isfinite(max_norm), coef, torch.ones_like(coef))
    for n in names:
        grads[n].mul_(col(coef, grads[n]))


# -- the SAM family ---------------------------------------------------------------------------------------

MethodStates = dict[int, MethodState]  # method code → its state for the pack's heads


def init_method_state(params: Params, specs: Mapping[str, ParamSpec], hp: HeadHparams) -> MethodStates:
    """The state of each method of the pack that keeps one (M-SAM with β > 0, Friendly SAM, LookSAM): zeros and no
    head started yet; the tensors cover the method's scope (all parameters or the perturbed ones)."""
    out: MethodStates = {}
    for code in sorted(set(hp.host["method"]) - {NONE}):
        rule = RULES[code]
        rows = hp.method == code
        if rule.state_key is None and not rule.counts_steps:
            continue
        if rule.keeps_state is not None and not bool((rule.keeps_state(hp) & rows).any()):
            continue
        names = list(params) if rule.state_scope == "scope" else [n for n in params if specs[n].perturb]
        out[code] = MethodState.zeros(params, names)
    return out


@dataclass
class Perturbation:
    """One first step of every head: θ̃ = θ + δ where ``applied``, and the diagnostics ``SAM.last_stats`` gives."""

    perturbed: Params  # θ̃ for every parameter (θ itself for the tensors and heads left alone)
    applied: Tensor  # [K] bool
    skipped: Tensor  # [K] bool: a zero or non-finite norm skipped the perturbation (SAM.skipped_steps counts it)
    grad_norm: Tensor  # [K] ‖g‖ over the tensors in each head's norm scope (SAM's n)
    delta_norm: Tensor  # [K] ‖δ‖ (0 where not applied)
    second: Tensor  # [K] bool: the head takes a second pass at θ̃ now (the SAM family; LookSAM every k-th step)


def _second_pass(hp: HeadHparams, state: MethodStates | None) -> Tensor:
    """[K] heads that take a second pass at this step."""
    second, present = hp.two_pass, set(hp.host["method"])
    for code, rule in RULES.items():
        if rule.second_pass is not None and code in present:
            rows = hp.method == code
            second = torch.where(rows, rule.second_pass(hp, (state or {}).get(code)), second)
    return second


def perturbation(params: Params, grads: Params, specs: Mapping[str, ParamSpec], hp: HeadHparams,
                 state: MethodStates | None = None, active: Tensor | None = None,
                 grad_norms: Mapping[str, Tensor] | None = None, lr: Sequence[float] | None = None) -> Perturbation:
    """Each head's SAM-family first step from its gradients at θ (heads of method "none" are left alone).

    ``state``: the pack's method states (``init_method_state``), updated in place. ``grad_norms``: each gradient's
    ``norms`` row, when the caller has them already. ``lr``: each head's scheduled learning rate (GSAM's ρ_t; None:
    the peak)."""
    pert = [n for n in params if specs[n].perturb and grads.get(n) is not None]
    extra = [n for n in params if not specs[n].perturb and grads.get(n) is not None]
    g = {n: grads[n] for n in pert + extra}
    known = [grad_norms[n] for n in pert + extra] if grad_norms is not None else None
    all_trainable = hp.norm_scope == ALL_TRAINABLE
    grad_norm = global_norm([g[n] for n in pert + extra], [None] * len(pert) + [all_trainable] * len(extra), known)
    second = _second_pass(hp, state)
    on = second & (hp.rho != 0)
    if active is not None:
        on = on & active
    if not pert or not bool(on.any()):
        zeros = torch.zeros_like(grad_norm)
        return Perturbation(dict(params), on & False, on & False, grad_norm, zeros, second)
    ratio = None if lr is None else torch.tensor(list(lr), dtype=torch.float64, device=hp.lr.device) / hp.lr
    step = FirstStep({n: params[n] for n in pert}, g, pert, extra, hp, grad_norm, on, None, ratio)
    codes = sorted(set(hp.method[on].tolist()))
    if len(codes) == 1:  # the usual pack: one method, computed on the whole pack
        step.state = (state or {}).get(codes[0])
        delta, guard = RULES[codes[0]].first_step(step)
    else:
        delta, guard = _by_method(step, state or {}, codes)
    ok = usable(guard)
    applied, skipped = on & ok, on & ~ok
    everyone = bool(applied.all())  # the usual pack: no selection needed
    out = dict(params)
    for n in pert:
        out[n] = params[n] + delta[n] if everyone else where_heads(applied, params[n] + delta[n], params[n])
    delta_norm = global_norm([delta[n] for n in pert])
    if not everyone:
        delta_norm = torch.where(applied, delta_norm, torch.zeros_like(delta_norm))
    return Perturbation(out, applied, skipped, grad_norm, delta_norm, second)


def _by_method(step: FirstStep, state: MethodStates, codes: list[int]) -> tuple[Params, Tensor]:
    """δ and the guard of a pack that mixes methods: each method on its own heads only (rows gathered, computed,
    put back), so a mixed pack costs what its parts cost."""
    delta = {n: torch.zeros_like(step.params[n]) for n in step.pert}
    guard = step.grad_norm.double().clone()
    for code in codes:
        idx = torch.nonzero(step.hp.method == code).flatten()
        sub = step.select(idx)
        sub.state = state[code].select(idx) if code in state else None
        d, gd = RULES[code].first_step(sub)
        for n in step.pert:
            delta[n].index_copy_(0, idx, d[n])
        guard.index_copy_(0, idx, gd.double())
        if code in state:
            state[code].put_(idx, sub.state)
    return delta, guard


def descent_(first: Params, grads: Params, specs: Mapping[str, ParamSpec], hp: HeadHparams,
             state: MethodStates | None, pert: Perturbation, active: Tensor) -> None:
    """The gradient each head steps with, in place in ``grads`` (which holds the second gradient where
    ``pert.second``, the first elsewhere): GSAM's g_p − α g⊥, LookSAM's g_v bookkeeping and reuse. ``first``: the
    gradients at θ; ``active``: the heads that step now."""
    names = [n for n in grads if grads[n] is not None]
    for code in sorted(set(hp.host["method"]) - {NONE}):
        rule = RULES[code]
        if rule.descent is None:
            continue
        d = Descent(first, {n: grads[n] for n in names}, [n for n in names if specs[n].perturb],
                    [n for n in names if not specs[n].perturb], hp, pert.second, pert.applied,
                    active & (hp.method == code), (state or {}).get(code))
        grads.update(rule.descent(d))


def method_checkpoint(state: MethodStates | None, hp: HeadHparams, k: int, names: Sequence[str]) -> dict[str, Any]:
    """Head k's method state as its class's ``state_dict()["sam"]`` holds it (tensors by parameter index)."""
    code = int(hp.method[k])
    st = (state or {}).get(code)
    if st is None:
        return {}
    rule = RULES[code]
    out: dict[str, Any] = {}
    if rule.counts_steps:
        out["steps"] = int(st.count[k])
    if rule.state_key is not None and bool(st.has[k]):
        out[rule.state_key] = {i: st.tensors[n][k].clone() for i, n in enumerate(names) if n in st.tensors}
    return out


def load_method_checkpoint_(state: MethodStates | None, hp: HeadHparams, k: int, sam: Mapping[str, Any],
                            names: Sequence[str]) -> None:
    """Put head k's ``method_checkpoint`` back into the pack's method state."""
    code = int(hp.method[k])
    st = (state or {}).get(code)
    if st is None:
        return
    rule = RULES[code]
    if rule.counts_steps:
        st.count[k] = int(sam.get("steps", 0))
    saved = sam.get(rule.state_key) if rule.state_key is not None else None
    if saved:
        for i, value in saved.items():
            st.tensors[names[int(i)]][k].copy_(value)
        st.has[k] = True
