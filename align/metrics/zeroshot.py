"""Zero-shot classification through a head: class prompts as text, the nearest class embedding as the prediction.

Prompt ensembles follow CLIP's convention: each template's text embedding is L2-normalised, the templates of a class
are averaged, and the average is normalised again. Images are classified by cosine similarity to those class
embeddings. Ties go to the lower class index (a stable rule, so accuracy never depends on the sort's whim).

Core: tensors in, numbers out.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def class_embeddings(template_features: Tensor) -> Tensor:
    """(C, T, D) features of T prompt templates per class → (C, D) unit class embeddings (CLIP's prompt ensemble)."""
    if template_features.ndim != 3:
        raise ValueError(f"expected (classes, templates, dim), got shape {tuple(template_features.shape)}")
    return F.normalize(F.normalize(template_features.float(), dim=-1).mean(dim=1), dim=-1)


def top_k_classes(image_features: Tensor, class_emb: Tensor, k: int) -> Tensor:
    """(N, D) images, (C, D) unit class embeddings → (N, k) class indices by decreasing cosine, ties to the lower index."""
    sim = F.normalize(image_features.float(), dim=-1) @ class_emb.float().T  # (N, C)
    k = min(k, class_emb.shape[0])
    # A stable descending sort keeps equal scores in class order: the lower index wins a tie.
    return torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]


def confusion_matrix(labels: Tensor, predicted: Tensor, num_classes: int) -> Tensor:
    """(N,) true and (N,) predicted class indices → (C, C) counts, row = true class, column = prediction."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def zero_shot_metrics(image_features: Tensor, labels: Tensor, class_emb: Tensor,
                      ks: Sequence[int] = (1, 5)) -> tuple[dict[str, float], Tensor]:
    """Top-k accuracy for each k, balanced accuracy (mean per-class recall of top-1) → (metrics, confusion matrix).

    Classes without a test image are left out of the balanced accuracy (their recall is undefined).
    """
    labels = labels.to(image_features.device).long()
    ranked = top_k_classes(image_features, class_emb.to(image_features.device), max(ks))
    metrics = {f"zeroshot_top{k}": float((ranked[:, :k] == labels[:, None]).any(dim=1).double().mean()) for k in ks}
    confusion = confusion_matrix(labels.cpu(), ranked[:, 0].cpu(), class_emb.shape[0])
    support = confusion.sum(dim=1)
    recall = confusion.diagonal().double()[support > 0] / support[support > 0].double()
    metrics["zeroshot_balanced_accuracy"] = float(recall.mean())
    return metrics, confusion
