"""The open_clip backend (edge layer: loads open_clip models and their weights from disk or the hub).

A model is an architecture name with a pretrained tag or a local checkpoint file, ``hf-hub:org/name`` or
``local-dir:/path``; the image and text towers of one model, or towers of two different models. Tag weights are
resolved to a local file first (``align.data.encoder_weights``), so offline runs fail in one line, and the tag's
preprocessing and activation are passed on when its file is loaded by path. Architectures without weights are
built from ``RANDOM_INIT_SEED``, so they are reproducible.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Callable

import torch

from align.common.errors import AlignError
from align.data import hub
from align.data.backend_common import first_line, freeze, import_optional, quiet_loading, remember
from align.data.encoder_spec import EncoderSpec, weight_identity
from align.data.encoder_weights import (RANDOM_INIT_SEED, hub_file, hub_snapshot, open_clip_local_dir,
                                        split_open_clip_name)


def open_clip_image(spec: EncoderSpec, device: torch.device) -> tuple[Callable[[Any], torch.Tensor],
                                                                         Callable[[torch.Tensor], torch.Tensor]]:
    """(preprocess, forward) of the image tower of ``spec``'s model."""
    model, preprocess, _ = _load(spec, device)
    return preprocess, model.encode_image


def open_clip_text(spec: EncoderSpec, device: torch.device) -> Callable[[list[str]], torch.Tensor]:
    """The text tower's forward (captions → embeddings) of ``spec``'s model, with its tokenizer."""
    import open_clip  # heavy: only when an open_clip encoder is built

    model, _, name = _load(spec, device)
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError) as exc:
        raise AlignError(f"open_clip could not load the tokenizer of {spec.describe()} "
                         f"(it may need a download): {first_line(exc)}") from exc

    def forward(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    return forward


def prepare_open_clip(spec: EncoderSpec) -> None:
    """Download (or find in the local cache) the remote files of ``spec``'s model, so its identity is final."""
    schema, ident = split_open_clip_name(spec.model)
    if schema == "hf-hub":
        _hub_name(ident)
    elif schema is None:
        _check_arch(spec.model)
        if spec.pretrained and not Path(spec.pretrained).expanduser().is_file():
            _tag_file(spec.model, spec.pretrained)


def _load(spec: EncoderSpec, device: torch.device) -> tuple[Any, Any, str]:
    """(model, eval preprocess, name for get_tokenizer), shared between towers of the same spec."""
    # the weight identity is part of the key, so a checkpoint rewritten in place is not served from memory
    key = ("open_clip", spec.model, spec.pretrained, spec.image_size, str(device), repr(weight_identity(spec)))
    return remember(key, lambda: _create(spec, device))


def _create(spec: EncoderSpec, device: torch.device) -> tuple[Any, Any, str]:
    open_clip = import_optional("open_clip", "open_clip_torch")
    schema, ident = split_open_clip_name(spec.model)
    kwargs: dict[str, Any] = {}
    if spec.image_size:
        kwargs["force_image_size"] = spec.image_size
    pretrained: str | None = None
    name = spec.model
    if schema == "local-dir":
        name = f"local-dir:{open_clip_local_dir(ident)}"
    elif schema == "hf-hub":
        name = _hub_name(ident)
    else:
        _check_arch(spec.model)
        if spec.pretrained:
            local = Path(spec.pretrained).expanduser()
            if local.is_file():
                pretrained = str(local)
            else:
                cfg = _tag_cfg(spec.model, spec.pretrained)
                pretrained = _tag_file(spec.model, spec.pretrained)
                # Loading the tag's file by path loses the tag's preprocessing and activation: pass them on.
                kwargs.update(image_mean=cfg.get("mean"), image_std=cfg.get("std"),
                              image_interpolation=cfg.get("interpolation"),
                              image_resize_mode=cfg.get("resize_mode"),
                              force_quick_gelu=bool(cfg.get("quick_gelu", False)))
    try:
        with torch.random.fork_rng(devices=[]), quiet_loading():
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, **kwargs)
    except AlignError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise AlignError(f"open_clip could not build {spec.describe()}: {first_line(exc)}") from exc
    return freeze(model), preprocess, name


def _check_arch(arch: str) -> None:
    import open_clip  # heavy: only when an open_clip encoder is built

    models = open_clip.list_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise AlignError(f"unknown open_clip model {arch!r}{hint}: use an architecture from open_clip.list_models(), "
                         f"'hf-hub:org/name', or 'local-dir:/path' to a folder with open_clip_config.json")


def _tag_cfg(arch: str, tag: str) -> dict[str, Any]:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model  # heavy: as above

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(arch)
        raise AlignError(f"pretrained {tag!r} is neither a file nor a known tag of open_clip {arch!r}: "
                         f"use a checkpoint path or one of: {', '.join(tags) or '(none: leave pretrained empty)'}")
    return cfg


def _tag_file(arch: str, tag: str) -> str:
    """The local checkpoint of an open_clip pretrained tag, downloaded if needed and possible."""
    cfg = _tag_cfg(arch, tag)
    what = f"the open_clip checkpoint of {arch}/{tag}"
    if cfg.get("hf_hub"):
        from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME  # heavy: as above

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" means the default weights file
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)  # as open_clip does: prefer safetensors when the repo has it
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        return hub_file(repo, candidates, what)
    url = cfg.get("url", "")
    target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if target.is_file():
        return str(target)
    if hub.local_only():
        raise AlignError(f"{what} are not on this machine and {hub.offline_reason()}: pass a local checkpoint "
                         f"file as pretrained, or run once with network to download {url}")
    from open_clip.pretrained import download_pretrained_from_url  # heavy: as above

    try:
        return download_pretrained_from_url(url)
    except OSError as exc:
        raise AlignError(f"could not download {what} from {url}: {first_line(exc)}") from exc


def _hub_name(repo: str) -> str:
    """The name to give open_clip for ``hf-hub:repo``: ``local-dir:`` of the cached snapshot when offline."""
    if hub.local_only():
        return f"local-dir:{hub_snapshot(repo, f'open_clip model hf-hub:{repo}')}"
    hub_file(repo, ["open_clip_config.json"], f"open_clip model hf-hub:{repo}")
    return f"hf-hub:{repo}"
