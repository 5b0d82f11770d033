"""Zero-shot classification maths against direct computations: CLIP's prompt ensemble, top-k, balanced accuracy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align.metrics.zeroshot import class_embeddings, confusion_matrix, top_k_classes, zero_shot_metrics


def test_prompt_ensemble_normalises_each_template_then_the_mean():
    feats = torch.tensor([[[3.0, 4.0], [0.0, 2.0]],      # class 0: (0.6, 0.8) and (0, 1) after normalising
                          [[-1.0, 0.0], [-10.0, 0.0]]])  # class 1: both (-1, 0): scale of a template must not matter
    emb = class_embeddings(feats)
    mean0 = np.array([0.3, 0.9])
    assert emb[0].tolist() == pytest.approx((mean0 / np.linalg.norm(mean0)).tolist())
    assert emb[1].tolist() == pytest.approx([-1.0, 0.0])
    assert torch.linalg.vector_norm(emb, dim=1).tolist() == pytest.approx([1.0, 1.0])


def brute_force(images: np.ndarray, labels: np.ndarray, classes: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Per image: cosine to every class in float64, rank with an explicit (−score, index) key, count hits."""
    out = {f"zeroshot_top{k}": 0.0 for k in ks}
    per_class: dict[int, list[bool]] = {}
    for x, y in zip(images, labels):
        scores = [float(x @ c / (np.linalg.norm(x) * np.linalg.norm(c))) for c in classes]
        order = sorted(range(len(classes)), key=lambda i: (-round(scores[i], 12), i))
        for k in ks:
            out[f"zeroshot_top{k}"] += y in order[:k]
        per_class.setdefault(int(y), []).append(order[0] == y)
    n = len(images)
    out = {k: v / n for k, v in out.items()}
    out["zeroshot_balanced_accuracy"] = float(np.mean([np.mean(v) for v in per_class.values()]))
    return out


def test_zero_shot_metrics_match_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    classes = rng.standard_normal((10, 16))
    labels = rng.integers(0, 10, size=300)
    labels[labels == 7] = 3  # class 7 has no image: left out of the balanced accuracy
    images = classes[labels] + 1.5 * rng.standard_normal((300, 16))
    class_emb = torch.nn.functional.normalize(torch.tensor(classes), dim=1)
    metrics, confusion = zero_shot_metrics(torch.tensor(images), torch.tensor(labels), class_emb, ks=(1, 5))
    expected = brute_force(images, labels, classes, (1, 5))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert 0.2 < metrics["zeroshot_top1"] < metrics["zeroshot_top5"] < 1.0  # the data is neither trivial nor random
    assert int(confusion.sum()) == 300 and int(confusion[7].sum()) == 0
    assert metrics["zeroshot_top1"] == pytest.approx(float(confusion.diagonal().sum()) / 300)


def test_ties_go_to_the_lower_class_index_and_k_is_capped_at_the_class_count():
    class_emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ranked = top_k_classes(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), class_emb, k=5)
    assert ranked.tolist() == [[0, 1, 2], [2, 0, 1]]


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    metrics, _ = zero_shot_metrics(torch.eye(3)[[0, 0, 1, 2, 2, 2]] + 0.0, torch.tensor([0, 0, 1, 2, 2, 2]),
                                   torch.eye(3), ks=(1,))
    assert metrics["zeroshot_balanced_accuracy"] == pytest.approx(1.0) and not math.isnan(metrics["zeroshot_top1"])
