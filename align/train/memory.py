"""How much memory a head takes (orchestration): one model of what a run holds — or one head of a pack — and the
check that refuses a head too large for the device before anything is allocated. ``align train`` checks its run
with it, ``align eval`` the head it loads, and a study sizes its packs by it (``align.study.packing.pack_limit``).

What one head holds while it trains, in float32 values (``HeadMemory``):

    weights          every parameter and buffer of the head, trainable or frozen
    optimizer state  ``buffers`` copies of each trainable value (Adam's two moments, SGD's momentum, Lion's one)
    gradients        a copy of each trainable value per pass (the SAM family takes two)
    SAM point and δ  two more copies in the SAM family: the weights saved before the perturbation, and δ
    averaged metric  one copy for a method's own state: M-SAM's metric average (metric_beta > 0), Friendly
                     SAM's gradient average, LookSAM's orthogonal component
    activations      kept for the backward pass, per side: the input norm, the hidden layers (3 × hidden for an
                     MLP), the output before and after normalising — 2 B (4 out + 3 hidden) — then the B × B
                     logits, their softmax both ways and its gradient: 6 B²
    features         the validation split through the head: its images and captions × out

Evaluating a head holds its weights and the evaluated split's features only. Left out: the copy of the best head
a run keeps, and the embeddings themselves (the data, shared by every head of a pack).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from align.common import device as devices  # read at each call: tests stand in for the free memory
from align.common.config import shorten
from align.common.errors import AlignError
from align.optim import optimizer_info
from align.optim.batched import keeps_method_state
from align.train.config import OptimConfig, TrainConfig
from align.train.heads import parameter_counts

VALUE_BYTES = 4  # heads train in float32 (bf16 autocast keeps float32 weights, state and gradients)


@dataclass(frozen=True)
class OptimizerMemory:
    """What an optimizer keeps of each trainable value besides the value itself. The defaults are the most any
    registered optimizer keeps (a pack planned before its optimizers are known counts these)."""

    two_pass: bool = True  # the SAM family: a second gradient, the saved point and δ
    buffers: int = 2  # optimizer state: Adam's and AdamW's two moments, SGD's momentum, Lion's average
    metric: bool = False  # a method's own copy (M-SAM's averaged metric, Friendly SAM's m, LookSAM's g_v)

    @classmethod
    def of(cls, optim: OptimConfig) -> "OptimizerMemory":
        """What the configured optimizer keeps (the SAM family: its base optimizer's state)."""
        two_pass = optimizer_info(optim.name).two_pass
        buffers = optimizer_info(optim.stepping_base()).base.state_copies(optim.momentum)
        return cls(two_pass, buffers, keeps_method_state(optim.name, optim.method_hparams()))


@dataclass(frozen=True)
class HeadMemory:
    """The values one head holds, part by part (see the module's docstring)."""

    weights: int
    optimizer_state: int = 0
    gradients: int = 0
    sam_point_and_delta: int = 0
    averaged_metric: int = 0
    activations: int = 0
    features: int = 0

    @property
    def bytes(self) -> int:
        return VALUE_BYTES * sum(getattr(self, f.name) for f in fields(self))


def _known_or_placeholder_dims(cfg: TrainConfig) -> tuple[int, int, bool]:
    """(image dim, text dim, both known): a dim not known before the cache is read counts as 1 (the smallest),
    or as head.out_dim on a side locked to the identity (which needs exactly that)."""
    head = cfg.head

    def dim(value: int | None, side: str) -> int:
        if value is not None:
            return value
        return head.out_dim if head.lock == side and head.lock_mode == "identity" else 1

    return dim(cfg.image_dim, "image"), dim(cfg.text_dim, "text"), None not in (cfg.image_dim, cfg.text_dim)


def head_memory(cfg: TrainConfig, eval_rows: int = 0, optimizer: OptimizerMemory | None = None,
                training: bool = True) -> HeadMemory:
    """What one head of ``cfg`` holds: while it trains with ``optimizer`` (default: the configured one's
    ``OptimizerMemory``) at ``cfg.schedule.batch_size`` and validates on ``eval_rows`` images and captions, or
    with ``training=False`` while it is evaluated on ``eval_rows``. Nothing is allocated; embedding dims not known
    yet count as 1."""
    image_dim, text_dim, _ = _known_or_placeholder_dims(cfg)
    trainable, frozen = parameter_counts(cfg.head, cfg.loss, image_dim, text_dim)
    head, features = cfg.head, eval_rows * cfg.head.out_dim
    if not training:
        return HeadMemory(weights=trainable + frozen, features=features)
    optim = optimizer or OptimizerMemory.of(cfg.optim)
    batch = cfg.schedule.batch_size
    hidden = 0 if head.kind == "linear" else 3 * (head.hidden_dim or head.out_dim)
    return HeadMemory(weights=trainable + frozen, optimizer_state=trainable * optim.buffers,
                      gradients=trainable * (2 if optim.two_pass else 1),
                      sam_point_and_delta=2 * trainable if optim.two_pass else 0,
                      averaged_metric=trainable if optim.metric else 0,
                      activations=2 * batch * (4 * head.out_dim + hidden) + 6 * batch * batch, features=features)


def check_head_fits(cfg: TrainConfig, device: torch.device, eval_rows: int | None = None,
                    training: bool = True) -> None:
    """Refuse a head that cannot fit in the device's free memory, with its ``head_memory`` estimate, before
    anything is allocated. ``eval_rows``: the images and captions it validates on (training) or is evaluated on;
    None while the data is not read yet (counted as none: the estimate is then a lower bound)."""
    memory = head_memory(cfg, eval_rows or 0, training=training)
    need, free = memory.bytes, devices.available_memory(device)
    if free is None or need <= free:
        return
    image_dim, text_dim, known = _known_or_placeholder_dims(cfg)
    exact = known and eval_rows is not None
    dims = f"{image_dim}/{text_dim}-d embeddings" if known else "embeddings not read yet (counted as 1-d)"
    if training:
        doing = f"to train with {cfg.optim.name} ({VALUE_BYTES * memory.activations / 1e9:.3g} GB in activations)"
        advice = "use a smaller head.out_dim, head.hidden_dim or schedule.batch_size"
    else:
        doing = f"to hold it with the features of {eval_rows} images and captions"
        advice = "evaluate it on a device with more free memory (--device)"
    raise AlignError(shorten(
        f"head.out_dim={cfg.head.out_dim}: a {cfg.head.kind} head on {dims} has {memory.weights:.3g} parameters "
        f"and needs {'' if exact else 'at least '}{need / 1e9:.3g} GB {doing}, but {device} has "
        f"{free / 1e9:.3g} GB free: {advice}"))
