"""Optimizer math for K heads at once: parameters stacked along a leading K dimension (core, pure).

A pack holds K heads of one architecture. ``params`` maps each parameter name to a tensor [K, ...] (head k's
tensor is ``params[name][k]``) and every per-head hyper-parameter is a [K] tensor (``HeadHparams``), so one pack
can mix learning rates, schedules, weight decays, base optimizers and methods. The functions here are, slice by
slice, the reference classes:

- ``base_step_``: ``torch.optim.SGD`` (momentum, coupled weight decay), ``Adam`` and ``AdamW`` (decoupled decay)
  through torch's fused kernels on each head's slices, with the ``step`` counter and the bias corrections;
- ``perturbation``: the SAM family of ``align.optim.sam`` — SAM, M-SAM (α and the averaged metric β), ASAM
  (T = |θ| + η on weight tensors) and Fisher SAM — with each head's own global gradient norm over its own
  perturbed tensors (``norm_scope`` per head), its own zero/non-finite guard and ``perturb=False`` honoured;
- ``clip_grads_``: ``torch.nn.utils.clip_grad_norm_`` per head.

Hyper-parameters are resolved by building the reference optimizer for each head once (``head_hparams``), so the
defaults and the error messages are the registry's own. The perturbations' scalars are computed in float64 on
[K] tensors and rounded to the parameters' dtype where the reference rounds a Python float; the base step hands
each head's own floats to the fused kernel. Float64 packs agree with the reference to rounding, float32 packs to
a few ulps. Every reduction is taken slice by slice and every update is elementwise, so a head's numbers do not
depend on the other heads of its pack. No I/O.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from align.optim.defaults import BASE_CLASSES
from align.optim.registry import BASE_HPARAMS, create_optimizer, optimizer_info
from align.optim.sam import ASAM, MSAM, SAM, FisherSAM

BASES = tuple(BASE_CLASSES)  # sgd, adam, adamw: the codes are their positions
METHODS = ("none", "sam", "msam", "asam", "fsam")
_METHOD_OF_CLASS = {SAM: "sam", MSAM: "msam", ASAM: "asam", FisherSAM: "fsam"}
SGD, ADAM, ADAMW = (BASES.index(b) for b in ("sgd", "adam", "adamw"))
NONE, M_SAM, M_MSAM, M_ASAM, M_FSAM = range(len(METHODS))

Params = dict[str, Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """How the optimizer treats one stacked parameter: the flags of its param group."""

    decay: bool  # in the weight-decay group (Linear weights)
    perturb: bool  # perturbed by the SAM family (False: the logit scale unless configured)


@dataclass
class HeadHparams:
    """Per-head hyper-parameters, each a [K] tensor: float64 values, int64 codes, bool flags."""

    lr: Tensor  # peak learning rate (the schedule multiplies it)
    weight_decay: Tensor
    momentum: Tensor
    beta1: Tensor
    beta2: Tensor
    eps: Tensor
    grad_clip: Tensor  # max ‖g‖ of the gradient the base optimizer steps with; inf: none
    base: Tensor  # index into BASES
    method: Tensor  # index into METHODS
    rho: Tensor
    eta: Tensor
    alpha: Tensor
    metric_beta: Tensor
    all_trainable: Tensor  # norm_scope == "all_trainable"
    local_perturbation: Tensor  # SAM family under torchrun: δ from the rank's own gradient (optim.perturbation: local)

    @classmethod
    def stack(cls, heads: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> "HeadHparams":
        """From one ``head_hparams`` dict per head."""
        out = {}
        for f in fields(cls):
            values = [h[f.name] for h in heads]
            dtype = torch.int64 if f.name in ("base", "method") else (
                torch.bool if f.name in ("all_trainable", "local_perturbation") else torch.float64)
            out[f.name] = torch.tensor(values, dtype=dtype, device=device)
        return cls(**out)

    @functools.cached_property
    def host(self) -> dict[str, list]:
        """The same values as Python lists (read once: the fused base steps take host scalars)."""
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    def select(self, index: Tensor) -> "HeadHparams":
        """The hyper-parameters of the heads at ``index`` (a pack that drops finished heads)."""
        return HeadHparams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def two_pass(self) -> Tensor:
        """[K] bool: heads of the SAM family (a second forward/backward per step)."""
        return self.method != NONE


def head_hparams(name: str, *, lr: float, base: str | None = None, grad_clip: float | None = None,
                 perturbation: str = "global", **hparams: Any) -> dict[str, Any]:
    """One head's resolved hyper-parameters, read off the reference optimizer ``create_optimizer`` builds from the
    same arguments (its defaults, its ValueErrors). ``grad_clip`` is the SAM family's ``max_grad_norm`` or the
    single-pass clip; ``perturbation`` ("global" | "local") matters only to the SAM family under torchrun."""
    if perturbation not in ("global", "local"):
        raise ValueError(f"perturbation must be global or local, got {perturbation!r}")
    two_pass = optimizer_info(name).two_pass
    if two_pass:
        hparams = dict(hparams, base=base, max_grad_norm=grad_clip)
    else:  # the base optimizers take their own knobs only
        hparams = {k: v for k, v in hparams.items() if k in BASE_HPARAMS}
    opt = create_optimizer(name, [torch.zeros(1, requires_grad=True)], lr=lr, **hparams)
    base_opt = opt.base_optimizer if two_pass else opt
    group = base_opt.param_groups[0]
    b1, b2 = group.get("betas", (0.9, 0.999))
    return {"lr": group["lr"], "weight_decay": group["weight_decay"], "momentum": group.get("momentum", 0.0),
            "beta1": b1, "beta2": b2, "eps": group.get("eps", 1e-8),
            "grad_clip": math.inf if grad_clip is None else float(grad_clip),
            "base": BASES.index(next(k for k, c in BASE_CLASSES.items() if type(base_opt) is c)),
            "method": METHODS.index(_METHOD_OF_CLASS[type(opt)]) if two_pass else NONE,
            "rho": group.get("rho", 0.0), "eta": group.get("eta", 0.0), "alpha": getattr(opt, "alpha", 1.0),
            "metric_beta": getattr(opt, "metric_beta", 0.0),
            "all_trainable": getattr(opt, "norm_scope", "perturbed") == "all_trainable",
            "local_perturbation": two_pass and perturbation == "local"}


# -- helpers --------------------------------------------------------------------------------------------

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


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """[K]: each head's Σᵢ ⟨aᵢ, bᵢ⟩, slice by slice like ``norms``."""
    per = [torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(ta.unbind(0), tb.unbind(0))])
           for ta, tb in zip(a, b)]
    total = per[0]
    for row in per[1:]:
        total = total + row
    return total


def usable(norm: Tensor) -> Tensor:
    """[K] bool: a norm one can divide by (finite and > 0), as ``align.optim.sam._usable``."""
    return torch.isfinite(norm) & (norm > 0)


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(col(mask, a).bool(), a, b)


# -- the base optimizers ----------------------------------------------------------------------------------

def init_state(params: Params, hp: HeadHparams) -> dict[str, dict[str, Tensor]]:
    """Zeroed optimizer state per parameter: ``step`` [K] (float32, as torch keeps it) and the buffers the pack's
    bases need (``momentum_buffer`` for SGD with momentum, ``exp_avg``/``exp_avg_sq`` for Adam and AdamW)."""
    base, momentum = hp.host["base"], hp.host["momentum"]
    sgd_buffers = any(b == SGD and m != 0 for b, m in zip(base, momentum))
    adam = any(b in (ADAM, ADAMW) for b in base)
    out = {}
    for name, p in params.items():
        state = {"step": torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)}
        if sgd_buffers:
            state["momentum_buffer"] = torch.zeros_like(p)
        if adam:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        out[name] = state
    return out


def base_step_(params: Params, grads: Mapping[str, Tensor | None], state: dict[str, dict[str, Tensor]],
               specs: Mapping[str, ParamSpec], hp: HeadHparams, lr: Sequence[float],
               active: Sequence[bool] | None = None) -> None:
    """One step of each head's base optimizer at its scheduled learning rate ``lr`` (one float per head), in place.

    The update is torch's own fused kernel (what ``torch.optim.SGD/Adam/AdamW(fused=True)`` run: coupled decay
    and momentum for SGD, coupled decay for Adam, decoupled θ·(1 − lr·wd) for AdamW, the step count and bias
    corrections), called once per set of heads with equal hyper-parameters, on each head's own slices: elementwise,
    so a head's update does not depend on the others. Heads not ``active`` keep parameters and state exactly;
    parameters without a gradient are skipped.
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

@dataclass
class Perturbation:
    """One first step of every head: θ̃ = θ + δ where ``applied``, and the diagnostics ``SAM.last_stats`` gives."""

    perturbed: Params  # θ̃ for every parameter (θ itself for the tensors and heads left alone)
    applied: Tensor  # [K] bool
    skipped: Tensor  # [K] bool: a zero or non-finite norm skipped the perturbation (SAM.skipped_steps counts it)
    grad_norm: Tensor  # [K] ‖g‖ over the tensors in each head's norm scope (SAM's n)
    delta_norm: Tensor  # [K] ‖δ‖ (0 where not applied)


def perturbation(params: Params, grads: Params, specs: Mapping[str, ParamSpec], hp: HeadHparams,
                 metric: dict[str, Any] | None = None, active: Tensor | None = None,
                 grad_norms: Mapping[str, Tensor] | None = None) -> Perturbation:
    """Each head's SAM-family first step from its gradients at θ (heads of method "none" are left alone).

    ``metric`` is M-SAM's averaged-metric state ({"has": [K] bool, name: m [K, ...]}), updated in place for the
    heads with β > 0 whose gradient is usable; ``init_metric`` makes it. ``grad_norms``: each gradient's
    ``norms`` row, when the caller has them already.
    """
    pert = [n for n in params if specs[n].perturb and grads.get(n) is not None]
    extra = [n for n in params if not specs[n].perturb and grads.get(n) is not None]
    g = {n: grads[n] for n in pert + extra}
    known = [grad_norms[n] for n in pert + extra] if grad_norms is not None else None
    grad_norm = global_norm([g[n] for n in pert + extra], [None] * len(pert) + [hp.all_trainable] * len(extra), known)
    on = hp.two_pass & (hp.rho != 0)
    if active is not None:
        on = on & active
    if not pert or not bool(on.any()):
        zeros = torch.zeros_like(grad_norm)
        return Perturbation(dict(params), on & False, on & False, grad_norm, zeros)
    codes = sorted(set(hp.method[on].tolist()))
    if len(codes) == 1:  # the usual pack: one method, computed on the whole pack
        delta, guard = _RULES[codes[0]](params, g, pert, extra, hp, grad_norm, metric, on)
    else:
        delta, guard = _by_method(params, g, pert, extra, hp, grad_norm, metric, on)
    ok = usable(guard)
    applied, skipped = on & ok, on & ~ok
    everyone = bool(applied.all())  # the usual pack: no selection needed
    out = dict(params)
    for n in pert:
        out[n] = params[n] + delta[n] if everyone else _where(applied, params[n] + delta[n], params[n])
    delta_norm = global_norm([delta[n] for n in pert])
    if not everyone:
        delta_norm = torch.where(applied, delta_norm, torch.zeros_like(delta_norm))
    return Perturbation(out, applied, skipped, grad_norm, delta_norm)


def _by_method(params, g, pert, extra, hp, grad_norm, metric, on):
    """δ and the guard of a pack that mixes methods: each method on its own heads only (rows gathered, computed,
    put back), so a mixed pack costs what its parts cost."""
    delta = {n: torch.zeros_like(params[n]) for n in pert}
    guard = grad_norm.double().clone()
    for code in sorted(set(hp.method[on].tolist())):
        idx = torch.nonzero(hp.method == code).flatten()
        sub = None
        if metric is not None:
            sub = {n: v[idx] for n, v in metric.items()}
        d, gd = _RULES[code]({n: params[n][idx] for n in pert}, {n: g[n][idx] for n in pert + extra}, pert, extra,
                             hp.select(idx), grad_norm[idx], sub, on[idx])
        for n in pert:
            delta[n].index_copy_(0, idx, d[n])
        guard.index_copy_(0, idx, gd.double())
        if metric is not None:
            for n, v in sub.items():
                metric[n].index_copy_(0, idx, v)
    return delta, guard


def _scaled(g: Params, names: list[str], scale: Tensor) -> Params:
    """g · scale per head, the scale rounded to each tensor's dtype (the reference multiplies by a Python float)."""
    return {n: g[n] * col(scale, g[n]) for n in names}


def _sam(params, g, pert, extra, hp, n, metric, mask):
    """SAM: δ = ρ g / ‖g‖."""
    return _scaled(g, pert, hp.rho / n.double()), n


def _msam(params, g, pert, extra, hp, n, metric, mask):
    """M-SAM: δ = ρ g / (‖g‖ √(1 + α²‖g‖²)); with β > 0 the averaged metric (``_averaged_metric``)."""
    nd = n.double()
    a = hp.alpha * nd
    d = _scaled(g, pert, hp.rho / (nd * torch.sqrt(1.0 + a * a)))
    averaged = mask & (hp.metric_beta > 0)
    if not bool(averaged.any()):
        return d, n
    d_avg, root = _averaged_metric(g, pert, extra, hp, n, metric, averaged)
    return {k: _where(averaged, d_avg[k], d[k]) for k in pert}, torch.where(averaged, root, n.to(root.dtype))


def _averaged_metric(g, pert, extra, hp, n, metric, mask):
    """δ = ρ G⁻¹g / √(gᵀG⁻¹g), G = I + α² m mᵀ, m ← β m + (1 − β) g (m = g at first), as ``MSAM``'s Sherman–Morrison
    form; the scope is the perturbed tensors plus, for heads with norm_scope all_trainable, the others."""
    if metric is None:
        raise ValueError("M-SAM with metric_beta > 0 needs its metric state (init_metric)")
    scope = pert + extra
    ok = mask & usable(n)  # a zero or non-finite gradient neither perturbs nor enters m
    sg = {k: g[k] if k in pert else _where(hp.all_trainable, g[k], torch.zeros_like(g[k])) for k in scope}
    for k in scope:
        blended = metric[k] * col(hp.metric_beta, metric[k]) + col(1 - hp.metric_beta, sg[k]) * sg[k]
        metric[k].copy_(_where(ok, _where(metric["has"], blended, sg[k]), metric[k]))
    metric["has"] |= ok
    m = {k: metric[k] for k in scope}
    a2 = hp.alpha * hp.alpha
    mm = global_norm([m[k] for k in scope]).double() ** 2
    mg = _dot([m[k] for k in scope], [sg[k] for k in scope]).double()
    safe_mm = torch.where(mm > 0, mm, torch.ones_like(mm))
    k_ = mg / safe_mm  # g = k m + r with r ⊥ m
    r = {k: sg[k] + col(-k_, sg[k]) * m[k] for k in scope}
    shrink = k_ / (1.0 + a2 * mm)
    q = torch.where(mm > 0, global_norm([r[k] for k in scope]).double() ** 2 + shrink * mg, n.double() ** 2)
    direction = {k: _where(mm > 0, r[k] + col(shrink, m[k]) * m[k], g[k]) for k in pert}
    root = torch.sqrt(q)
    root = torch.where(usable(n), root, n.double())
    return _scaled(direction, pert, hp.rho / root), root


def init_metric(params: Params, specs: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """M-SAM's averaged-metric state for a pack: m = 0 and no head started yet (``has`` False)."""
    k = next(iter(params.values())).shape[0]
    out: dict[str, Any] = {n: torch.zeros_like(p) for n, p in params.items()}
    out["has"] = torch.zeros(k, dtype=torch.bool, device=next(iter(params.values())).device)
    return out


def _asam(params, g, pert, extra, hp, n, metric, mask):
    """ASAM: δ = ρ T² g / ‖T g‖ with T = |θ| + η on weight tensors, T = 1 elsewhere."""
    t = {k: params[k].detach().abs() + col(hp.eta, params[k]) for k in pert if _matrix(params, k)}
    tg = {k: g[k] * t[k] if k in t else g[k] for k in pert}
    nv = global_norm([tg[k] for k in pert])
    direction = {k: tg[k] * t[k] if k in t else tg[k] for k in pert}
    return _scaled(direction, pert, hp.rho / nv.double()), nv


def _fsam(params, g, pert, extra, hp, n, metric, mask):
    """Fisher SAM: δ = ρ F⁻¹g / √(gᵀF⁻¹g), F⁻¹ = 1 / (1 + η g²)."""
    denom = {k: g[k] * g[k] * col(hp.eta, g[k]) + 1.0 for k in pert}
    f_inv_g = {k: g[k] / denom[k] for k in pert}
    nv = global_norm([g[k] / denom[k].sqrt() for k in pert])
    return _scaled(f_inv_g, pert, hp.rho / nv.double()), nv


def _matrix(params: Params, name: str) -> bool:
    return params[name].ndim > 2  # [K, ...]: a weight tensor of one head has ndim > 1


_RULES = {M_SAM: _sam, M_MSAM: _msam, M_ASAM: _asam, M_FSAM: _fsam}
