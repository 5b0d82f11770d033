"""A run's training state and its checkpoint codec (core, no I/O).

``LoopState`` is what the loop carries from one step to the next (counters, recent losses, the best head so far);
``TrainingState`` is the whole state of a run at a step: its head, its optimizer state (the base optimizer's
moments, in the layout of its torch ``state_dict``), the RNG state right after its initialisation, and its
LoopState. ``encode_checkpoint`` turns it into a checkpoint's two halves and ``decode_checkpoint`` back:

    tensors (safetensors)   model.<name>  the head's weights        best.<name>  the best head so far
                            rng.<device>  the RNG state             optim.<...>  the optimizer state's tensors
    meta (JSON)             config_hash, config   what a resume must match
                            optimizer    the optimizer state, its tensors replaced by their keys (``flatten_state``)
                            train_state  the LoopState (``LoopState.to_json``)

Checkpoints written before this codec also hold a ``scheduler`` entry that nothing reads; they decode alike.
Under torchrun with a local perturbation, M-SAM's averaged metric is each rank's own: a checkpoint holds one per
rank (``with_rank_metrics``) and each rank resumes from its own (``own_rank_optimizer``).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from align.common import distributed
from align.common.errors import AlignError

LOSS_WINDOW = 10  # training losses averaged into loss_at_step and final_loss
MODEL, BEST, RNG, OPTIMIZER = "model.", "best.", "rng.", "optim"  # the checkpoint's tensor key prefixes
RANK_METRICS = "metric_ema_ranks"  # M-SAM's averaged metric of every rank, in the optimizer state's "sam" part


def rng_state() -> dict[str, Tensor]:
    """The RNG state of the CPU and of every CUDA device, by device name ("cpu", "cuda.0", ...)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = state
    return out


def _window_mean(values: list[float]) -> float | None:
    """Mean of the finite values (None if there is none)."""
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
    plateau: int = 0  # consecutive steps, up to this one, on the uniform plateau (``align.train.collapse``)
    longest_plateau: int | None = 0  # the longest such stretch so far; None: unknown (resumed from a checkpoint
    # written before plateaus were counted, whose earlier steps cannot be recounted)
    wall_before: float = 0.0  # wall time of the run's earlier sessions
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))
    loss_at_step: float | None = None
    best: BestHead = field(default_factory=BestHead)
    max_val: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, Any] | None = None
    diverged: dict[str, Any] | None = None

    def recent_loss(self) -> float | None:
        """Mean training loss over the last ``LOSS_WINDOW`` steps (non-finite ones left out)."""
        return _window_mean(list(self.losses))

    def to_json(self, wall_time_s: float) -> dict[str, Any]:
        return {"step": self.step, "stuck": self.stuck, "plateau": self.plateau,
                "longest_plateau": self.longest_plateau, "recent_losses": list(self.losses),
                "loss_at_step": self.loss_at_step, "max_val": self.max_val, "last_val": self.last_val,
                "wall_time_s": wall_time_s,
                "best": {"step": self.best.step, "score": self.best.score, "val": self.best.val},
                "diverged": self.diverged}

    @classmethod
    def from_json(cls, ts: dict[str, Any], best_state: dict[str, Tensor] | None) -> "LoopState":
        counted = "longest_plateau" in ts  # an older checkpoint has neither plateau key
        state = cls(step=ts["step"], stuck=ts["stuck"], plateau=ts["plateau"] if counted else 0,
                    longest_plateau=ts["longest_plateau"] if counted else None, wall_before=ts["wall_time_s"],
                    loss_at_step=ts["loss_at_step"], max_val=ts["max_val"], last_val=ts["last_val"],
                    diverged=ts["diverged"])
        state.losses.extend(float("nan") if v is None else v for v in ts["recent_losses"])
        state.best = BestHead(**ts["best"], state=best_state if ts["best"]["step"] is not None else None)
        return state


@dataclass
class TrainingState:
    """A run's whole training state at a step: what one checkpoint holds."""

    head: dict[str, Tensor]  # the head's state_dict
    optimizer: dict[str, Any]  # its optimizer state (``HeadPack.optim_state``'s layout)
    rng: dict[str, Tensor]  # the RNG state right after the head's initialisation (``rng_state``)
    loop: LoopState


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + name: t for name, t in tensors.items()}


def _under(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}


def encode_checkpoint(state: TrainingState, config_hash: str, config: dict[str, Any],
                      wall_time_s: float) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A checkpoint's (tensors, meta) for a run of ``config`` (hashed to ``config_hash``), with the run's wall
    time so far."""
    tensors = _prefixed(MODEL, state.head)
    if state.loop.best.state is not None:
        tensors.update(_prefixed(BEST, state.loop.best.state))
    tensors.update(_prefixed(RNG, state.rng))
    meta = {"config_hash": config_hash, "config": config,
            "optimizer": flatten_state(state.optimizer, OPTIMIZER, tensors),
            "train_state": state.loop.to_json(wall_time_s)}
    return tensors, meta


def decode_checkpoint(tensors: dict[str, Tensor], meta: dict[str, Any], device: torch.device) -> TrainingState:
    """The TrainingState of a checkpoint's (tensors, meta), the best head on ``device``."""
    best = {name: t.to(device) for name, t in _under(BEST, tensors).items()}
    return TrainingState(head=_under(MODEL, tensors), optimizer=unflatten_state(meta["optimizer"], tensors),
                         rng=_under(RNG, tensors), loop=LoopState.from_json(meta["train_state"], best))


def ends_run(meta: dict[str, Any], steps: int) -> bool:
    """Whether a checkpoint (its meta) is its run's last: the run diverged there or reached its last of ``steps``."""
    state = meta["train_state"]
    return state["diverged"] is not None or state["step"] >= steps


def head_weights(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The head's state_dict in a checkpoint's tensors."""
    return _under(MODEL, tensors)


def with_rank_metrics(optimizer: dict[str, Any]) -> dict[str, Any]:
    """``optimizer`` with this rank's M-SAM averaged metric replaced by every rank's, in rank order (a collective:
    every rank of the job calls it)."""
    sam = optimizer.setdefault("sam", {})
    own = sam.pop("metric_ema", None)
    sam[RANK_METRICS] = distributed.gather_objects(None if own is None else {i: t.cpu() for i, t in own.items()})
    return optimizer


def own_rank_optimizer(optimizer: dict[str, Any], job: distributed.Rank, where: str) -> dict[str, Any]:
    """The optimizer state rank ``job`` resumes from: with M-SAM's averaged metric of its own when the checkpoint
    holds one per rank (``with_rank_metrics``); AlignError when it was written by another number of ranks."""
    ranks = optimizer.get("sam", {}).pop(RANK_METRICS, None)
    if ranks is None or all(r is None for r in ranks):
        return optimizer
    if len(ranks) != job.world_size:
        raise AlignError(f"{where} was trained on {len(ranks)} ranks with optim.perturbation=local and M-SAM's "
                         f"averaged metric, one per rank: resume it on {len(ranks)} ranks")
    if ranks[job.rank] is not None:
        optimizer["sam"]["metric_ema"] = ranks[job.rank]
    return optimizer


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
