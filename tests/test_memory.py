"""The memory model of a head (align.train.memory) against hand counts, against what a real pack holds, and
against the formula the study's pack planner used before the model was merged (its pack layouts must not move)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.common import device
from align.common.errors import AlignError
from align.train.config import TrainConfig
from align.train.heads import HeadConfig, build_model
from align.train.losses import LossConfig
from align.train.memory import HeadMemory, OptimizerMemory, check_head_fits, head_memory
from align.train.optimizer import head_hparams_of
from align.train.pack import HeadPack
from helpers import data_section, train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**sections) -> TrainConfig:
    return TrainConfig.model_validate(train_config(data_section(Path("unused")), **sections))


def test_a_linear_adamw_head_part_by_part():
    """Linear 32 → 16 and 24 → 16 with biases, plus the logit scale: 33·16 + 25·16 + 1 = 929 values. AdamW keeps
    two moments and one gradient; a batch of 8 keeps 2·8·4·16 = 1024 feature values and 6·8² = 384 logit values;
    100 validation rows give 1600 features."""
    cfg = config(image_dim=32, text_dim=24, head={"out_dim": 16}, schedule={"batch_size": 8})
    memory = head_memory(cfg, eval_rows=100)
    assert memory == HeadMemory(weights=929, optimizer_state=2 * 929, gradients=929, activations=1024, logits=384,
                                features=1600)
    assert memory.bytes == 4 * (929 * 4 + 1408 + 1600) == 26_896


def test_an_mlp_msam_head_with_its_averaged_metric_on_sgd():
    """Pre-norm MLPs 10 → 5 → 4 and 6 → 5 → 4: (20 + 55 + 24) + (12 + 35 + 24) + 1 = 171 values. M-SAM on SGD with
    momentum keeps one buffer, two gradients, the saved point and δ, and its averaged metric; the hidden layers add
    3 · 5 values per row and side: 2·4·(4·4 + 15) + 6·4² = 344 activations."""
    cfg = config(image_dim=10, text_dim=6, schedule={"batch_size": 4},
                 head={"kind": "mlp", "out_dim": 4, "hidden_dim": 5, "pre_norm": True},
                 optim={"name": "msam", "base": "sgd", "momentum": 0.9, "metric_beta": 0.9})
    memory = head_memory(cfg)
    assert memory == HeadMemory(weights=171, optimizer_state=171, gradients=342, sam_point_and_delta=342,
                                averaged_metric=171, activations=2 * 4 * (4 * 4 + 15), logits=6 * 4 ** 2)
    assert memory.bytes == 4 * 1541


def test_a_frozen_projection_counts_as_weights_only():
    """The image side locked to a random projection 12 → 8 (96 frozen values, no bias); the text head 8 → 8 with
    bias and the logit scale train (73 values); SGD without momentum keeps no state."""
    cfg = config(image_dim=12, text_dim=8, schedule={"batch_size": 2}, optim={"name": "sgd", "momentum": 0.0},
                 head={"out_dim": 8, "lock": "image", "lock_mode": "random_projection"})
    memory = head_memory(cfg, eval_rows=10)
    assert memory == HeadMemory(weights=169, gradients=73, activations=2 * 2 * 32, logits=6 * 4, features=80)


def test_evaluation_holds_the_weights_and_the_features():
    cfg = config(image_dim=32, text_dim=24, head={"out_dim": 16})
    assert head_memory(cfg, eval_rows=100, training=False) == HeadMemory(weights=929, features=1600)


def test_unknown_dims_count_as_one_or_as_out_dim_on_an_identity_lock():
    """(1 + 1)·16 + 1 = 33 values before the cache is read; with the text side locked to the identity, the text
    dim must be out_dim: (1 + 1)·16 + 1 again, the text head holding nothing."""
    assert head_memory(config(head={"out_dim": 16})).weights == 2 * 2 * 16 + 1
    assert head_memory(config(head={"out_dim": 16, "lock": "text"})).weights == 2 * 16 + 1


@pytest.mark.parametrize("optim, expected", [
    ({"name": "adamw"}, OptimizerMemory(two_pass=False, buffers=2)),
    ({"name": "adam"}, OptimizerMemory(two_pass=False, buffers=2)),
    ({"name": "sgd", "momentum": 0.9}, OptimizerMemory(two_pass=False, buffers=1)),
    ({"name": "sgd", "momentum": 0.0}, OptimizerMemory(two_pass=False, buffers=0)),
    ({"name": "sam", "base": "adamw"}, OptimizerMemory(two_pass=True, buffers=2)),
    ({"name": "asam", "base": "sgd", "momentum": 0.9}, OptimizerMemory(two_pass=True, buffers=1)),
    ({"name": "msam"}, OptimizerMemory(two_pass=True, buffers=2, metric=False)),  # metric_beta 0 by default
    ({"name": "msam", "metric_beta": 0.5}, OptimizerMemory(two_pass=True, buffers=2, metric=True)),
])
def test_what_each_optimizer_keeps(optim, expected):
    assert OptimizerMemory.of(config(optim=optim).optim) == expected


@pytest.mark.parametrize("name, kwargs", [("adamw", {}), ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.0}),
                                          ("msam", {"metric_beta": 0.5, "base": "adamw"})])
def test_the_optimizer_state_is_what_a_pack_holds_after_a_step(name, kwargs):
    """Count the values of a real pack's optimizer state (and M-SAM's averaged metric) after one step."""
    cfg = config(image_dim=6, text_dim=5, head={"out_dim": 3}, optim={"name": name, **kwargs})
    torch.manual_seed(0)
    pack = HeadPack([build_model(cfg.head, cfg.loss, 6, 5)], [head_hparams_of(cfg)], ["open_clip"])
    pack.step([(slice(0, 1), torch.randn(4, 6), torch.randn(4, 5))], [0.01])
    state = pack.optim_state(0)
    buffers = sum(t.numel() for per in state["state"].values() for key, t in per.items() if key != "step")
    metric = sum(t.numel() for t in state.get("sam", {}).get("metric_ema", {}).values())
    memory = head_memory(cfg)
    assert (buffers, metric) == (memory.optimizer_state, memory.averaged_metric)


def planner_bytes_before_the_merge(model, batch_size: int, eval_rows: int, metric: bool) -> int:
    """``align.train.memory.head_bytes`` as the pack planner called it before the model was merged (two passes,
    two optimizer buffers: the most any optimizer of a study keeps), read off a real model."""
    total = sum(t.numel() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = total + trainable * (2 + 2 + 2 + (1 if metric else 0))
    head = model.head_cfg
    hidden = 0 if head.kind == "linear" else 3 * (head.hidden_dim or head.out_dim)
    activations = 2 * batch_size * (4 * head.out_dim + hidden) + 6 * batch_size * batch_size
    return 4 * (weights + activations + eval_rows * head.out_dim)


@pytest.mark.parametrize("head, loss, metric", [
    (HeadConfig(out_dim=32), LossConfig(), False),
    (HeadConfig(kind="mlp", out_dim=16, hidden_dim=48, pre_norm=True), LossConfig(kind="siglip"), True),
    (HeadConfig(kind="starmlp", out_dim=24), LossConfig(learn_scale=False), False),
    (HeadConfig(out_dim=24, lock="text"), LossConfig(), True),
    (HeadConfig(out_dim=8, lock="image", lock_mode="random_projection"), LossConfig(), False),
])
def test_a_study_plans_its_packs_with_the_numbers_it_used_before(head, loss, metric):
    cfg = config(image_dim=40, text_dim=24, head=head.model_dump(), loss=loss.model_dump(),
                 schedule={"batch_size": 48})
    model = build_model(head, loss, 40, 24)
    assert head_memory(cfg, 300, OptimizerMemory(metric=metric)).bytes == \
        planner_bytes_before_the_merge(model, 48, 300, metric)


def test_the_check_refuses_an_evaluation_one_byte_short(monkeypatch):
    """Evaluating the 929-value head of the first test on 100 rows needs 4 · (929 + 1600) = 10 116 bytes."""
    cfg = config(image_dim=32, text_dim=24, head={"out_dim": 16})
    monkeypatch.setattr(device, "available_memory", lambda dev: 10_116)
    check_head_fits(cfg, torch.device("cpu"), 100, training=False)
    monkeypatch.setattr(device, "available_memory", lambda dev: 10_115)
    with pytest.raises(AlignError, match=r"has 929 parameters and needs 1.01e-05 GB to hold it with the features "
                                         r"of 100 images and captions"):
        check_head_fits(cfg, torch.device("cpu"), 100, training=False)
