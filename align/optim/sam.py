"""Sharpness-aware optimizers: SAM and the variants that differ only in the perturbation rule.

Every method takes two forward/backward passes per step:
  1. gradient g at θ;  2. perturb θ̃ = θ + δ(g);  3. gradient g̃ at θ̃;
  4. restore θ by exact copy (never by subtracting δ back), then the base optimizer steps with g̃.

| class      | δ                                                                              |
|------------|--------------------------------------------------------------------------------|
| SAM        | ρ g / ‖g‖                                                                      |
| MSAM       | ρ g / (‖g‖ √(1+‖g‖²))   (Monge metric G = I + g gᵀ; δᵀGδ = ρ²)                 |
| ASAM       | ρ T² g / ‖T g‖, T = |θ| + η on weight tensors (ndim > 1), T = 1 elsewhere       |
| FisherSAM  | ρ F⁻¹g / √(gᵀF⁻¹g), diagonal F⁻¹ = 1 / (1 + η g²)                              |

‖g‖ is one global norm over every perturbed parameter of every group. A param group with ``perturb=False``
(e.g. a contrastive logit scale) is never perturbed; it counts in the norm only with ``norm_scope="all_trainable"``
(the paper's n is over all trainable parameters). A zero or non-finite norm skips
the perturbation for that step (``skipped_steps`` counts them) so weights never become NaN through δ.

M-SAM is not invariant to the scale of the loss (‖g‖ enters through √(1+‖g‖²)): anything that rescales the
gradient before ``first_step`` changes its perturbation — AMP loss scaling (unscale first, see below), gradient
clipping, the loss reduction, gradient-accumulation division. Clipping is therefore applied to the second
gradient only (``max_grad_norm``), never to the first.

Mixed precision with ``torch.amp.GradScaler``::

    scaler.scale(closure_loss()).backward()
    scaler.unscale_(opt)                      # true gradient: a scaled one would make M-SAM plain GD
    opt.first_step(zero_grad=True)            # non-finite (overflowed) gradients skip the perturbation
    scaler.scale(closure_loss()).backward()
    opt.second_step(zero_grad=True, scaler=scaler)   # unscale, clip, scaler.step(base); skipped on overflow
    scaler.update()

With bf16 autocast no scaler is needed: call ``first_step`` / ``second_step`` as usual.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from align.optim.defaults import ASAM_DEFAULTS, DEFAULT_BASE_CLASS, FSAM_DEFAULTS, MSAM_DEFAULTS, SAM_DEFAULTS


NORM_SCOPES = ("perturbed", "all_trainable")


def _global_norm(tensors: list[Tensor]) -> Tensor:
    """‖concat(tensors)‖₂ as a 0-d tensor (float64 if any input is, else float32), one multi-tensor kernel."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)
    if any(n.dtype != norms[0].dtype for n in norms) or norms[0].dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        norms = [n.to(dtype) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def _global_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σᵢ ⟨aᵢ, bᵢ⟩ over two tensor lists as a 0-d tensor (float64 if any input is, else float32)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in (*a, *b)) else torch.float32
    return torch.stack([torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)]).sum()


class SAM(Optimizer):
    """Sharpness-Aware Minimization (Foret et al., 2021) wrapped around any base optimizer.

    ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)`` builds the base optimizer on the same param
    groups; ``SAM(params, built_base_optimizer, rho=0.05)`` wraps an existing one (params must be its params or
    None). Param groups are shared with the base optimizer, so LR schedulers and per-group ``rho`` just work.
    ``max_grad_norm`` clips the SECOND gradient (the one the base optimizer steps with) — clipping the first
    would change the perturbation, and for M-SAM its very size.
    ``norm_scope`` says which gradients make up ‖g‖, the norm that sets SAM's and M-SAM's radius: "perturbed"
    (default) or "all_trainable", which also counts groups with ``perturb=False`` (still never perturbed).
    """

    def __init__(self, params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer = DEFAULT_BASE_CLASS,
                 rho: float = SAM_DEFAULTS["rho"], max_grad_norm: float | None = None,
                 norm_scope: str = SAM_DEFAULTS["norm_scope"],
                 **base_kwargs: Any) -> None:
        if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        if norm_scope not in NORM_SCOPES:
            raise ValueError(f"norm_scope must be one of {', '.join(NORM_SCOPES)}, got {norm_scope!r}")
        if norm_scope != "perturbed" and isinstance(self, _RegularisedSAM):
            # ASAM and Fisher SAM normalise by ‖Tg‖ / √(gᵀF⁻¹g) over the perturbed tensors: ‖g‖ sets nothing.
            raise ValueError(f"norm_scope={norm_scope!r} applies to SAM and M-SAM only")
        self.norm_scope = norm_scope
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        extra = self._extra_defaults(base_kwargs)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise ValueError(f"base optimizer is already built; unexpected arguments {sorted(base_kwargs)}")
            if params is not None:
                given = {id(p) for p in _flatten_params(params)}
                owned = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
                if given != owned:
                    raise ValueError("params must be the parameters of the given base optimizer (or None)")
            self.base_optimizer = base_optimizer
            # Registering the base's own group dicts shares them: setdefault adds rho without copying.
            super().__init__(base_optimizer.param_groups, dict(rho=rho, **extra))
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise ValueError("params are required when base_optimizer is a class")
            super().__init__(params, dict(rho=rho, **extra))
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError("base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                            f"got {type(base_optimizer).__name__}")
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.max_grad_norm = max_grad_norm
        self.skipped_steps = 0
        self._backup: list[Tensor] = []
        self._perturbed: list[Tensor] = []
        self._stats: dict[str, Any] = {}

    # -- the one thing the variants change ------------------------------------------------------------
    def _extra_defaults(self, base_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Hyper-parameters of the perturbation rule taken out of ``base_kwargs`` (e.g. ASAM's η)."""
        return {}

    def _perturbation(self, params: list[Tensor], grads: list[Tensor], groups: list[dict],
                      grad_norm: float) -> tuple[list[Tensor], float]:
        """δ for each tensor, and the norm whose zero/non-finite value must skip the step (SAM: ‖g‖)."""
        scale = [g["rho"] / grad_norm for g in groups] if _usable(grad_norm) else [0.0] * len(groups)
        return torch._foreach_mul(grads, scale), grad_norm

    # -- the two passes -------------------------------------------------------------------------------
    def _collect(self) -> tuple[list[Tensor], list[Tensor], list[dict]]:
        params, grads, groups = [], [], []
        for group in self.param_groups:
            if not group.get("perturb", True):
                continue
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
                    groups.append(group)
        return params, grads, groups

    def _norm_only_params(self) -> list[Tensor]:
        """Parameters with a gradient that count in ‖g‖ without being perturbed (``norm_scope="all_trainable"``)."""
        if self.norm_scope != "all_trainable":
            return []
        return [p for g in self.param_groups if not g.get("perturb", True) for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move the weights to θ + δ(g) using the gradients currently in ``.grad``."""
        params, grads, groups = self._collect()
        counted = grads + [p.grad for p in self._norm_only_params()]
        grad_norm = _global_norm(counted).item()  # the one host sync per step: the guard needs it
        self._backup, self._perturbed = [], []
        if not params or all(g["rho"] == 0 for g in groups):
            self._record(grad_norm, None, skipped=False)
        else:
            delta, guard = self._perturbation(params, grads, groups, grad_norm)
            if not _usable(guard):
                self.skipped_steps += 1
                self._record(grad_norm, None, skipped=True)
            else:
                self._backup = self._backup_buffers(params)
                torch._foreach_copy_(self._backup, params)
                self._perturbed = params
                torch._foreach_add_(params, delta)
                self._record(grad_norm, delta, skipped=False)
        if zero_grad:
            self.zero_grad()

    def _backup_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """Reusable copies of θ (allocated once per set of parameters), so restoring is an exact copy."""
        key = tuple(id(p) for p in params)
        if getattr(self, "_buffer_key", None) != key:
            self._buffer_key, self._buffers = key, [torch.empty_like(p) for p in params]
        return self._buffers

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: "torch.amp.GradScaler | None" = None) -> None:
        """Restore θ exactly, then let the base optimizer step with the gradient taken at θ + δ."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, self._backup)
            self._backup, self._perturbed = [], []
        if self.max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(self.base_optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.max_grad_norm)
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True  # tells torch LR schedulers that this optimizer stepped (no spurious warning)
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """Both passes; ``closure`` does forward + backward and returns the loss. Returns the loss at θ."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure (forward + backward) "
                             "or use first_step() / second_step()")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    # -- diagnostics and checkpoints ------------------------------------------------------------------
    def _record(self, grad_norm: float, delta: list[Tensor] | None, skipped: bool) -> None:
        # ‖δ‖ stays a device tensor until someone reads last_stats: no extra host sync per step.
        self._stats = {"grad_norm": grad_norm, "skipped": skipped,
                       "delta_norm": _global_norm(delta) if delta else None}

    @property
    def last_stats(self) -> dict[str, float | bool]:
        """‖g‖, ‖δ‖ and effective radius ‖δ‖/‖g‖ (ρ/‖g‖ for SAM, ρ/(‖g‖√(1+‖g‖²)) for M-SAM) of the last first_step."""
        if not self._stats:
            return {}
        n = float(self._stats["grad_norm"])
        d = float(self._stats["delta_norm"]) if self._stats["delta_norm"] is not None else 0.0
        return {"grad_norm": n, "perturbation_norm": d, "effective_radius": d / n if n > 0 else 0.0,
                "skipped": bool(self._stats["skipped"])}

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's full state (moments, step counts) plus our own counters."""
        state = self.base_optimizer.state_dict()
        state["sam"] = {"skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        ours = state.pop("sam", {})
        self.base_optimizer.load_state_dict(state)
        # The base rebuilt its group dicts; share them again so schedulers see one set of groups.
        self.param_groups = self.base_optimizer.param_groups
        self.skipped_steps = int(ours.get("skipped_steps", 0))

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base_optimizer.state if hasattr(self, "base_optimizer") else self._own_state

    @state.setter
    def state(self, value: Any) -> None:
        self._own_state = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, groups={len(self.param_groups)})"


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
                 *args: Any, alpha: float = MSAM_DEFAULTS["alpha"], metric_beta: float = MSAM_DEFAULTS["metric_beta"],
                 **kwargs: Any) -> None:
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not isinstance(metric_beta, (int, float)) or not 0.0 <= metric_beta < 1.0:
            raise ValueError(f"metric_beta must be in [0, 1), got {metric_beta!r}")
        self.alpha, self.metric_beta = float(alpha), float(metric_beta)
        self._metric_ema: dict[Tensor, Tensor] = {}
        super().__init__(params, base_optimizer, *args, **kwargs)

    def _perturbation(self, params, grads, groups, grad_norm):
        if self.metric_beta > 0.0:
            return self._averaged_metric_perturbation(params, grads, groups, grad_norm)
        n = grad_norm
        a = self.alpha * n  # α = 1: a is n exactly, so the scale is the paper's ρ / (n √(1 + n n)) bit for bit
        scale = [g["rho"] / (n * math.sqrt(1.0 + a * a)) for g in groups] if _usable(n) else [0.0] * len(groups)
        return torch._foreach_mul(grads, scale), n

    def _averaged_metric_perturbation(self, params: list[Tensor], grads: list[Tensor], groups: list[dict],
                                      grad_norm: float) -> tuple[list[Tensor], float]:
        """δ = ρ G⁻¹g / √(gᵀG⁻¹g) with G = I + α² m mᵀ; returns δ and √(gᵀG⁻¹g) (the guard)."""
        if not _usable(grad_norm):
            return [], grad_norm  # a zero or non-finite gradient neither perturbs nor enters m
        extra = self._norm_only_params()
        scope_g = grads + [p.grad for p in extra]
        m = self._update_metric(params + extra, scope_g)
        a2 = self.alpha * self.alpha
        mm = _global_norm(m).item() ** 2
        direction, q = grads, grad_norm * grad_norm  # m = 0: G = I, SAM
        if mm > 0.0:
            mg = _global_dot(m, scope_g).item()
            k = mg / mm  # g = k m + r with r ⊥ m
            r = torch._foreach_add(scope_g, m, alpha=-k)
            shrink = k / (1.0 + a2 * mm)
            q = _global_norm(r).item() ** 2 + shrink * mg
            direction = torch._foreach_add(r[:len(grads)], m[:len(grads)], alpha=shrink)  # G⁻¹g, perturbed part
        root = math.sqrt(q)
        if not _usable(root):
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

    def state_dict(self) -> dict[str, Any]:
        """SAM's state plus the metric average m (β > 0), keyed by the parameter's index over all groups."""
        state = super().state_dict()
        if self._metric_ema:
            index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            state["sam"]["metric_ema"] = {index[p]: m for p, m in self._metric_ema.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """SAM's state, then m onto the matching parameters (their device and dtype)."""
        saved = state_dict.get("sam", {}).get("metric_ema", {})
        super().load_state_dict(state_dict)
        order = [p for g in self.param_groups for p in g["params"]]
        self._metric_ema = {order[int(i)]: m.detach().to(device=order[int(i)].device, dtype=order[int(i)].dtype,
                                                         copy=True) for i, m in saved.items()}


class _RegularisedSAM(SAM):
    """A SAM variant with a regulariser η >= 0 kept in each param group (per-group values allowed)."""

    def _extra_defaults(self, base_kwargs):
        eta = base_kwargs.pop("eta")
        if not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        return {"eta": eta}


class ASAM(_RegularisedSAM):
    """Adaptive SAM (Kwon et al., 2021): δ = ρ T² g / ‖T g‖ with T = |θ| + η on weight tensors, T = 1 elsewhere.

    Following the ASAM code, T acts on weight tensors (ndim > 1) only; biases and norm scales use T = I.
    """

    def __init__(self, params, base_optimizer=DEFAULT_BASE_CLASS, rho: float = ASAM_DEFAULTS["rho"],
                 eta: float = ASAM_DEFAULTS["eta"], **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, eta=eta, **kwargs)

    def _perturbation(self, params, grads, groups, grad_norm):
        t = [p.detach().abs().add_(g["eta"]) if p.ndim > 1 else None for p, g in zip(params, groups)]
        w_idx = [i for i, ti in enumerate(t) if ti is not None]
        tg = list(grads)
        if w_idx:
            scaled = torch._foreach_mul([grads[i] for i in w_idx], [t[i] for i in w_idx])
            for i, s in zip(w_idx, scaled):
                tg[i] = s
        nv = _global_norm(tg).item()
        # T (T g) for weights, g for the rest; then × ρ / ‖T g‖ per tensor.
        direction = list(tg)
        if w_idx:
            twice = torch._foreach_mul([tg[i] for i in w_idx], [t[i] for i in w_idx])
            for i, s in zip(w_idx, twice):
                direction[i] = s
        scale = [g["rho"] / nv for g in groups] if _usable(nv) else [0.0] * len(groups)
        return torch._foreach_mul(direction, scale), nv


class FisherSAM(_RegularisedSAM):
    """Fisher SAM (Kim et al., 2022), diagonal Fisher F = g²: δ = ρ F⁻¹g / √(gᵀF⁻¹g), F⁻¹ = 1/(1 + η g²)."""

    def __init__(self, params, base_optimizer=DEFAULT_BASE_CLASS, rho: float = FSAM_DEFAULTS["rho"],
                 eta: float = FSAM_DEFAULTS["eta"], **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, eta=eta, **kwargs)

    def _perturbation(self, params, grads, groups, grad_norm):
        denom = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(denom, [g["eta"] for g in groups])
        torch._foreach_add_(denom, 1.0)                       # 1 + η g²  (= 1 / F⁻¹)
        f_inv_g = torch._foreach_div(grads, denom)            # F⁻¹ g
        nv = _global_norm(torch._foreach_div(grads, torch._foreach_sqrt(denom))).item()  # √(gᵀF⁻¹g)
        scale = [g["rho"] / nv for g in groups] if _usable(nv) else [0.0] * len(groups)
        torch._foreach_mul_(f_inv_g, scale)
        return f_inv_g, nv


def _usable(norm: float) -> bool:
    """A norm we can divide by: finite and non-zero."""
    return math.isfinite(norm) and norm > 0.0


def _flatten_params(params: Iterable[Any]) -> list[Tensor]:
    out: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"])
        else:
            out.append(item)
    return out
