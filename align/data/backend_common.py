"""What every encoder backend does to load a model (edge layer: it loads models for the backends).

A small memo of loaded models (so one open_clip model or one CLIPModel serving both towers loads once), hiding
the libraries' expected warnings and progress bars while loading, freezing a model, importing an optional
library with an install hint, and the first line of a library's error for a one-line AlignError.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any, Callable, Iterator

import torch

from align.common.errors import AlignError

# A loaded model is kept for the next build, so one open_clip model (or one CLIPModel) serving both towers loads
# once. Small on purpose: a long process building many models should not hold them all.
_MODELS: dict[tuple, Any] = {}
_MODELS_KEEP = 2


def remember(key: tuple, load: Callable[[], Any]) -> Any:
    """The model memoised under ``key``, loaded with ``load()`` if absent (the least recently used goes)."""
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
def quiet_loading() -> Iterator[None]:
    """Hide open_clip's expected "initialized randomly" warning and transformers' per-load progress bar."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    hf_logging = None
    try:
        from transformers.utils import logging as hf_logging_module  # heavy: only to mute a load in progress

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


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode without gradients (encoders are frozen)."""
    model.eval()
    model.requires_grad_(False)
    return model


def import_optional(module: str, dist: str) -> Any:
    """``module``, or an AlignError naming the distribution to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AlignError(f"{module} is not installed: pip install {dist}") from exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 400 characters), for a one-line AlignError."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
