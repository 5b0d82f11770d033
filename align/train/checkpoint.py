"""The training state a checkpoint holds, as tensors and JSON (core, no I/O): the loop's counters and best
head (``LoopState``), the RNG state, and nested optimizer state flattened into both (``flatten_state`` /
``unflatten_state``).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

LOSS_WINDOW = 10


def _rng_tensors() -> dict[str, Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    return out


def _finite(state: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def _window_mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


@dataclass
class BestHead:
    """The head with the best validation score so far."""

    step: int | None = None
    score: float | None = None
    val: dict[str, float] | None = None
    state: dict[str, Tensor] | None = None


@dataclass
class LoopState:
    """Everything the loop carries from one step to the next; a checkpoint stores it (``to_json``/``from_json``)."""

    step: int = 0
    stuck: int = 0  # consecutive collapsed steps
    wall_before: float = 0.0  # wall time of the run's earlier sessions
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))
    loss_at_step: float | None = None
    best: BestHead = field(default_factory=BestHead)
    max_val: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, Any] | None = None
    diverged: dict[str, Any] | None = None

    def to_json(self, wall_time_s: float) -> dict[str, Any]:
        return {"step": self.step, "stuck": self.stuck, "recent_losses": list(self.losses),
                "loss_at_step": self.loss_at_step, "max_val": self.max_val, "last_val": self.last_val,
                "wall_time_s": wall_time_s,
                "best": {"step": self.best.step, "score": self.best.score, "val": self.best.val},
                "diverged": self.diverged}

    @classmethod
    def from_json(cls, ts: dict[str, Any], best_state: dict[str, Tensor] | None) -> "LoopState":
        state = cls(step=ts["step"], stuck=ts["stuck"], wall_before=ts["wall_time_s"],
                    loss_at_step=ts["loss_at_step"], max_val=ts["max_val"], last_val=ts["last_val"],
                    diverged=ts["diverged"])
        state.losses.extend(float("nan") if v is None else v for v in ts["recent_losses"])
        state.best = BestHead(**ts["best"], state=best_state if ts["best"]["step"] is not None else None)
        return state


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj`` whose tensors are moved into ``tensors`` under keys starting with ``prefix``.

    Handles what optimizer/scheduler ``state_dict``s contain: dicts with int or str keys, lists, tuples,
    tensors, numbers (including inf/nan), strings, bools and None.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        items = [[flatten_state(k, f"{prefix}.k{i}", tensors), flatten_state(v, f"{prefix}.{i}", tensors)]
                 for i, (k, v) in enumerate(obj.items())]
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {prefix})")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        raise ValueError(f"unknown checkpoint node {sorted(obj)}")
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj
