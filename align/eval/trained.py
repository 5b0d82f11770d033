"""A trained run as a model in Python (orchestration): what ``align.load_run`` and ``align.load_cache`` give.

``load_run(RUN)`` reads the run's config and its best head (as ``align eval RUN`` does) and embeds new images and
captions the way the run's training data was embedded: the frozen encoders of its embed config (built as
``align embed`` builds them, on first use), in the cache's fixed micro-batches, normalised and stored as the cache
stores them, then through the head. For images and captions that are in one of its caches, the result equals the
features ``align eval`` computes from that cache. ``load_cache(KEY)`` gives a cache's verified arrays.

Every failure a user can cause (no run there, no checkpoint yet, encoder weights not on this machine) is an
``AlignError`` with the command line's one-line message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from align.cache.embeddings import EmbeddingRows, PairedEmbeddings
from align.cache.key import ENCODE_ROWS, EmbedConfig, stored_rows
from align.cache.read import load_cache_dir, split_manifest
from align.cache.store import find_cache
from align.common.config import load_config
from align.common.device import pick_device
from align.common.errors import AlignError
from align.data import encoders
from align.data.caption_set import open_image
from align.eval.evaluate import load_head_state
from align.train.config import TrainConfig
from align.train.heads import AlignmentModel, build_model
from align.train.run_dir import RunDir

HEAD_ROWS = 8192  # rows sent through the head at once (as ``align eval`` does)


class TrainedRun:
    """A trained run: ``config`` (its TrainConfig), ``model`` (its heads, frozen, on ``device``), ``checkpoint``
    (which head: step, score), its frozen ``image_encoder`` and ``text_encoder`` (built on first use), and
    ``encode_images`` / ``encode_texts``: (N, d) float32 features on the CPU, L2-normalised, in the heads' space."""

    def __init__(self, path: Path, config: TrainConfig, model: AlignmentModel, checkpoint: dict[str, Any],
                 device: torch.device) -> None:
        self.path, self.config, self.model, self.checkpoint, self.device = path, config, model, checkpoint, device
        self._encoders: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"TrainedRun({str(self.path)!r}, optimizer={self.config.optim.name}, "
                f"step={self.checkpoint.get('step')}, device={self.device})")

    @property
    def embed(self) -> EmbedConfig:
        """The embed config its training data was made with: the run's own data section, or the one its named
        caches' manifests record; AlignError for embeddings made elsewhere (``align cache import``)."""
        if isinstance(self.config.data, EmbedConfig):
            return self.config.data
        manifest = split_manifest(self.config.data, "train")
        if not isinstance(manifest.get("config"), dict):
            raise AlignError(f"{self.path} was trained on imported embeddings ({manifest['key']}), whose encoders "
                             "align does not know: encode with them yourself and use project_images/project_texts")
        return EmbedConfig.model_validate(manifest["config"])

    @property
    def image_encoder(self) -> encoders.ImageEncoder:
        """The frozen image tower of the run's embed config, on the run's device (built once)."""
        if "image" not in self._encoders:
            self._encoders["image"] = encoders.build_image_encoder(self.embed.image_encoder, self.device)
        return self._encoders["image"]

    @property
    def text_encoder(self) -> encoders.TextEncoder:
        """The frozen text tower of the run's embed config, on the run's device (built once)."""
        if "text" not in self._encoders:
            self._encoders["text"] = encoders.build_text_encoder(self.embed.text_encoder, self.device)
        return self._encoders["text"]

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """PIL images or image files → (N, d) features through the image head (batched as the cache is)."""
        items, encoder = list(images), self.image_encoder
        raw = [encoder.encode(torch.stack([encoder.preprocess(_rgb(item)) for item in items[lo:lo + ENCODE_ROWS]]))
               for lo in range(0, len(items), ENCODE_ROWS)]  # decoded one micro-batch at a time
        return self.project_images(self._as_stored(raw, encoder))

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Captions → (N, d) features through the text head (batched as the cache is)."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise AlignError("encode_texts takes a list of strings (captions)")
        encoder = self.text_encoder
        raw = [encoder.encode(texts[lo:lo + ENCODE_ROWS]) for lo in range(0, len(texts), ENCODE_ROWS)]
        return self.project_texts(self._as_stored(raw, encoder))

    def _as_stored(self, parts: list[Tensor], encoder: Any) -> Tensor:
        """Raw encoder rows as the cache stores them: optionally L2-normalised in float32, then the storage dtype
        (read back as float32, as training reads the cache)."""
        array = (torch.cat(parts) if parts else torch.zeros(0, encoder.dim)).numpy()
        return torch.from_numpy(stored_rows(array, self.embed, "new", "given").astype(np.float32))

    @torch.no_grad()
    def project_images(self, raw: Tensor) -> Tensor:
        """Raw image-encoder embeddings (N, image_dim) → (N, d) features through the image head."""
        return self._project(self.model.encode_image, raw, self.config.image_dim, "image")

    @torch.no_grad()
    def project_texts(self, raw: Tensor) -> Tensor:
        """Raw text-encoder embeddings (N, text_dim) → (N, d) features through the text head."""
        return self._project(self.model.encode_text, raw, self.config.text_dim, "text")

    def _project(self, head: Any, raw: Tensor | EmbeddingRows, dim: int, tower: str) -> Tensor:
        # a cache's memory-mapped rows stream through in chunks, never copied whole
        rows = raw if isinstance(raw, EmbeddingRows) else EmbeddingRows(torch.as_tensor(raw, dtype=torch.float32))
        if len(rows.shape) != 2 or rows.shape[1] != dim:
            raise AlignError(f"the {tower} head takes (N, {dim}) embeddings, got {tuple(rows.shape)}")
        chunks = rows.chunks(HEAD_ROWS)
        out = [head(chunk.to(self.device)).float().cpu() for chunk in chunks]
        return torch.cat(out) if out else torch.zeros(0, self.config.head.out_dim)


def _rgb(item: Any) -> Any:
    """An image given as a PIL image or a file → an RGB PIL image (files decoded as the datasets decode them)."""
    if isinstance(item, (str, Path)):
        return open_image(Path(item), str(item))
    if not hasattr(item, "convert"):
        raise AlignError(f"encode_images takes PIL images or image files, got {type(item).__name__}")
    return item.convert("RGB")


def load_run(path: str | Path, checkpoint: str = "best", device: str | None = None) -> TrainedRun:
    """A trained run folder (what ``align train`` wrote) as a model: its config, its ``checkpoint`` head ("best", as
    ``align eval`` takes it, or "last") on ``device`` (default: the run's configured device), and its frozen
    encoders (built on first use). Example (``run_dir``: a trained run, ``photo_paths``: image files)::

        >>> import align
        >>> run = align.load_run(run_dir)
        >>> img = run.encode_images(photo_paths)          # (N, d), L2-normalised, through the head
        >>> txt = run.encode_texts(["a red circle above a blue square"])
        >>> scores = img @ txt.T
        >>> tuple(scores.shape) == (len(photo_paths), 1)
        True
    """
    run = RunDir(path)
    if not run.is_run():
        raise AlignError(f"{run.path} is not a run directory (no {run.config_path.name}): give the folder align "
                         "train wrote")
    cfg = load_config(TrainConfig, run.config_path)
    state, meta = run.load_head(checkpoint)
    if cfg.image_dim is None or cfg.text_dim is None:  # recorded by training; from the cache otherwise
        dims = split_manifest(cfg.data, "train")["dims"]
        cfg = cfg.model_copy(update={"image_dim": int(dims["image"]), "text_dim": int(dims["text"])})
    dev = pick_device(device or cfg.device)
    model = build_model(cfg.head, cfg.loss, cfg.image_dim, cfg.text_dim)
    load_head_state(model, state, run.path)
    model.to(dev).eval().requires_grad_(False)
    return TrainedRun(run.path, cfg, model, dict(meta, checkpoint=checkpoint), dev)


def load_cache(key_or_path: str | Path, root: str | Path | None = None) -> PairedEmbeddings:
    """A finished embedding cache, given by its folder or its key (a unique prefix will do) under ``root``
    (default: the data root's cache), verified as every load is: image, text, caption → image (and a labelled
    set's labels and class prompts)."""
    return load_cache_dir(find_cache(key_or_path, root))

