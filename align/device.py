"""Device selection: cuda → mps → cpu, or whatever the user asked for."""
from __future__ import annotations

import torch

from align.errors import AlignError


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), or the best available one."""
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise AlignError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AlignError(f"device {requested!r} asked for but CUDA is not available here: use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AlignError(f"device {requested!r} asked for but MPS is not available here: use --device cpu")
    return device
