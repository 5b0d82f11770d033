"""How much memory a head takes (orchestration): the check that refuses a head too large for the device, and
what one head of a pack holds (the study sizes its packs with it).
"""
from __future__ import annotations

import torch

from align.common.config import shorten
from align.common.errors import AlignError
from align.train.config import TrainConfig
from align.train.heads import AlignmentModel


def _known_or_placeholder_dims(cfg: TrainConfig) -> tuple[int, int, bool]:
    """(image dim, text dim, both known): a dim not known before the cache is read counts as 1 (the smallest),
    or as head.out_dim on a side locked to the identity (which needs exactly that)."""
    head = cfg.head

    def dim(value: int | None, side: str) -> int:
        if value is not None:
            return value
        return head.out_dim if head.lock == side and head.lock_mode == "identity" else 1

    return dim(cfg.image_dim, "image"), dim(cfg.text_dim, "text"), None not in (cfg.image_dim, cfg.text_dim)


def check_head_fits(cfg: TrainConfig, device: torch.device, training: bool = True) -> None:
    """Refuse a head that cannot fit in the device's free memory, with the estimate, before anything is allocated.

    Training keeps 4-byte copies of each trainable value: weights, gradient, two optimizer moments and the best
    head, plus the SAM family's saved point; evaluation only the weights. Activations come on top of this.
    """
    from align.common.device import available_memory
    from align.optim import optimizer_info
    from align.train.heads import parameter_counts

    image_dim, text_dim, known = _known_or_placeholder_dims(cfg)
    trainable, frozen = parameter_counts(cfg.head, cfg.loss, image_dim, text_dim)
    copies = (6 if optimizer_info(cfg.optim.name).two_pass else 5) if training else 1
    need = 4 * (trainable * copies + frozen)
    free = available_memory(device)
    if free is None or need <= free:
        return
    dims = f"{image_dim}/{text_dim}-d embeddings" if known else "embeddings not read yet (counted as 1-d)"
    doing = f"to train with {cfg.optim.name} ({copies} copies of each weight)" if training else "to hold it"
    raise AlignError(shorten(
        f"head.out_dim={cfg.head.out_dim}: a {cfg.head.kind} head on {dims} has {trainable + frozen:.3g} "
        f"parameters and needs {'' if known else 'at least '}{need / 1e9:.3g} GB {doing}, but {device} has "
        f"{free / 1e9:.3g} GB free: use a smaller head.out_dim or head.hidden_dim"))


def head_bytes(model: AlignmentModel, batch_size: int, eval_rows: int, two_pass: bool = True,
               optimizer_buffers: int = 2, metric: bool = False) -> int:
    """The most memory one head of a pack takes: its weights; its optimizer state (``optimizer_buffers`` copies:
    Adam's two moments, SGD's momentum); the gradient of each pass; the SAM family's perturbed weights and δ (and
    M-SAM's averaged metric); the activations a forward/backward pass keeps; its validation features
    (``eval_rows`` images and captions)."""
    element = next(iter(model.state_dict().values())).element_size()
    total = sum(t.numel() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    passes = 2 if two_pass else 1
    weights = total + trainable * (optimizer_buffers + passes + (2 if two_pass else 0) + (1 if metric else 0))
    cfg = model.head_cfg
    hidden = 0 if cfg.kind == "linear" else 3 * (cfg.hidden_dim or cfg.out_dim)
    # Kept for the backward pass, per side: input norm, hidden layers, the output before and after normalising;
    # then the B × B logits, their softmax both ways and the gradient.
    activations = 2 * batch_size * (4 * cfg.out_dim + hidden) + 6 * batch_size * batch_size
    return element * (weights + activations + eval_rows * cfg.out_dim)
