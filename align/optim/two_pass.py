"""The SAM family's shared machinery (core): ``SharpnessAware``, the two-pass ``torch.optim.Optimizer`` every method
of ``align.optim`` subclasses, and the norms its rules share. A method's file holds what differs: its perturbation
δ(g) (``_perturbation``), and where it has one, what it does to the gradient the base optimizer steps with
(``_descent_``: GSAM, LookSAM) or which steps take a second pass (``second_pass_due``: LookSAM).

A step:
  1. gradient g at θ;  2. perturb θ̃ = θ + δ(g);  3. gradient g̃ at θ̃;
  4. restore θ by exact copy (never by subtracting δ back), then the base optimizer steps with g̃.

‖g‖ is one global norm over every perturbed parameter of every group. A param group with ``perturb=False``
(e.g. a contrastive logit scale) is never perturbed; it counts in the norm only with ``norm_scope="all_trainable"``
(the paper's n is over all trainable parameters; SAM, M-SAM and GSAM take it). A zero or non-finite norm skips the
perturbation for that step (``skipped_steps`` counts them) so weights never become NaN through δ.

M-SAM is not invariant to the scale of the loss (‖g‖ enters through √(1+‖g‖²)): anything that rescales the
gradient before ``first_step`` changes its perturbation — AMP loss scaling (unscale first, see below), gradient
clipping, the loss reduction, gradient-accumulation division. Clipping is therefore applied to the gradient the
base optimizer steps with (``max_grad_norm``), never to the first.

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

from align.optim.hparams import Hparam

DEFAULT_BASE_CLASS = torch.optim.AdamW  # the base of the training configs; the toy experiments pass plain SGD
RHO_DOC = "radius of the perturbation"


def norm_of(tensors: list[Tensor]) -> Tensor:
    """‖concat(tensors)‖₂ as a 0-d tensor (float64 if any input is, else float32), one multi-tensor kernel."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)
    if any(n.dtype != norms[0].dtype for n in norms) or norms[0].dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        norms = [n.to(dtype) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def dot_of(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σᵢ ⟨aᵢ, bᵢ⟩ over two tensor lists as a 0-d tensor (float64 if any input is, else float32)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in (*a, *b)) else torch.float32
    return torch.stack([torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)]).sum()


def usable_norm(norm: float) -> bool:
    """A norm we can divide by: finite and non-zero."""
    return math.isfinite(norm) and norm > 0.0


class SharpnessAware(Optimizer):
    """The two-pass machinery around any base optimizer; subclasses give ``_perturbation``.

    ``Cls(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)`` builds the base optimizer on the same param
    groups; ``Cls(params, built_base_optimizer, rho=0.05)`` wraps an existing one (params must be its params or
    None). Param groups are shared with the base optimizer, so LR schedulers and per-group ``rho`` just work.
    ``max_grad_norm`` clips the gradient the base optimizer steps with — clipping the first would change the
    perturbation, and for M-SAM its very size. ``norm_scope`` says which gradients make up ‖g‖ where the method
    takes it (``takes_norm_scope``): "perturbed" (default) or "all_trainable".
    """

    takes_norm_scope = False  # SAM, M-SAM, GSAM: ‖g‖ sets their radius; the others normalise their own vector
    group_hparams: tuple[Hparam, ...] = ()  # the method's knobs kept per param group besides ρ (ASAM's η)

    def __init__(self, params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer = DEFAULT_BASE_CLASS,
                 rho: float = 0.05, max_grad_norm: float | None = None, norm_scope: str = "perturbed",
                 **base_kwargs: Any) -> None:
        if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        if norm_scope not in ("perturbed", "all_trainable"):
            raise ValueError(f"norm_scope must be one of perturbed, all_trainable, got {norm_scope!r}")
        if norm_scope != "perturbed" and not self.takes_norm_scope:
            # They normalise their own vector (‖Tg‖, √(gᵀF⁻¹g), ‖d‖) over the perturbed tensors: ‖g‖ sets nothing.
            raise ValueError(f"norm_scope={norm_scope!r} applies to SAM, M-SAM and GSAM only")
        self.norm_scope = norm_scope
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        extra = {h.name: h.check(base_kwargs.pop(h.name, h.default)) for h in self.group_hparams}
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

    # -- what the methods change --------------------------------------------------------------------------
    def _perturbation(self, params: list[Tensor], grads: list[Tensor], groups: list[dict],
                      grad_norm: float) -> tuple[list[Tensor], float]:
        """δ for each tensor, and the norm whose zero/non-finite value must skip the step (SAM: ‖g‖)."""
        raise NotImplementedError

    @property
    def second_pass_due(self) -> bool:
        """Whether the coming step takes a gradient at θ + δ (LookSAM: only every k-th step)."""
        return True

    def _remember_first(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """Keep what ``_descent_`` needs of the first gradient (GSAM, LookSAM); called by every ``first_step``."""

    def _descent_(self) -> None:
        """Turn ``.grad`` (restored θ; the gradient at θ + δ, or at θ on a step without a second pass) into the
        gradient the base optimizer steps with, in place, before clipping (GSAM, LookSAM)."""

    def _save_extra(self, sam: dict[str, Any]) -> None:
        """Add the method's own state to ``state_dict()["sam"]`` (tensors by parameter index)."""

    def _load_extra(self, sam: dict[str, Any]) -> None:
        """Read back what ``_save_extra`` wrote."""

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
        """Move the weights to θ + δ(g) using the gradients currently in ``.grad`` (on a step without a second
        pass, ``second_pass_due`` False, nothing moves: keep the gradients, ``zero_grad=False``)."""
        params, grads, groups = self._collect()
        counted = grads + [p.grad for p in self._norm_only_params()]
        grad_norm = norm_of(counted).item()  # the one host sync per step: the guard needs it
        self._backup, self._perturbed = [], []
        self._remember_first(params, grads)
        if not params or all(g["rho"] == 0 for g in groups) or not self.second_pass_due:
            self._record(grad_norm, None, skipped=False)
        else:
            delta, guard = self._perturbation(params, grads, groups, grad_norm)
            if not usable_norm(guard):
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
        if scaler is not None and (self.max_grad_norm is not None or type(self)._descent_ is not
                                   SharpnessAware._descent_):
            scaler.unscale_(self.base_optimizer)  # clipping and a descent rule need the true gradient
        self._descent_()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.max_grad_norm)
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True  # tells torch LR schedulers that this optimizer stepped (no spurious warning)
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """Both passes (one where ``second_pass_due`` is False); ``closure`` does forward + backward and returns
        the loss. Returns the loss at θ."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure (forward + backward) "
                             "or use first_step() / second_step()")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        due = self.second_pass_due
        self.first_step(zero_grad=due)
        if due:
            closure()
        self.second_step()
        return loss

    # -- diagnostics and checkpoints ------------------------------------------------------------------
    def _record(self, grad_norm: float, delta: list[Tensor] | None, skipped: bool) -> None:
        # ‖δ‖ stays a device tensor until someone reads last_stats: no extra host sync per step.
        self._stats = {"grad_norm": grad_norm, "skipped": skipped,
                       "delta_norm": norm_of(delta) if delta else None}

    @property
    def last_stats(self) -> dict[str, float | bool]:
        """‖g‖, ‖δ‖ and effective radius ‖δ‖/‖g‖ (ρ/‖g‖ for SAM, ρ/(‖g‖√(1+‖g‖²)) for M-SAM) of the last first_step."""
        if not self._stats:
            return {}
        n = float(self._stats["grad_norm"])
        d = float(self._stats["delta_norm"]) if self._stats["delta_norm"] is not None else 0.0
        return {"grad_norm": n, "perturbation_norm": d, "effective_radius": d / n if n > 0 else 0.0,
                "skipped": bool(self._stats["skipped"])}

    def param_order(self) -> list[Tensor]:
        """Every parameter over all groups, in the order ``state_dict`` indexes them."""
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's full state (moments, step counts) plus our own counters and the method's state."""
        state = self.base_optimizer.state_dict()
        state["sam"] = {"skipped_steps": self.skipped_steps}
        self._save_extra(state["sam"])
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        ours = state.pop("sam", {})
        self.base_optimizer.load_state_dict(state)
        # The base rebuilt its group dicts; share them again so schedulers see one set of groups.
        self.param_groups = self.base_optimizer.param_groups
        self.skipped_steps = int(ours.get("skipped_steps", 0))
        self._load_extra(ours)

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base_optimizer.state if hasattr(self, "base_optimizer") else self._own_state

    @state.setter
    def state(self, value: Any) -> None:
        self._own_state = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, groups={len(self.param_groups)})"


def tensors_by_index(opt: SharpnessAware, saved: dict[Any, Tensor]) -> dict[Tensor, Tensor]:
    """Tensors saved by parameter index (``state_dict``) → by parameter, as copies on its device and dtype."""
    order = opt.param_order()
    return {order[int(i)]: t.detach().to(device=order[int(i)].device, dtype=order[int(i)].dtype, copy=True)
            for i, t in saved.items()}


def tensors_to_index(opt: SharpnessAware, by_param: dict[Tensor, Tensor]) -> dict[int, Tensor]:
    """The inverse of ``tensors_by_index``: tensors keyed by their parameter's index over all groups."""
    index = {p: i for i, p in enumerate(opt.param_order())}
    return {index[p]: t for p, t in by_param.items()}


def _flatten_params(params: Iterable[Any]) -> list[Tensor]:
    out: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"])
        else:
            out.append(item)
    return out
