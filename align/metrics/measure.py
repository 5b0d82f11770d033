"""Measurements of a head or of raw embeddings: retrieval recall both ways, alignment metrics, sharpness (core).

Metric names (shared by validation during training, ``align eval`` and the results files; see ``metric_names``):
``i2t_R@k`` / ``t2i_R@k`` (CLIP_benchmark's multi-caption convention, fractions in [0, 1]), ``mean_R@1`` (their
mean at k = 1), the rank statistics ``*_mean_rank`` / ``*_median_rank`` (1-based), and on paired rows — each image
with its FIRST caption, as the paper's one-caption-per-image MS-COCO subset — ``mutual_knn`` and ``cknna``
(k = ``knn_k``) and linear ``cka``. Raw embeddings of different dimensions have no common space, so retrieval is
undefined for them: only the alignment metrics are reported, with a note saying so.

On a labelled split (``PairedEmbeddings.labelled``) zero-shot classification is measured too: each class prompt
template's text embedding goes through the text head, CLIP's prompt ensemble makes one embedding per class, each
image goes through the image head, and the nearest class is the prediction (``align.zeroshot``):
``zeroshot_top1``, ``zeroshot_top5`` and ``zeroshot_balanced_accuracy`` (mean per-class recall of top-1).

Pure: tensors in, numbers out; no disk, no printing.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from align.cache.embeddings import PairedEmbeddings
from align.common.errors import AlignError
from align.metrics.alignment import cka, cknna, mutual_knn
from align.metrics.retrieval import retrieval_recall
from align.metrics.sharpness import hessian_top_eigenvalue, hessian_trace, worst_case_sharpness
from align.metrics.zeroshot import class_embeddings, zero_shot_metrics

ALIGNMENT_KEYS = ("mutual_knn", "cknna", "cka")
ZEROSHOT_KEYS = ("zeroshot_top1", "zeroshot_top5", "zeroshot_balanced_accuracy")
RANK_KEYS = ("i2t_mean_rank", "i2t_median_rank", "t2i_mean_rank", "t2i_median_rank")


class NonFiniteFeatures(AlignError):
    """A head maps finite embeddings to NaN/inf features (its weights blew up): training treats it as divergence."""


def metric_names(ks: Sequence[int]) -> list[str]:
    """Every metric ``embedding_metrics`` can produce for recall cut-offs ``ks`` (what a head's evaluation reports)."""
    recall = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in sorted(set(ks))]
    return recall + ["mean_R@1", *RANK_KEYS, *ALIGNMENT_KEYS, *ZEROSHOT_KEYS]


def lower_is_better(name: str) -> bool:
    """Ranks improve downwards; every other metric upwards."""
    return name in RANK_KEYS


def update_best_over_training(best: dict[str, float], metrics: dict[str, float], ks: Sequence[int]) -> None:
    """Fold one validation into ``best``: the best value of every metric so far (max; min for the ranks)."""
    for key in metric_names(ks):
        value = metrics.get(key)
        if value is None or not math.isfinite(value):
            continue
        old = best.get(key)
        if old is None or (value < old if lower_is_better(key) else value > old):
            best[key] = value


@torch.no_grad()
def encode(model: torch.nn.Module, paired: PairedEmbeddings, device: torch.device,
           chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """(N_img, D) image and (N_cap, D) caption features of ``model`` (float32, on ``device``): the rows streamed
    through it ``chunk_size`` at a time (read as float32 from the cache's maps; only the features are whole)."""
    was_training = model.training
    model.eval()
    try:
        image = torch.cat([model.encode_image(rows.to(device)) for rows in paired.image.chunks(chunk_size)])
        text = torch.cat([model.encode_text(rows.to(device)) for rows in paired.text.chunks(chunk_size)])
    finally:
        model.train(was_training)
    return image.float(), text.float()


def embedding_metrics(image: Tensor, text: Tensor, caption_to_image: Tensor, first_caption: Tensor,
                      ks: Sequence[int], knn_k: int, backend: str = "faiss") -> tuple[dict[str, float], list[str]]:
    """Metrics of (N_img, Di) images and (N_cap, Dt) captions → (metrics, notes). Retrieval only if Di == Dt."""
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


def zero_shot(image: Tensor, prompts: Tensor, labels: Tensor) -> tuple[dict[str, float], Tensor]:
    """(N, D) image features, (C, T, D) prompt features (same space), (N,) labels → (metrics, (C, C) confusion)."""
    return zero_shot_metrics(image, labels, class_embeddings(prompts), ks=(1, 5))


@torch.no_grad()
def head_zero_shot(model: torch.nn.Module, paired: PairedEmbeddings, device: torch.device,
                   image: Tensor | None = None) -> tuple[dict[str, float], Tensor]:
    """Zero-shot metrics and confusion of a head on a labelled split; ``image``: its image features if known."""
    assert paired.labels is not None and paired.class_text is not None
    was_training = model.training
    model.eval()
    try:
        if image is None:
            image = encode(model, paired, device)[0]
        c, t, d = paired.class_text.shape
        prompts = model.encode_text(paired.class_text.reshape(c * t, d).to(device=device, dtype=torch.float32))
    finally:
        model.train(was_training)
    return zero_shot(image.float(), prompts.float().view(c, t, -1), paired.labels)


def evaluate_head(model: torch.nn.Module, paired: PairedEmbeddings, eval_cfg: Any,
                  device: torch.device) -> dict[str, float]:
    """Metrics of a head on one split (``eval_cfg``: an ``align.train_config.EvalConfig``); zero-shot too when
    the split is labelled."""
    image, text = encode(model, paired, device)
    if not (bool(torch.isfinite(image).all()) and bool(torch.isfinite(text).all())):
        raise NonFiniteFeatures("the head produces NaN/inf features (its weights diverged): retrain with a smaller "
                                "learning rate or ρ")
    metrics, _ = embedding_metrics(image, text, paired.caption_to_image, paired.first_caption_per_image(),
                                   eval_cfg.ks, eval_cfg.knn_k, eval_cfg.backend)
    if paired.labelled:
        metrics.update(head_zero_shot(model, paired, device, image=image)[0])
    return metrics


def raw_zero_shot(paired: PairedEmbeddings, image: Tensor | None = None) -> tuple[dict[str, float], Tensor | None,
                                                                                   list[str]]:
    """Zero-shot of raw embeddings: (metrics, confusion, notes); defined only when both towers share a width.
    ``image``: the split's image rows as float32, when already read."""
    if not paired.labelled:
        return {}, None, []
    assert paired.labels is not None and paired.class_text is not None
    if paired.image.shape[1] != paired.class_text.shape[2]:
        return {}, None, [f"zero-shot undefined: image dimension {paired.image.shape[1]} differs from text dimension "
                          f"{paired.class_text.shape[2]} (no common space without a head)"]
    metrics, confusion = zero_shot(image if image is not None else paired.image.to_tensor(),
                                   paired.class_text.float(), paired.labels)
    return metrics, confusion, []


def evaluate_embeddings(paired: PairedEmbeddings, ks: Sequence[int] = (1, 5, 10), knn_k: int = 8,
                        backend: str = "faiss", source: str = "embeddings") -> dict[str, Any]:
    """Metrics of raw cached embeddings without a head (the "no training" row) → results dict. The raw
    embeddings are the retrieval's input here: they are read whole, as float32, once."""
    image = paired.image.to_tensor()
    metrics, notes = embedding_metrics(image, paired.text.to_tensor(), paired.caption_to_image,
                                       paired.first_caption_per_image(), ks, knn_k, backend)
    zs_metrics, confusion, zs_notes = raw_zero_shot(paired, image)
    metrics.update(zs_metrics)
    out = {"source": source, "kind": "raw", "checkpoint": None, "step": None,
           "split": paired.meta.get("split"), "num_images": paired.num_images,
           "num_captions": paired.num_captions, "metrics": metrics, "notes": notes + zs_notes}
    if confusion is not None:
        out["zeroshot"] = confusion_record(confusion, paired)
    return out


def top_images(image: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(N, D) images, (Q, D) caption queries → (Q, k) cosine scores and image indices, best first (ties: the
    lower index)."""
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(image.float(), dim=-1).T
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :min(k, image.shape[0])]
    return torch.gather(sim, 1, order), order


def confusion_record(confusion: Tensor, paired: PairedEmbeddings) -> dict[str, Any]:
    """The confusion matrix as a JSON-able record: classes, prompt templates, counts (row = true class)."""
    return {"classes": list(paired.class_names or []), "templates": list(paired.meta.get("prompt_templates", [])),
            "confusion": confusion.tolist()}


def head_sharpness(model: torch.nn.Module, loss_fn: Callable[..., Tensor], image: Tensor, text: Tensor,
                   batches: list[tuple[Tensor, Tensor]], eval_cfg: Any) -> dict[str, float]:
    """Sharpness of the head weights at the training loss, averaged over fixed (image rows, caption rows) batches.

    Measured in the space of the head weights with the logit scale (and SigLIP bias) held fixed: the temperature
    sits on a clamp boundary in many runs, and including it would mix two very different scales. fp32, no autocast.
    ``eval.sharpness_geometries`` adds the worst cases of the adaptive and Monge balls (``<geometry>_first_order``,
    ``<geometry>_ascent``), over every head parameter, biases included.
    """
    logit_ids = {id(p) for p in getattr(model, "logit_parameters", lambda: [])()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in logit_ids]

    def closure() -> Tensor:
        total = sum(loss_fn(**model(image[i], text[t])) for i, t in batches)
        return total / len(batches)

    was_training = model.training
    model.eval()
    try:
        worst = worst_case_sharpness(closure, params, eval_cfg.sharpness_rho, ascent_steps=eval_cfg.sharpness_ascent_steps)
        others = {geometry: worst_case_sharpness(closure, params, eval_cfg.sharpness_rho, geometry=geometry,
                                                 ascent_steps=eval_cfg.sharpness_ascent_steps)
                  for geometry in eval_cfg.sharpness_geometries}
        top = hessian_top_eigenvalue(closure, params, iters=eval_cfg.hessian_iters)
        trace = hessian_trace(closure, params, samples=eval_cfg.hutchinson_samples)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return {"rho": float(eval_cfg.sharpness_rho), "loss": float(worst["loss"]), "grad_norm": float(worst["grad_norm"]),
            "worst_case_first_order": float(worst["first_order"]), "worst_case_ascent": float(worst["ascent"]),
            "hessian_top_eigenvalue": float(top), "hessian_trace": float(trace),
            "batches": len(batches), "batch_size": int(batches[0][0].shape[0]),
            **{f"{geometry}_{key}": float(w[key]) for geometry, w in others.items()
               for key in ("first_order", "ascent")}}
