"""Alignment heads: one small trainable map per modality from frozen embeddings into a joint space.

``AlignmentModel.forward`` returns exactly the keyword arguments of the configured loss
(``image_features``, ``text_features``, ``logit_scale`` and, for SigLIP, ``logit_bias``), so a training step
is ``loss_fn(**model(image_emb, text_emb))``. The learnable temperature lives in log space (``log_scale``) and
is clamped by ``clamp_logit_scale_`` after each optimizer step, following open_clip.

``head.rescale: c`` reparameterizes a head without changing its function at initialisation (Dinh et al., ICML
2017): an MLP head with ReLU starts from W1 → c·W1, b1 → c·b1, W2 → W2/c (ReLU is positively homogeneous), and a
linear head computes W = c·V with V trained and initialised at W₀/c. Training sees other coordinates of the same
function, which is what a reparameterization-invariance study varies. c = 1 builds the plain head.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from align.common.config import MAX_SEED, Integer, Number, StrictModel
from align.common.errors import AlignError
from align.train.losses import LossConfig

MAX_LOG_SCALE = math.log(100.0)  # open_clip's upper bound on the log-scale


class HeadConfig(StrictModel):
    """Shape of the two heads and whether one side is locked (LiT-style)."""

    kind: Literal["linear", "mlp", "starmlp"] = "linear"  # mlp: Linear-GELU-Linear; starmlp: GELU(W1x)*(W2x) then W3
    activation: Literal["gelu", "relu"] = "gelu"  # the mlp's hidden activation
    out_dim: Integer = Field(256, ge=1)  # joint-space dimension
    hidden_dim: Integer | None = Field(None, ge=1)  # mlp/starmlp hidden width; None: out_dim
    pre_norm: bool = False  # LayerNorm on the input embedding of each trainable head
    lock: Literal["none", "image", "text"] = "none"  # side whose head is frozen
    lock_mode: Literal["identity", "random_projection"] = "identity"  # what the frozen head is
    lock_seed: Integer = Field(0, ge=0, lt=MAX_SEED)  # seed of the frozen random projection
    rescale: Number = Field(1.0, gt=0)  # c of the function-preserving reparameterization (module doc); 1: none

    @model_validator(mode="after")
    def _rescalable(self) -> "HeadConfig":
        if not math.isfinite(self.rescale):
            raise ValueError(f"head.rescale must be a finite number > 0, got {self.rescale!r}")
        if self.rescale != 1.0 and self.kind == "starmlp":
            raise ValueError("head.rescale preserves the function of linear and ReLU mlp heads only: set head.kind "
                             "to linear or mlp (with head.activation=relu), or drop head.rescale")
        if self.rescale != 1.0 and self.kind == "mlp" and self.activation != "relu":
            raise ValueError("head.rescale on an mlp head needs a positively homogeneous activation (the Dinh "
                             "rescaling changes a GELU head's function): set head.activation=relu")
        return self


class ScaledLinear(nn.Linear):
    """A linear layer computing x (c·V)ᵀ + b with V its trained ``weight``: ``head.rescale`` on a linear head."""

    def __init__(self, in_dim: int, out_dim: int, scale: float) -> None:
        super().__init__(in_dim, out_dim)
        self.scale = scale
        with torch.no_grad():
            self.weight.div_(scale)  # V₀ = W₀/c: the same function as the plain layer's at initialisation

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.scale * self.weight, self.bias)


class StarMLP(nn.Module):
    """Gated MLP (SAIL's "star" head): W3 (GELU(W1 x) ⊙ W2 x); (N, in_dim) → (N, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(in_dim, hidden_dim)
        self.value = nn.Linear(in_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.gelu(self.gate(x)) * self.value(x))


def _trainable_head(cfg: HeadConfig, in_dim: int) -> nn.Module:
    """A trainable head (N, in_dim) → (N, out_dim) of kind ``cfg.kind``, with optional pre-LayerNorm."""
    hidden = cfg.hidden_dim or cfg.out_dim
    c = float(cfg.rescale)
    if cfg.kind == "linear":
        body: nn.Module = nn.Linear(in_dim, cfg.out_dim) if c == 1.0 else ScaledLinear(in_dim, cfg.out_dim, c)
    elif cfg.kind == "mlp":
        act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        body = nn.Sequential(nn.Linear(in_dim, hidden), act, nn.Linear(hidden, cfg.out_dim))
        if c != 1.0:
            dinh_rescale_(body[0], body[2], c)
    else:
        body = StarMLP(in_dim, hidden, cfg.out_dim)
    return nn.Sequential(nn.LayerNorm(in_dim), body) if cfg.pre_norm else body


@torch.no_grad()
def dinh_rescale_(first: nn.Linear, second: nn.Linear, c: float) -> None:
    """W1 → c·W1, b1 → c·b1, W2 → W2/c in place: the same function through a ReLU between them."""
    first.weight.mul_(c)
    if first.bias is not None:
        first.bias.mul_(c)
    second.weight.div_(c)


def _locked_head(cfg: HeadConfig, in_dim: int, side: str) -> nn.Module:
    """A frozen head: the identity (joint dim = in_dim) or a fixed seeded Gaussian projection."""
    if cfg.lock_mode == "identity":
        if in_dim != cfg.out_dim:
            raise AlignError(f"head.lock={side} with lock_mode=identity keeps the {side} embedding as is, so the "
                             f"joint dimension is {in_dim}: set head.out_dim={in_dim} (got {cfg.out_dim})")
        return nn.Identity()
    gen = torch.Generator().manual_seed(cfg.lock_seed)
    proj = nn.Linear(in_dim, cfg.out_dim, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(cfg.out_dim, in_dim, generator=gen) / math.sqrt(in_dim))
    proj.weight.requires_grad_(False)
    return proj


class AlignmentModel(nn.Module):
    """Image head + text head + logit scale (and SigLIP bias); outputs the loss's keyword arguments."""

    def __init__(self, head: HeadConfig, loss: LossConfig, image_dim: int, text_dim: int) -> None:
        super().__init__()
        self.head_cfg = head
        self.loss_cfg = loss
        self.image_head = (_locked_head(head, image_dim, "image") if head.lock == "image"
                           else _trainable_head(head, image_dim))
        self.text_head = (_locked_head(head, text_dim, "text") if head.lock == "text"
                          else _trainable_head(head, text_dim))
        log_scale = torch.tensor(math.log(loss.initial_scale()), dtype=torch.float32)
        bias = torch.tensor(float(loss.init_bias), dtype=torch.float32)
        self.has_bias = loss.kind == "siglip"
        if loss.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
            if self.has_bias:
                self.logit_bias = nn.Parameter(bias)
        else:
            self.register_buffer("log_scale", log_scale)
            if self.has_bias:
                self.register_buffer("logit_bias", bias)

    def encode_image(self, x: Tensor) -> Tensor:
        """(N, image_dim) → (N, out_dim) L2-normalised image features."""
        return F.normalize(self.image_head(x), dim=-1)

    def encode_text(self, x: Tensor) -> Tensor:
        """(N, text_dim) → (N, out_dim) L2-normalised text features."""
        return F.normalize(self.text_head(x), dim=-1)

    def forward(self, image_emb: Tensor, text_emb: Tensor) -> dict[str, Tensor]:
        """Paired (B, image_dim), (B, text_dim) → the loss's kwargs (features normalised, scale exponentiated)."""
        out = {"image_features": self.encode_image(image_emb), "text_features": self.encode_text(text_emb),
               "logit_scale": self.log_scale.exp()}
        if self.has_bias:
            out["logit_bias"] = self.logit_bias
        return out

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Apply the clamp policy to the log-scale in place (call after each optimizer step)."""
        policy = self.loss_cfg.clamp
        if policy == "open_clip":
            self.log_scale.clamp_(0.0, MAX_LOG_SCALE)
        elif policy == "upper":
            self.log_scale.clamp_(max=MAX_LOG_SCALE)

    def logit_parameters(self) -> list[nn.Parameter]:
        """The learnable log-scale and bias (empty when the temperature is fixed)."""
        return [p for p in (getattr(self, "log_scale", None), getattr(self, "logit_bias", None))
                if isinstance(p, nn.Parameter)]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups: weights (decayed), biases/norms (no decay), logit scale/bias (no decay, own "perturb")."""
        logit_ids = {id(p) for p in self.logit_parameters()}
        decay, no_decay = [], []
        for module in (self.image_head, self.text_head):
            for sub in module.modules():
                for name, p in sub.named_parameters(recurse=False):
                    if not p.requires_grad:
                        continue
                    # Only matrix weights of Linear layers are decayed; norms' scales and all biases are not.
                    if isinstance(sub, nn.Linear) and name == "weight":
                        decay.append(p)
                    else:
                        no_decay.append(p)
        logit = [p for p in self.logit_parameters() if p.requires_grad and id(p) in logit_ids]
        groups = [
            {"name": "decay", "params": decay, "weight_decay": weight_decay, "perturb": True},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "perturb": True},
            {"name": "logit", "params": logit, "weight_decay": 0.0, "perturb": self.loss_cfg.perturb_logit_scale},
        ]
        return [g for g in groups if g["params"]]


def build_model(head: HeadConfig, loss: LossConfig, image_dim: int, text_dim: int) -> AlignmentModel:
    """The alignment model for embeddings of the given dimensions (float32, on the CPU)."""
    if image_dim <= 0 or text_dim <= 0 or head.out_dim <= 0:
        raise AlignError(f"head dimensions must be positive (image {image_dim}, text {text_dim}, out {head.out_dim})")
    return AlignmentModel(head, loss, image_dim, text_dim)


def parameter_counts(head: HeadConfig, loss: LossConfig, image_dim: int, text_dim: int) -> tuple[int, int]:
    """(trainable, frozen) numbers of values in the model's parameters and buffers, counted on the meta device:
    nothing is allocated, so an absurd size can be refused before it is tried."""
    with torch.device("meta"):
        model = build_model(head, loss, image_dim, text_dim)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) + sum(b.numel() for b in model.buffers())
    return trainable, frozen
