"""Helpers shared by several test modules (imported as ``from helpers import ...``; pytest puts tests/ on the path).

- Embedding caches without an encoder: ``synthetic_split`` makes paired embeddings, ``write_cache`` writes one
  split in align.cache's exact on-disk layout at the key ``load_cached_split`` looks for, ``make_cache`` all
  three; ``data_section`` and ``train_config`` are the small configs that point at them.
- ``head_recall_at_1``: retrieval of linear heads by brute force, from their raw weights.
- ``save_tiny_clip``: a tiny random open_clip model any process can load (``local-dir:<folder>``).
- ``reference_run``: one cell of the optimizer registry trained alone by the plain path (torch optimizers and
  align.optim's SAM classes driven by ``take_step``), the reference packed and distributed training must match.

Fixtures several modules share (``tiny_dir``, ``cache_data``) are in conftest.py.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from align.cache.key import CACHE_FORMAT, EmbedConfig, cache_path
from align.optim import create_optimizer, optimizer_info
from align.optim.step import take_step
from align.train.heads import HeadConfig, build_model
from align.train.losses import LossConfig, loss_for
from align.train.run_data import Sampler, lr_factor

IMAGE_DIM, TEXT_DIM = 32, 24
SIZES = {"train": 512, "val": 128, "test": 128}


# -- embedding caches without an encoder ------------------------------------------------------------------

def data_section(root: Path, **synthetic: Any) -> dict[str, Any]:
    """An EmbedConfig dict whose cache keys live under ``root`` (encoders are named, never run)."""
    return {"dataset": {"kind": "synthetic", "synthetic": {"train_images": SIZES["train"], "val_images": SIZES["val"],
                                                           "test_images": SIZES["test"], **synthetic}},
            "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
            "text_encoder": {"backend": "open_clip", "model": "ViT-S-16"},
            "cache_root": str(root), "device": "cpu"}


def synthetic_split(split: str, n_images: int, captions: int = 3, image_dim: int = IMAGE_DIM,
                    text_dim: int = TEXT_DIM, noise: float = 0.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, Di) Gaussian; each caption = a fixed linear map of its image + fresh noise; 1..captions per image."""
    mapping = np.random.default_rng(seed).standard_normal((image_dim, text_dim)) / math.sqrt(image_dim)
    rng = np.random.default_rng([seed, {"train": 1, "val": 2, "test": 3}[split]])
    image = rng.standard_normal((n_images, image_dim)).astype(np.float32)
    per_image = rng.integers(1, captions + 1, size=n_images)  # multi-caption, uneven
    c2i = np.repeat(np.arange(n_images), per_image).astype(np.int64)
    text = (image[c2i] @ mapping + noise * rng.standard_normal((len(c2i), text_dim))).astype(np.float32)
    return image, text, c2i


def write_cache(data: dict[str, Any], split: str, image: np.ndarray, text: np.ndarray, c2i: np.ndarray) -> Path:
    """Write one split in align.cache's layout (arrays + manifest written last) where load_cached_split looks for it."""
    cfg = EmbedConfig.model_validate(data)
    folder = cache_path(cfg, split)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"image.npy": image, "text.npy": text, "caption_to_image.npy": c2i,
              "image_rows.npy": np.arange(len(image), dtype=np.int64),
              "caption_rows.npy": np.arange(len(text), dtype=np.int64)}
    files = {}
    for name, array in arrays.items():
        np.save(folder / name, array, allow_pickle=False)
        raw = (folder / name).read_bytes()
        files[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": len(raw),
                       "sha256": hashlib.sha256(raw).hexdigest()}
    manifest = {"format": CACHE_FORMAT, "key": folder.name, "split": split, "created": "test",
                "dataset": {"name": "synthetic-embeddings", "kind": "synthetic", "images_in_source": len(image),
                            "captions_in_source": len(text)},
                "encoders": {"image": "test:image", "text": "test:text"},
                "counts": {"images": len(image), "captions": len(text), "skipped_images": 0, "dropped_captions": 0},
                "dims": {"image": image.shape[1], "text": text.shape[1]}, "storage_dtype": str(image.dtype),
                "normalize": False, "files": files, "skipped": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def make_cache(root: Path, **kwargs: Any) -> dict[str, Any]:
    """Write train/val/test splits of the synthetic embeddings under ``root``; returns the data section."""
    data = data_section(root)
    for split, n in SIZES.items():
        write_cache(data, split, *synthetic_split(split, n, **kwargs))
    return data


def train_config(data: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A small, fast TrainConfig dict (override sections by keyword: optim={...}, schedule={...})."""
    cfg: dict[str, Any] = {"data": data, "device": "cpu", "head": {"out_dim": 32},
                           "schedule": {"steps": 120, "batch_size": 64, "warmup_steps": 10},
                           "eval": {"every": 40, "sharpness_batches": 2, "hessian_iters": 5, "hutchinson_samples": 4,
                                    "sharpness_ascent_steps": 2},
                           "optim": {"name": "adamw", "lr": 1e-2}, "checkpoint_every": 50, "loss_at_step": 100}
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def head_recall_at_1(state: dict[str, torch.Tensor], image: np.ndarray, text: np.ndarray, c2i: np.ndarray) -> tuple[float, float]:
    """(i2t R@1, t2i R@1) of linear heads given by raw weights, by brute force (argmax over all pairs)."""
    img = F.normalize(torch.from_numpy(image) @ state["image_head.weight"].T + state["image_head.bias"], dim=-1)
    txt = F.normalize(torch.from_numpy(text) @ state["text_head.weight"].T + state["text_head.bias"], dim=-1)
    sim = (img @ txt.T).double()
    c2i_t = torch.from_numpy(c2i)
    i2t = float((c2i_t[sim.argmax(dim=1)] == torch.arange(len(image))).double().mean())
    t2i = float((sim.argmax(dim=0) == c2i_t).double().mean())
    return i2t, t2i


# -- a tiny open_clip model -------------------------------------------------------------------------------

TINY_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def save_tiny_clip(folder: Path, seed: int) -> Path:
    """A tiny random open_clip model saved as local-dir (config + safetensors): loadable in any process.

    Seeded inside a forked RNG: the caller's global torch RNG is left as it was."""
    from open_clip.model import CLIP  # heavy: only where a test needs a real encoder
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = CLIP(**TINY_CLIP_CFG).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    return folder


# -- one cell of the registry trained alone: the reference for packs and data parallelism -------------------

# Every optimizer of the registry, with knobs that change its arithmetic (momentum, decay, β, norm scope, clipping).
CELLS = [
    dict(name="sgd", lr=0.5, momentum=0.9, weight_decay=1e-3, seed=0),
    dict(name="adam", lr=1e-2, weight_decay=1e-3, seed=1),
    dict(name="adamw", lr=1e-2, weight_decay=0.1, grad_clip=0.5, seed=0),
    dict(name="sam", lr=0.2, rho=0.1, base="sgd", momentum=0.9, seed=1),
    dict(name="msam", lr=1e-2, rho=0.3, seed=0),
    dict(name="msam", lr=1e-2, rho=0.3, alpha=0.5, metric_beta=0.9, norm_scope="all_trainable", seed=1),
    dict(name="asam", lr=1e-2, rho=1.0, eta=0.01, weight_decay=1e-2, seed=0),
    dict(name="fsam", lr=1e-2, rho=0.1, eta=1.0, base="adam", grad_clip=2.0, seed=1),
]
# The methods of issue 24: GSAM (ρ_t following the lr), Friendly SAM, LookSAM (one pass between its full steps),
# Lion alone and as a SAM-family base. With CELLS they cover the registry.
NEW_CELLS = [
    dict(name="gsam", lr=1e-2, rho=0.2, rho_min=0.05, alpha=0.4, seed=0),
    dict(name="gsam", lr=0.2, rho=0.1, alpha=0.2, base="sgd", momentum=0.9, norm_scope="all_trainable", seed=1),
    dict(name="friendly_sam", lr=1e-2, rho=0.2, sigma=1.0, lmbda=0.8, seed=0),
    dict(name="looksam", lr=1e-2, rho=0.2, k=3, alpha=0.6, grad_clip=2.0, seed=1),
    dict(name="lion", lr=1e-3, weight_decay=0.1, seed=0),
    dict(name="msam", lr=1e-3, rho=0.3, base="lion", weight_decay=1e-2, seed=1),
]


def cell_kwargs(cell: dict) -> dict:
    """A cell's optimizer keywords besides lr, weight decay and clipping (momentum, ρ, η, base, ...)."""
    return {k: v for k, v in cell.items() if k not in ("name", "seed", "lr", "weight_decay", "grad_clip")}


def reference_run(cell: dict, head: HeadConfig, loss: LossConfig, image: torch.Tensor, text: torch.Tensor,
                  c2i: torch.Tensor, steps: int, warmup: int, batch: int) -> dict[str, torch.Tensor]:
    """One cell alone: seeded model, create_optimizer over its param groups, LambdaLR, take_step, clamp."""
    torch.manual_seed(cell["seed"])
    model = build_model(head, loss, image.shape[1], text.shape[1]).to(image.dtype)
    two_pass = optimizer_info(cell["name"]).two_pass
    extra = dict(cell_kwargs(cell), max_grad_norm=cell.get("grad_clip")) if two_pass else {
        k: v for k, v in cell_kwargs(cell).items() if k == "momentum"}
    opt = create_optimizer(cell["name"], model.param_groups(cell.get("weight_decay", 0.0)), lr=cell["lr"],
                           weight_decay=cell.get("weight_decay", 0.0), **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps, warmup))
    sampler = Sampler(c2i, image.shape[0], batch, cell["seed"], torch.device("cpu"))
    fn = loss_for(loss)
    for step in range(steps):
        rows_i, rows_t = sampler.batch(step)

        def closure():
            value = fn(**model(image[rows_i], text[rows_t]))
            value.backward()
            return value.detach()

        take_step(opt, closure, None if two_pass else cell.get("grad_clip"))
        model.clamp_logit_scale_()
        sched.step()
    return model.state_dict()


def group_batches(groups, image, text):
    """Rows → tensors: each group of heads [a:b] with its (B,) image rows and (B,) caption rows (what the training
    loop's BatchReader hands HeadPack.step, from in-memory tensors)."""
    return [(heads, image[rows_i], text[rows_t]) for heads, rows_i, rows_t in groups]
