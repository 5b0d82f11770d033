"""Zero-shot classification through trained heads, against a brute force over the raw head weights in float64:
``align.measure.evaluate_head``, the training loop's validation (the pack's own encoding), and raw embeddings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align.cache.embeddings import PairedEmbeddings
from align.metrics.measure import evaluate_embeddings, evaluate_head

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
CLASSES, TEMPLATES, IMAGE_DIM, TEXT_DIM = 6, 3, 12, 7


def labelled_split(n: int, seed: int, image_dim: int = IMAGE_DIM, text_dim: int = TEXT_DIM) -> PairedEmbeddings:
    """Images around a centre per class; one caption per image and T prompts per class from a fixed linear map of
    the centres, with noise; class 5 has no image in some splits (left out of the balanced accuracy)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((CLASSES, image_dim))
    mapping = np.random.default_rng(98).standard_normal((image_dim, text_dim)) / math.sqrt(image_dim)
    labels = rng.integers(0, CLASSES - (seed % 2), size=n)
    image = centres[labels] + 1.2 * rng.standard_normal((n, image_dim))
    text = image @ mapping + 0.5 * rng.standard_normal((n, text_dim))
    prompts = (centres @ mapping)[:, None, :] + 0.4 * rng.standard_normal((CLASSES, TEMPLATES, text_dim))
    return PairedEmbeddings(torch.tensor(image, dtype=torch.float32), torch.tensor(text, dtype=torch.float32),
                            torch.arange(n), {"split": "val"}, labels=torch.tensor(labels),
                            class_text=torch.tensor(prompts, dtype=torch.float32),
                            class_names=[f"c{i}" for i in range(CLASSES)])


def brute_force(state: dict[str, torch.Tensor], paired: PairedEmbeddings) -> dict[str, float]:
    """Linear heads from their raw weights in float64; per class the mean of its normalised prompt features,
    normalised; per image an explicit (−cosine, class) ordering."""
    w = {k: v.double().numpy() for k, v in state.items()}
    img = paired.image.to_tensor().double().numpy() @ w["image_head.weight"].T + w["image_head.bias"]
    prompts = paired.class_text.double().numpy() @ w["text_head.weight"].T + w["text_head.bias"]
    prompts /= np.linalg.norm(prompts, axis=-1, keepdims=True)
    classes = prompts.mean(axis=1)
    classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
    hits1 = hits5 = 0
    per_class: dict[int, list[bool]] = {}
    for x, y in zip(img, paired.labels.tolist()):
        cos = [float(x @ c / np.linalg.norm(x)) for c in classes]
        order = sorted(range(len(classes)), key=lambda i: (-cos[i], i))
        hits1 += order[0] == y
        hits5 += y in order[:5]
        per_class.setdefault(y, []).append(order[0] == y)
    n = paired.num_images
    return {"zeroshot_top1": hits1 / n, "zeroshot_top5": hits5 / n,
            "zeroshot_balanced_accuracy": float(np.mean([np.mean(v) for v in per_class.values()]))}


def test_evaluate_head_zero_shot_matches_brute_force_through_a_linear_head():
    from align.train.heads import HeadConfig, build_model
    from align.train.losses import LossConfig
    from align.train.config import EvalConfig

    paired = labelled_split(120, seed=1)
    torch.manual_seed(3)
    model = build_model(HeadConfig(out_dim=8), LossConfig(), IMAGE_DIM, TEXT_DIM)
    metrics = evaluate_head(model, paired, EvalConfig(ks=[1, 5], knn_k=2, backend="torch"), torch.device("cpu"))
    expected = brute_force(model.state_dict(), paired)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert 1 / CLASSES < expected["zeroshot_top1"] < expected["zeroshot_top5"] < 1.0  # neither chance nor trivial


def test_training_validates_and_tests_zero_shot_like_evaluate_head(tmp_path):
    """select=zeroshot_top1: the best head is picked by the pack's validation zero-shot, which must equal
    evaluate_head's of the saved best head; the test confusion matrix adds up to its top-1."""
    from align.train.heads import build_model
    from align.train.run_dir import RunDir
    from align.train.run_data import RunData
    from align.train.loop import train_pack
    from align.train.config import TrainConfig

    data = {"dataset": {"kind": "mnist", "mnist": {"image_size": 32}}, "device": "cpu", "cache_root": str(tmp_path),
            "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
            "text_encoder": {"backend": "open_clip", "model": "ViT-S-16"}}
    cfg = TrainConfig.model_validate({
        "data": data, "device": "cpu", "head": {"out_dim": 8}, "optim": {"name": "sam", "lr": 0.01, "rho": 0.05},
        "schedule": {"steps": 30, "batch_size": 16, "warmup_steps": 2}, "image_dim": IMAGE_DIM, "text_dim": TEXT_DIM,
        "eval": {"every": 10, "select": "zeroshot_top1", "ks": [1, 5], "knn_k": 2, "backend": "torch",
                 "sharpness": False}, "checkpoint_every": 10, "loss_at_step": 10})
    splits = RunData(train=labelled_split(96, seed=2), val=labelled_split(40, seed=3), test=labelled_split(50, seed=4))
    result = train_pack([cfg], [tmp_path / "run"], data=splits, progress=False)[0]
    assert result["select"] == "zeroshot_top1" and set(result["max_val"]) >= {"zeroshot_top1", "zeroshot_top5"}
    state, meta = RunDir(tmp_path / "run").load_head("best")
    model = build_model(cfg.head, cfg.loss, IMAGE_DIM, TEXT_DIM)
    model.load_state_dict(state)
    val = evaluate_head(model, splits.val, cfg.eval, torch.device("cpu"))
    assert result["best_val"]["zeroshot_top1"] == pytest.approx(val["zeroshot_top1"], abs=1e-12)
    assert meta["score"] == pytest.approx(val["zeroshot_top1"], abs=1e-12)
    test = brute_force(state, splits.test)
    for key, value in test.items():
        assert result["best_test"][key] == pytest.approx(value, abs=1e-12), key
    confusion = np.array(result["zeroshot"]["confusion"])
    assert confusion.shape == (CLASSES, CLASSES) and confusion.sum() == 50
    assert np.trace(confusion) / 50 == pytest.approx(result["best_test"]["zeroshot_top1"])
    assert result["zeroshot"]["classes"] == [f"c{i}" for i in range(CLASSES)]


def test_raw_embeddings_get_zero_shot_only_in_a_shared_space():
    same = labelled_split(80, seed=5, image_dim=TEXT_DIM)
    result = evaluate_embeddings(same, ks=(1, 5), knn_k=2, backend="torch")
    identity = {"image_head.weight": torch.eye(TEXT_DIM), "image_head.bias": torch.zeros(TEXT_DIM),
                "text_head.weight": torch.eye(TEXT_DIM), "text_head.bias": torch.zeros(TEXT_DIM)}
    for key, value in brute_force(identity, same).items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-12), key
    assert np.array(result["zeroshot"]["confusion"]).sum() == 80
    apart = evaluate_embeddings(labelled_split(80, seed=5), ks=(1, 5), knn_k=2, backend="torch")
    assert "zeroshot_top1" not in apart["metrics"] and any("zero-shot undefined" in n for n in apart["notes"])


def test_a_held_out_validation_keeps_each_image_its_label():
    from align.train.run_data import holdout_split

    paired = labelled_split(30, seed=6)
    rest, held = holdout_split(paired, 10)
    for part in (rest, held):
        assert part.labelled and torch.equal(part.class_text, paired.class_text)
        rows = [int(torch.nonzero((paired.image.to_tensor() == row).all(dim=1))[0]) for row in part.image.to_tensor()]
        assert part.labels.tolist() == paired.labels[rows].tolist()


def test_select_zeroshot_needs_a_labelled_kind():
    from align.common.config import validate
    from align.common.errors import AlignError
    from align.train.config import TrainConfig

    data = {"dataset": {"kind": "synthetic"}, "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
            "text_encoder": {"backend": "open_clip", "model": "ViT-S-16"}}
    with pytest.raises(AlignError, match="needs a labelled dataset"):
        validate(TrainConfig, {"data": data, "eval": {"select": "zeroshot_top1"}}, source="test")
