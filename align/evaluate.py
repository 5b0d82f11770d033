"""Evaluate heads and raw embeddings: retrieval recall both ways, alignment metrics, sharpness (orchestration).

Metric names (shared by validation during training, ``align eval`` and the results files; see METRIC_KEYS):
``i2t_R@k`` / ``t2i_R@k`` (CLIP_benchmark's multi-caption convention, fractions in [0, 1]), ``mean_R@1`` (their
mean at k = 1), the rank statistics ``retrieval_recall`` adds, and on paired rows — each image with its FIRST
caption, as the paper's one-caption-per-image MS-COCO subset — ``mutual_knn`` and ``cknna`` (k = ``knn_k``) and
linear ``cka``. Raw embeddings of different dimensions have no common space, so retrieval is undefined for
them: only the alignment metrics are reported, with a note saying so.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from align.embeddings import PairedEmbeddings
from align.errors import AlignError

Log = Callable[[str], None]
ALIGNMENT_KEYS = ("mutual_knn", "cknna", "cka")


class NonFiniteFeatures(AlignError):
    """A head maps finite embeddings to NaN/inf features (its weights blew up): training treats it as divergence."""


def metric_keys(ks: Sequence[int]) -> list[str]:
    """The headline metric names for recall cut-offs ``ks`` (rank statistics come on top)."""
    return ([f"i2t_R@{k}" for k in ks] + [f"t2i_R@{k}" for k in ks] + ["mean_R@1"] + list(ALIGNMENT_KEYS))


@torch.no_grad()
def encode(model: torch.nn.Module, paired: PairedEmbeddings, device: torch.device,
           chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """(N_img, D) image and (N_cap, D) caption features of ``model`` (float32, on ``device``), in chunks."""
    was_training = model.training
    model.eval()
    try:
        image = torch.cat([model.encode_image(paired.image[i:i + chunk_size].to(device=device, dtype=torch.float32))
                           for i in range(0, paired.num_images, chunk_size)])
        text = torch.cat([model.encode_text(paired.text[i:i + chunk_size].to(device=device, dtype=torch.float32))
                          for i in range(0, paired.num_captions, chunk_size)])
    finally:
        model.train(was_training)
    return image.float(), text.float()


def embedding_metrics(image: Tensor, text: Tensor, caption_to_image: Tensor, first_caption: Tensor,
                      ks: Sequence[int], knn_k: int, backend: str = "faiss") -> tuple[dict[str, float], list[str]]:
    """Metrics of (N_img, Di) images and (N_cap, Dt) captions → (metrics, notes). Retrieval only if Di == Dt."""
    from align.metrics import cka, cknna, mutual_knn, retrieval_recall

    if backend == "faiss":  # FAISS searches host memory
        image, text = image.cpu(), text.cpu()
    metrics: dict[str, float] = {}
    notes: list[str] = []
    if image.shape[1] == text.shape[1]:
        recall = retrieval_recall(image, text, caption_to_image.to(image.device), ks=tuple(ks), backend=backend)
        metrics.update({k: float(v) for k, v in recall.items()})
        metrics["mean_R@1"] = 0.5 * (metrics["i2t_R@1"] + metrics["t2i_R@1"])
    else:
        notes.append(f"retrieval undefined: image dimension {image.shape[1]} differs from text dimension "
                     f"{text.shape[1]} (no common space without a head); alignment metrics only")
    paired_text = text[first_caption.to(text.device)]
    if image.shape[0] <= knn_k:
        notes.append(f"mutual_knn/cknna skipped: {image.shape[0]} images is not more than knn_k={knn_k}")
    else:
        metrics["mutual_knn"] = float(mutual_knn(image, paired_text, knn_k, backend=backend))
        metrics["cknna"] = float(cknna(image, paired_text, knn_k, backend=backend))
    metrics["cka"] = float(cka(image, paired_text))
    return metrics, notes


def evaluate_model(model: torch.nn.Module, paired: PairedEmbeddings, eval_cfg: Any,
                   device: torch.device) -> dict[str, float]:
    """Metrics of a head on one split (``eval_cfg``: an ``align.train.EvalConfig``)."""
    image, text = encode(model, paired, device)
    if not (bool(torch.isfinite(image).all()) and bool(torch.isfinite(text).all())):
        raise NonFiniteFeatures("the head produces NaN/inf features (its weights diverged): retrain with a smaller "
                                "learning rate or ρ")
    metrics, _ = embedding_metrics(image, text, paired.caption_to_image, paired.first_caption_per_image(),
                                   eval_cfg.ks, eval_cfg.knn_k, eval_cfg.backend)
    return metrics


def head_sharpness(model: torch.nn.Module, loss_fn: Callable[..., Tensor], image: Tensor, text: Tensor,
                   batches: list[tuple[Tensor, Tensor]], eval_cfg: Any) -> dict[str, float]:
    """Sharpness of the head weights at the training loss, averaged over fixed (image rows, caption rows) batches.

    Measured in the space of the head weights with the logit scale (and SigLIP bias) held fixed: the temperature
    sits on a clamp boundary in many runs, and including it would mix two very different scales. fp32, no autocast.
    """
    from align.metrics import hessian_top_eigenvalue, hessian_trace, worst_case_sharpness

    logit_ids = {id(p) for p in getattr(model, "logit_parameters", lambda: [])()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in logit_ids]

    def closure() -> Tensor:
        total = sum(loss_fn(**model(image[i], text[t])) for i, t in batches)
        return total / len(batches)

    was_training = model.training
    model.eval()
    try:
        worst = worst_case_sharpness(closure, params, eval_cfg.sharpness_rho, ascent_steps=eval_cfg.sharpness_ascent_steps)
        top = hessian_top_eigenvalue(closure, params, iters=eval_cfg.hessian_iters)
        trace = hessian_trace(closure, params, samples=eval_cfg.hutchinson_samples)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return {"rho": float(eval_cfg.sharpness_rho), "loss": float(worst["loss"]), "grad_norm": float(worst["grad_norm"]),
            "worst_case_first_order": float(worst["first_order"]), "worst_case_ascent": float(worst["ascent"]),
            "hessian_top_eigenvalue": float(top), "hessian_trace": float(trace),
            "batches": len(batches), "batch_size": int(batches[0][0].shape[0])}


def evaluate_run(run_dir: Path, split: str = "test", checkpoint: str = "best", device: str | None = None,
                 backend: str | None = None, log: Log | None = None) -> dict[str, Any]:
    """Evaluate a trained run's head on ``split`` → results dict, also written to RUN/eval/SPLIT-CHECKPOINT.json."""
    from align import runs
    from align.config import load_config
    from align.device import pick_device
    from align.heads import build_model
    from align.train import TrainConfig, load_data, resolve_dims

    run_dir = Path(run_dir)
    if not runs.is_run_dir(run_dir):
        raise AlignError(f"{run_dir} is not a run directory (no {runs.CONFIG_FILE}): give the folder align train wrote")
    cfg = load_config(TrainConfig, run_dir / runs.CONFIG_FILE)
    if backend is not None:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"backend": backend})})
    if split not in cfg.data.splits:
        raise AlignError(f"split {split!r} is not in the run's data.splits ({', '.join(cfg.data.splits)})")
    state, meta = runs.load_head(run_dir, checkpoint)
    paired = load_data(cfg, [split])[split]
    cfg = resolve_dims(cfg, paired)
    dev = pick_device(device or cfg.device)
    model = build_model(cfg.head, cfg.loss, cfg.image_dim, cfg.text_dim)
    _load_head_state(model, state, run_dir)
    model.to(dev)
    metrics = evaluate_model(model, paired, cfg.eval, dev)
    result = {"source": str(run_dir), "kind": "run", "checkpoint": checkpoint, "step": meta.get("step"),
              "split": split, "num_images": paired.num_images, "num_captions": paired.num_captions,
              "metrics": metrics, "notes": []}
    out = run_dir / "eval" / f"{split}-{checkpoint}.json"
    runs.write_json(out, result)
    result["written_to"] = str(out)
    if log:
        log(f"wrote {out}")
    return runs.json_safe(result)


def _load_head_state(model: torch.nn.Module, state: dict[str, Tensor], run_dir: Path) -> None:
    """Load head weights; shape mismatches (cache rebuilt with other encoders) become one AlignError line."""
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise AlignError(f"the head in {run_dir} has {key} of shape {tuple(tensor.shape)} but the cached "
                             f"embeddings need {tuple(own[key].shape)}: the cache does not match the run's encoders")
    missing = sorted(set(own) - set(state)) + sorted(set(state) - set(own))
    if missing:
        raise AlignError(f"the head in {run_dir} does not match its config (keys {', '.join(missing[:4])}): "
                         "the checkpoint comes from another configuration")
    model.load_state_dict(state)


def evaluate_embeddings(paired: PairedEmbeddings, ks: Sequence[int] = (1, 5, 10), knn_k: int = 8,
                        backend: str = "faiss", source: str = "embeddings") -> dict[str, Any]:
    """Metrics of raw cached embeddings without a head (the "no training" row) → results dict."""
    metrics, notes = embedding_metrics(paired.image.float(), paired.text.float(), paired.caption_to_image,
                                       paired.first_caption_per_image(), ks, knn_k, backend)
    return {"source": source, "kind": "raw", "checkpoint": None, "step": None,
            "split": paired.meta.get("split"), "num_images": paired.num_images,
            "num_captions": paired.num_captions, "metrics": metrics, "notes": notes}


def evaluate_cache(key_or_path: str | Path, split: str | None = None, cache_root: str | Path | None = None,
                   ks: Sequence[int] = (1, 5, 10), knn_k: int = 8, backend: str = "faiss") -> dict[str, Any]:
    """Metrics of the raw embeddings in a cache folder, or of cache ``key`` (a unique prefix will do) under ``cache_root``."""
    from align.cache import load_cache_dir, resolve_cache

    path = Path(key_or_path)
    if not path.is_dir():
        path = resolve_cache(cache_root, str(key_or_path))  # None: the default cache root (align.paths)
    paired = load_cache_dir(path)
    if split is not None and paired.meta.get("split") != split:
        raise AlignError(f"cache {path.name} holds split {paired.meta.get('split')!r}, not {split!r}: "
                         "give the key of that split (align cache ls)")
    return evaluate_embeddings(paired, ks=ks, knn_k=knn_k, backend=backend, source=str(path))


def is_finite_metrics(metrics: dict[str, float] | None) -> bool:
    return metrics is not None and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
