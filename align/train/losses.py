"""Contrastive losses on L2-normalised features: symmetric InfoNCE (CLIP) and the sigmoid loss (SigLIP).

Conventions follow open_clip's ``ClipLoss`` / ``SigLipLoss`` (single process): ``logit_scale`` is the
multiplier (already exponentiated), row i of the image batch pairs with row i of the text batch, and the loss
is a mean over the batch (CLIP: mean of the two cross-entropies; SigLIP: sum over all pairs / batch size).
The reduction is fixed on purpose: M-SAM's perturbation depends on the gradient's scale (paper-notes.md).

``loss_for`` gives the configured loss as training and evaluation call it (``ContrastiveLoss``): these plain
functions while the B × B logits fit the memory budget, else the same loss computed in row blocks
(``align.train.blockwise``, ``loss.block_rows``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from align.common.config import Integer, Number, StrictModel
from align.train.blockwise import (
    blockwise_clip_loss,
    blockwise_clip_loss_rows,
    blockwise_siglip_loss,
    blockwise_siglip_loss_rows,
    loss_block_rows,
)


class LossConfig(StrictModel):
    """The contrastive loss, its logit scale (temperature) and how the scale is treated during training."""

    kind: Literal["clip", "siglip"] = "clip"
    learn_scale: bool = True  # learnable log-scale (and SigLIP bias); False: a fixed temperature
    init_scale: Number | None = Field(None, gt=0, allow_inf_nan=False)  # the multiplier; None: clip 1/0.07, siglip 10
    init_bias: Number = Field(-10.0, allow_inf_nan=False)  # SigLIP logit bias at start (ignored by clip)
    clamp: Literal["open_clip", "upper", "none"] = "open_clip"  # log-scale in [0, ln 100]; <= ln 100; free
    perturb_logit_scale: bool = False  # whether SAM-family optimizers perturb the log-scale / bias
    # Under torchrun: each rank computes only its own rows against the gathered columns (open_clip's local_loss,
    # with the gradient gathered back); False: every rank computes the whole gathered B × B loss. The same loss
    # and gradient either way; ignored in a single process.
    local: bool = False
    # Rows of the logits computed at once (align.train.blockwise): None chooses them from a memory budget (the whole
    # B × B while a pack's logits fit 256 MiB, as before the key existed); a number forces them. The same loss and
    # gradient either way, to rounding.
    block_rows: Integer | None = Field(None, ge=1)

    def initial_scale(self) -> float:
        """The multiplier the log-scale starts from."""
        if self.init_scale is not None:
            return float(self.init_scale)
        return 1.0 / 0.07 if self.kind == "clip" else 10.0


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE of (B, D) paired features; ``logit_scale`` is the multiplier. Scalar, mean over B."""
    logits = logit_scale * image_features @ text_features.T  # (B, B): row i = image i against all texts
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                logit_bias: Tensor | float) -> Tensor:
    """Sigmoid pair loss of (B, D) paired features: −Σ log σ(±(s·xᵢ·yⱼ + b)) / B (+ on the diagonal)."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    signs = 2.0 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1.0
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]


def clip_loss_rows(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                   rows: slice) -> Tensor:
    """The part of ``clip_loss`` owned by ``rows`` of the (B, D) batch: those images against all texts and those
    texts against all images, mean over those rows. Its mean over equal parts of the batch is ``clip_loss``."""
    labels = torch.arange(rows.start, rows.stop, device=image_features.device)
    per_image = logit_scale * image_features[rows] @ text_features.T  # (b, B)
    per_text = logit_scale * text_features[rows] @ image_features.T
    return 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))


def siglip_loss_rows(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                     logit_bias: Tensor | float, rows: slice) -> Tensor:
    """The part of ``siglip_loss`` owned by ``rows``: the pairs of those images with all texts, summed, over the
    rows' count. Its mean over equal parts of the batch is ``siglip_loss``."""
    logits = logit_scale * image_features[rows] @ text_features.T + logit_bias  # (b, B)
    own = torch.arange(rows.start, rows.stop, device=logits.device)
    positive = torch.arange(text_features.shape[0], device=logits.device)[None, :] == own[:, None]
    signs = 2.0 * positive.to(logits.dtype) - 1.0
    return -F.logsigmoid(signs * logits).sum() / (rows.stop - rows.start)


@dataclass(frozen=True)
class ContrastiveLoss:
    """The configured loss, called with the model's outputs as keyword arguments (plus ``rows`` for the part a
    rank owns under ``loss.local``): the plain function above while its logits fit, else the same loss in row
    blocks of ``loss_block_rows(block_rows, ...)`` rows, for ``heads`` heads computed at once (a pack's K)."""

    kind: Literal["clip", "siglip"]
    block_rows: int | None = None  # loss.block_rows: None chooses from the memory budget
    heads: int = 1

    def __call__(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                 logit_bias: Tensor | float | None = None, rows: slice | None = None) -> Tensor:
        batch = image_features.shape[0]
        count = batch if rows is None else rows.stop - rows.start
        block = loss_block_rows(self.block_rows, count, batch, self.heads)
        plain, blocked = _LOSSES[self.kind, rows is not None]
        args = (image_features, text_features, logit_scale, *((logit_bias,) if self.kind == "siglip" else ()),
                *((rows,) if rows is not None else ()))
        return plain(*args) if block is None else blocked(*args, block_rows=block)


_LOSSES = {("clip", False): (clip_loss, blockwise_clip_loss), ("siglip", False): (siglip_loss, blockwise_siglip_loss),
           ("clip", True): (clip_loss_rows, blockwise_clip_loss_rows),
           ("siglip", True): (siglip_loss_rows, blockwise_siglip_loss_rows)}


def loss_for(cfg: LossConfig, heads: int = 1) -> ContrastiveLoss:
    """The loss ``cfg`` configures, for ``heads`` heads computed at once; call it with the model's output dict as
    keyword arguments."""
    return ContrastiveLoss(cfg.kind, cfg.block_rows, heads)


def rows_loss_for(cfg: LossConfig, heads: int = 1) -> ContrastiveLoss:
    """The per-rows loss of ``cfg`` (``loss.local``): the model's outputs as keyword arguments, and ``rows``."""
    return ContrastiveLoss(cfg.kind, cfg.block_rows, heads)
