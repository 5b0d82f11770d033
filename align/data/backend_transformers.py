"""The transformers backend (edge layer: loads transformers models from a local folder or the hub).

Any vision model with its image processor (cls / mean / pooler pooling, or the projected ``get_image_features``
of CLIP-like models) and any text model with its tokenizer (mean / cls / pooler, or ``get_text_features``). A
hub id is resolved to a local folder first (``align.data.encoder_weights``), so offline runs fail in one line.
``pool_vision`` and ``pool_text`` are the poolings, on a model output.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Callable

import torch

from align.common.errors import AlignError
from align.data import hub
from align.data.backend_common import first_line, freeze, import_optional, quiet_loading, remember
from align.data.encoder_spec import EncoderSpec
from align.data.encoder_weights import hub_file, hub_snapshot, sha256_tree


def prepare_hf(spec: EncoderSpec) -> None:
    """Download (or find in the local cache) the model of ``spec``, so its identity is final."""
    _hf_source(spec.model, f"transformers model {spec.model!r}")


def _hf_source(model: str, what: str) -> str:
    """A local folder for ``model`` (a folder, or a hub id resolved through the cache/hub)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise AlignError(f"{what} folder not found: {model} (give a folder saved with save_pretrained, or a hub id)")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", model):
        raise AlignError(f"{what} {model!r} is neither a local folder nor a hub id like org/name")
    if hub.local_only():
        return str(hub_snapshot(model, what))
    hub_file(model, ["config.json"], what)
    return model


def load_hf(spec: EncoderSpec, device: torch.device, kind: str, src: str | None = None) -> tuple[Any, Any]:
    """(frozen model, image processor or tokenizer) for a transformers folder or hub id."""
    src = src or _hf_source(spec.model, f"transformers model {spec.model!r}")
    files = repr(sha256_tree(Path(src))) if Path(src).is_dir() else src
    model = remember(("hf", src, files, spec.trust_remote_code, str(device)),
                     lambda: _create_hf_model(spec, src, device))
    try:
        if kind == "image":
            from transformers import AutoImageProcessor  # heavy: only when a transformers encoder is built

            aux = AutoImageProcessor.from_pretrained(src, trust_remote_code=spec.trust_remote_code)
        else:
            from transformers import AutoTokenizer  # heavy: as above

            aux = AutoTokenizer.from_pretrained(src, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        what = "image processor" if kind == "image" else "tokenizer"
        raise AlignError(f"transformers could not load the {what} of {spec.model}: {first_line(exc)}") from exc
    return model, aux


def _create_hf_model(spec: EncoderSpec, src: str, device: torch.device) -> Any:
    transformers = import_optional("transformers", "transformers")
    try:
        with quiet_loading():
            model = transformers.AutoModel.from_pretrained(src, trust_remote_code=spec.trust_remote_code,
                                                           dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        hint = " (set trust_remote_code: true only if you trust its code)" if "trust_remote_code" in str(exc) else ""
        raise AlignError(f"transformers could not load {spec.model}: {first_line(exc)}{hint}") from exc
    return freeze(model.to(device))


def _processor_kwargs(processor: Any, image_size: int | None) -> dict[str, Any]:
    """Per-call processor overrides that make it output image_size × image_size pixels."""
    if not image_size:
        return {}
    size = dict(getattr(processor, "size", None) or {})
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        crop = dict(crop)
        scale = image_size / crop.get("height", image_size)
        out: dict[str, Any] = {"crop_size": {"height": image_size, "width": image_size}}
        if "shortest_edge" in size:  # keep the model's resize-then-crop ratio (e.g. DINOv2's 256 → 224)
            out["size"] = {"shortest_edge": int(round(size["shortest_edge"] * scale))}
        else:
            out["size"] = {"height": image_size, "width": image_size}
        return out
    if "shortest_edge" in size:
        return {"size": {"shortest_edge": image_size}}
    return {"size": {"height": image_size, "width": image_size}}


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _features(out: Any) -> torch.Tensor:
    """get_image_features / get_text_features return a tensor (transformers 4) or an output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _patch_size(config: Any) -> int | None:
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    return int(patch) if patch else None


def pool_vision(out: Any, pooling: str, pixel_values: torch.Tensor, config: Any) -> torch.Tensor:
    """(B, D) from a vision model output: ``cls`` token, ``mean`` of the patch tokens (or of the feature map),
    or the model's ``pooler`` output."""
    hidden = out.last_hidden_state
    if pooling == "pooler":
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise AlignError("this vision model has no pooler output: use pooling cls or mean")
        return pooled.flatten(1)
    if hidden.ndim == 4:  # convolutional feature map (B, C, H, W)
        if pooling == "cls":
            raise AlignError("a convolutional model has no cls token: use pooling mean or pooler")
        return hidden.mean(dim=(2, 3))
    if pooling == "cls":
        return hidden[:, 0]
    patch = _patch_size(config)
    prefix = 0
    if patch:  # cls and register tokens come first; the rest are the (H/p)·(W/p) patches
        n_patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        prefix = max(hidden.shape[1] - n_patches, 0)
    return hidden[:, prefix:].mean(dim=1)


def pool_text(out: Any, pooling: str, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, D) from a text model output: attention-masked ``mean``, first-token ``cls``, or ``pooler``."""
    hidden = out.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "pooler":
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise AlignError("this text model has no pooler output: use pooling mean or cls")
        return pooled
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


class _HFPreprocess:
    """PIL → (3, H, W) with a transformers image processor (a class, so DataLoader workers can pickle it)."""

    def __init__(self, processor: Any, kwargs: dict[str, Any]) -> None:
        self.processor, self.kwargs = processor, kwargs

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt", **self.kwargs)["pixel_values"][0]


def hf_image(spec: EncoderSpec, device: torch.device) -> tuple[Callable[[Any], torch.Tensor],
                                                                  Callable[[torch.Tensor], torch.Tensor]]:
    """(preprocess, forward) of a transformers vision model (or the vision half of a CLIP-like model)."""
    model, processor = load_hf(spec, device, "image")
    dual = hasattr(model, "get_image_features")
    vision = getattr(model, "vision_model", model) if dual else model
    vision_config = getattr(model.config, "vision_config", None) or model.config
    interpolate = bool(spec.image_size)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        if dual and spec.pooling == "default":
            kw = {"interpolate_pos_encoding": True} if interpolate and _accepts(model.get_image_features,
                                                                                 "interpolate_pos_encoding") else {}
            return _features(model.get_image_features(pixel_values=pixels, **kw))
        kw = {"interpolate_pos_encoding": True} if interpolate and _accepts(vision.forward,
                                                                             "interpolate_pos_encoding") else {}
        out = vision(pixel_values=pixels, **kw)
        pooling = spec.pooling if spec.pooling != "default" else "cls"
        return pool_vision(out, pooling, pixels, vision_config)

    return _HFPreprocess(processor, _processor_kwargs(processor, spec.image_size)), forward


def hf_text_forward(spec: EncoderSpec, model: Any, tokenizer: Any, device: torch.device,
                    default_pooling: str = "mean") -> Callable[[list[str]], torch.Tensor]:
    """The forward (captions → embeddings) of a loaded text model: its projected text features (CLIP-like,
    pooling default), else its hidden states pooled by ``spec.pooling`` (default: ``default_pooling``)."""
    dual = hasattr(model, "get_text_features")
    text_model = getattr(model, "text_model", model) if dual else model
    if tokenizer.pad_token is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only tokenizers have no pad token
    limits = [n for n in (getattr(tokenizer, "model_max_length", None),
                          getattr(getattr(text_model, "config", None), "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    max_length = spec.max_length or (min(limits) if limits else 512)

    def forward(texts: list[str]) -> torch.Tensor:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if dual and spec.pooling == "default":
            return _features(model.get_text_features(**{k: v for k, v in enc.items() if k != "token_type_ids"}))
        out = text_model(**enc)
        pooling = spec.pooling if spec.pooling != "default" else default_pooling
        return pool_text(out, pooling, enc["attention_mask"])

    return forward


def hf_text(spec: EncoderSpec, device: torch.device) -> Callable[[list[str]], torch.Tensor]:
    """The text tower's forward (captions → embeddings) of a transformers text model and its tokenizer."""
    model, tokenizer = load_hf(spec, device, "text")
    return hf_text_forward(spec, model, tokenizer, device)
