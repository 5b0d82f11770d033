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
                     MLP), the output before and after normalising — 2 B (4 out + 3 hidden)
    logits           the loss's: the plain loss holds the B × B logits, their softmax both ways and its gradient
                     (6 B²); in row blocks (``align.train.blockwise``, ``loss_block_rows``: K heads' blocks of
                     block × B float32 logits within its budget) ``BLOCK_COPIES`` × block × B, a head's share of
                     its pack's K. SAM's second pass computes them after the first pass's are freed: counted once.
    features         the validation split through the head: its images and captions × out

Evaluating a head holds its weights and the evaluated split's features only. Left out: the copy of the best head
a run keeps and the sharpness measures' second derivatives.

The data a pack reads is counted apart (``data_memory``), once per pack: the cache's splits stay in their memory
maps (pages the kernel may drop, shared by every process), so what a pack holds of them is its batches in flight —
the step computing and the ``PREFETCH_STEPS`` read ahead, B × (image_dim + text_dim) values per group of heads that
share a seed (and on CUDA the step's copy on the device) — and one ``CHUNK_ROWS`` chunk of the validation split's
rows going through the heads. The features of the whole split are the heads' (``features`` above).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from align.cache.embeddings import CHUNK_ROWS
from align.common import device as devices  # read at each call: tests stand in for the free memory
from align.common.config import shorten
from align.common.errors import AlignError
from align.optim import optimizer_info
from align.optim.batched import keeps_method_state
from align.train.blockwise import BLOCK_COPIES, loss_block_rows
from align.train.batches import PREFETCH_STEPS
from align.train.config import OptimConfig, TrainConfig
from align.train.heads import parameter_counts
from align.train.losses import LossConfig

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
    logits: int = 0
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


def logits_values(loss: LossConfig, batch: int, heads: int = 1) -> int:
    """The float32 values the loss's logits of a pack of ``heads`` heads hold at once in a training step at
    ``batch``: 6 B² per head for the plain loss, ``BLOCK_COPIES`` × block × B per head in row blocks."""
    block = loss_block_rows(loss.block_rows, batch, batch, heads)
    return heads * batch * (6 * batch if block is None else BLOCK_COPIES * block)


def head_memory(cfg: TrainConfig, eval_rows: int = 0, optimizer: OptimizerMemory | None = None,
                training: bool = True, heads: int = 1) -> HeadMemory:
    """What one head of ``cfg`` holds: while it trains with ``optimizer`` (default: the configured one's
    ``OptimizerMemory``) at ``cfg.schedule.batch_size`` in a pack of ``heads`` (its share of their logits) and
    validates on ``eval_rows`` images and captions, or with ``training=False`` while it is evaluated on
    ``eval_rows``. Nothing is allocated; embedding dims not known yet count as 1."""
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
                      activations=2 * batch * (4 * head.out_dim + hidden),
                      logits=math.ceil(logits_values(cfg.loss, batch, heads) / heads), features=features)


def heads_that_fit(cfg: TrainConfig, budget: int, eval_rows: int = 0,
                   optimizer: OptimizerMemory | None = None) -> int:
    """The most heads of ``cfg`` one pack may hold in ``budget`` bytes (``head_memory``'s parts, the logits
    counted for the pack as a whole, whose row blocks shrink as it grows); 0 when not even one fits."""
    alone = head_memory(cfg, eval_rows, optimizer)
    rest = alone.bytes - VALUE_BYTES * alone.logits  # what each head holds besides the logits

    def fits(heads: int) -> bool:
        return heads * rest + VALUE_BYTES * logits_values(cfg.loss, cfg.schedule.batch_size, heads) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, max(1, budget // max(1, rest))  # fits(lo); nothing above hi can
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def data_memory(cfg: TrainConfig, eval_rows: int = 0, groups: int = 1, device: torch.device | None = None) -> int:
    """Bytes of the data one pack of ``cfg`` holds while it trains (see the module's docstring): the batches in
    flight of ``groups`` groups of heads (one per seed), and one chunk of the ``eval_rows`` validation rows;
    embedding dims not known yet count as 1."""
    image_dim, text_dim, _ = _known_or_placeholder_dims(cfg)
    steps = PREFETCH_STEPS + 1 + (device is not None and device.type == "cuda")
    batches = steps * groups * cfg.schedule.batch_size * (image_dim + text_dim)
    return VALUE_BYTES * (batches + min(eval_rows, CHUNK_ROWS) * max(image_dim, text_dim))


def check_head_fits(cfg: TrainConfig, device: torch.device, eval_rows: int | None = None,
                    training: bool = True) -> None:
    """Refuse a head that cannot fit in the device's free memory, with its ``head_memory`` estimate, before
    anything is allocated. ``eval_rows``: the images and captions it validates on (training) or is evaluated on;
    None while the data is not read yet (counted as none: the estimate is then a lower bound)."""
    memory = head_memory(cfg, eval_rows or 0, training=training)
    need, free = memory.bytes, devices.available_memory(device)
    if training:  # the run's batches and validation chunk (a run of one seed: one group)
        need += data_memory(cfg, eval_rows or 0, device=device)
    if free is None or need <= free:
        return
    image_dim, text_dim, known = _known_or_placeholder_dims(cfg)
    exact = known and eval_rows is not None
    dims = f"{image_dim}/{text_dim}-d embeddings" if known else "embeddings not read yet (counted as 1-d)"
    if training:
        doing = (f"to train with {cfg.optim.name} ({VALUE_BYTES * memory.activations / 1e9:.3g} GB in activations, "
                 f"{VALUE_BYTES * memory.logits / 1e9:.3g} GB in the loss's logits)")
        advice = "use a smaller head.out_dim, head.hidden_dim or schedule.batch_size"
        if 2 * VALUE_BYTES * memory.logits > need:  # the logits are most of it: compute fewer rows at once
            advice = "use a smaller loss.block_rows (unset: chosen to fit 256 MiB of logits) or schedule.batch_size"
    else:
        doing = f"to hold it with the features of {eval_rows} images and captions"
        advice = "evaluate it on a device with more free memory (--device)"
    raise AlignError(shorten(
        f"head.out_dim={cfg.head.out_dim}: a {cfg.head.kind} head on {dims} has {memory.weights:.3g} parameters "
        f"and needs {'' if exact else 'at least '}{need / 1e9:.3g} GB {doing}, but {device} has "
        f"{free / 1e9:.3g} GB free: {advice}"))
