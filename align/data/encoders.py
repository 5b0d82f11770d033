"""Frozen image and text encoders behind one small interface, and the builders that pick a backend (edge layer:
building one loads weights from disk or the hub).

``build_image_encoder(spec)`` / ``build_text_encoder(spec)`` return an ``ImageEncoder`` / ``TextEncoder`` for an
``EncoderSpec`` (``align.data.encoder_spec``); each backend module supplies the tower's functions:
``align.data.backend_open_clip``, ``align.data.backend_transformers`` and ``align.data.backend_offline`` (the
EfficientNet-Lite0 + MiniLM pair). ``prepare_weights(spec)`` fetches remote weights first, so a spec's identity
is final before a cache key is computed from it.

Encoders are frozen (eval mode, no gradients) and return float32 rows on the CPU; fp16/bf16 autocast is used on
CUDA only.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from align.common.device import pick_device
from align.common.errors import AlignError
from align.data.backend_offline import efficientnet_image, minilm_text
from align.data.backend_open_clip import open_clip_image, open_clip_text, prepare_open_clip
from align.data.backend_transformers import hf_image, hf_text, prepare_hf
from align.data.encoder_spec import EncoderSpec

IMAGE_BACKENDS = {"open_clip": open_clip_image, "transformers": hf_image, "efficientnet_lite": efficientnet_image}
TEXT_BACKENDS = {"open_clip": open_clip_text, "transformers": hf_text, "minilm": minilm_text}


class ImageEncoder:
    """A frozen image tower: ``preprocess(PIL) -> (3, H, W)``, ``encode((B, 3, H, W)) -> (B, D) float32``."""

    def __init__(self, spec: EncoderSpec, device: torch.device, preprocess: Callable[[Any], torch.Tensor],
                 forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.spec, self.device = spec, device
        self._preprocess, self._forward = preprocess, forward
        self._dim: int | None = None

    def preprocess(self, image: Any) -> torch.Tensor:
        """One PIL RGB image → a (3, H, W) float tensor, ready to batch."""
        return self._preprocess(image)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, D) float32 on the CPU."""
        with _autocast(self.device, self.spec.precision):
            out = self._forward(images.to(self.device, non_blocking=True))
        return out.float().cpu()

    @property
    def dim(self) -> int:
        """Embedding width D (found with one dummy forward pass, once)."""
        if self._dim is None:
            from PIL import Image  # heavy: only for the one blank image that measures the width

            self._dim = int(self.encode(self.preprocess(Image.new("RGB", (64, 64)))[None]).shape[1])
        return self._dim

    def identity(self) -> dict[str, Any]:
        return self.spec.identity()


class TextEncoder:
    """A frozen text tower: ``encode(list of B captions) -> (B, D) float32``."""

    def __init__(self, spec: EncoderSpec, device: torch.device, forward: Callable[[list[str]], torch.Tensor]) -> None:
        self.spec, self.device, self._forward = spec, device, forward
        self._dim: int | None = None

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """B captions → (B, D) float32 on the CPU."""
        with _autocast(self.device, self.spec.precision):
            out = self._forward(list(texts))
        return out.float().cpu()

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode(["a photo"]).shape[1])
        return self._dim

    def identity(self) -> dict[str, Any]:
        return self.spec.identity()


def _autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (CPU results stay fp32, as the cache expects)."""
    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def build_image_encoder(spec: EncoderSpec, device: torch.device | str | None = None) -> ImageEncoder:
    """A frozen image encoder for ``spec`` on ``device`` (auto: cuda → mps → cpu)."""
    device = device if isinstance(device, torch.device) else pick_device(device)
    if spec.backend not in IMAGE_BACKENDS:
        raise AlignError(f"backend {spec.backend!r} has no image tower: use one of {', '.join(IMAGE_BACKENDS)}")
    preprocess, forward = IMAGE_BACKENDS[spec.backend](spec, device)
    return ImageEncoder(spec, device, preprocess, forward)


def build_text_encoder(spec: EncoderSpec, device: torch.device | str | None = None) -> TextEncoder:
    """A frozen text encoder for ``spec`` on ``device`` (auto: cuda → mps → cpu)."""
    device = device if isinstance(device, torch.device) else pick_device(device)
    if spec.backend not in TEXT_BACKENDS:
        raise AlignError(f"backend {spec.backend!r} has no text tower: use one of {', '.join(TEXT_BACKENDS)}")
    return TextEncoder(spec, device, TEXT_BACKENDS[spec.backend](spec, device))


def prepare_weights(spec: EncoderSpec) -> None:
    """Download (or find in the local cache) whatever remote files ``spec`` needs, so ``identity`` is final."""
    if spec.backend == "open_clip":
        prepare_open_clip(spec)
    elif spec.backend == "transformers":
        prepare_hf(spec)
