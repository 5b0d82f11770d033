"""Heads: shapes, kinds, locked sides, parameter groups and the logit-scale clamp policies."""
import math

import pytest
import torch
from torch import nn

from align.common.config import validate
from align.common.errors import AlignError
from align.train.heads import HeadConfig, build_model
from align.train.losses import LossConfig


@pytest.mark.parametrize("kind", ["linear", "mlp", "starmlp"])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_shapes_and_normalised_outputs(kind, pre_norm):
    model = build_model(HeadConfig(kind=kind, out_dim=8, hidden_dim=12, pre_norm=pre_norm), LossConfig(), 20, 10)
    out = model(torch.randn(5, 20), torch.randn(5, 10))
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == (5, 8) and out["text_features"].shape == (5, 8)
    assert torch.allclose(out["image_features"].norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.allclose(model.encode_text(torch.randn(3, 10)).norm(dim=1), torch.ones(3), atol=1e-6)
    assert abs(out["logit_scale"].item() - 1 / 0.07) < 1e-4


def test_head_kinds_have_the_documented_structure():
    lin = build_model(HeadConfig(kind="linear", out_dim=8), LossConfig(), 20, 10)
    assert sum(p.numel() for p in lin.image_head.parameters()) == 20 * 8 + 8
    mlp = build_model(HeadConfig(kind="mlp", out_dim=8, hidden_dim=12), LossConfig(), 20, 10)
    assert sum(p.numel() for p in mlp.image_head.parameters()) == (20 * 12 + 12) + (12 * 8 + 8)
    star = build_model(HeadConfig(kind="starmlp", out_dim=8, hidden_dim=12), LossConfig(), 20, 10)
    assert sum(p.numel() for p in star.image_head.parameters()) == 2 * (20 * 12 + 12) + (12 * 8 + 8)
    # StarMLP computes W3 (GELU(W1 x) * W2 x) + b3.
    h = star.image_head
    x = torch.randn(4, 20)
    ref = h.out(torch.nn.functional.gelu(x @ h.gate.weight.T + h.gate.bias) * (x @ h.value.weight.T + h.value.bias))
    assert torch.allclose(h(x), ref, atol=1e-6)


def test_siglip_outputs_bias_and_init_values():
    model = build_model(HeadConfig(out_dim=4), LossConfig(kind="siglip"), 6, 6)
    out = model(torch.randn(3, 6), torch.randn(3, 6))
    assert set(out) == {"image_features", "text_features", "logit_scale", "logit_bias"}
    assert abs(out["logit_scale"].item() - 10.0) < 1e-5 and out["logit_bias"].item() == -10.0
    fixed = build_model(HeadConfig(out_dim=4), LossConfig(kind="clip", learn_scale=False, init_scale=20.0), 6, 6)
    assert not isinstance(fixed.log_scale, nn.Parameter) and abs(float(fixed.log_scale) - math.log(20.0)) < 1e-6
    assert "log_scale" not in dict(fixed.named_parameters())


def test_lock_identity_and_random_projection_are_frozen():
    model = build_model(HeadConfig(lock="image", lock_mode="identity", out_dim=6), LossConfig(), 6, 9)
    x = torch.randn(4, 6)
    assert torch.allclose(model.encode_image(x), x / x.norm(dim=1, keepdim=True), atol=1e-6)
    assert not list(model.image_head.parameters())
    proj = build_model(HeadConfig(lock="text", lock_mode="random_projection", out_dim=5), LossConfig(), 7, 9)
    w = proj.text_head.weight
    assert not w.requires_grad and w.shape == (5, 9)
    again = build_model(HeadConfig(lock="text", lock_mode="random_projection", out_dim=5), LossConfig(), 7, 9)
    assert torch.equal(w, again.text_head.weight)  # seeded: the same projection every time
    trainable = {id(p) for g in proj.param_groups(0.1) for p in g["params"]}
    assert id(w) not in trainable
    assert all(p.requires_grad for p in proj.image_head.parameters())


def test_lock_identity_with_wrong_dim_is_a_user_error():
    with pytest.raises(AlignError, match="out_dim=6"):
        build_model(HeadConfig(lock="image", lock_mode="identity", out_dim=4), LossConfig(), 6, 9)


def test_param_groups_split_decay():
    model = build_model(HeadConfig(kind="mlp", out_dim=4, hidden_dim=5, pre_norm=True),
                        LossConfig(kind="siglip", perturb_logit_scale=False), 6, 3)
    groups = {g["name"]: g for g in model.param_groups(0.05)}
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    decay = {by_id[id(p)] for p in groups["decay"]["params"]}
    no_decay = {by_id[id(p)] for p in groups["no_decay"]["params"]}
    logit = {by_id[id(p)] for p in groups["logit"]["params"]}
    # Sequential(LayerNorm, Sequential(Linear, GELU, Linear)) per side.
    linear_w = {f"{side}_head.1.{i}.weight" for side in ("image", "text") for i in (0, 2)}
    assert decay == linear_w
    assert no_decay == ({f"{side}_head.1.{i}.bias" for side in ("image", "text") for i in (0, 2)}
                        | {f"{side}_head.0.{w}" for side in ("image", "text") for w in ("weight", "bias")})
    assert logit == {"log_scale", "logit_bias"}
    assert decay | no_decay | logit == set(named) and not (decay & no_decay)
    assert groups["decay"]["weight_decay"] == 0.05
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["logit"]["weight_decay"] == 0.0
    assert groups["logit"]["perturb"] is False and groups["decay"]["perturb"] is True
    perturbing = build_model(HeadConfig(out_dim=4), LossConfig(perturb_logit_scale=True), 6, 3)
    assert {g["name"]: g for g in perturbing.param_groups(0.0)}["logit"]["perturb"] is True
    torch.optim.SGD(model.param_groups(0.05), lr=0.1)  # accepted by a torch optimizer as is


@pytest.mark.parametrize("policy,value,expected", [
    ("open_clip", -3.0, 0.0), ("open_clip", 7.0, math.log(100)), ("open_clip", 2.0, 2.0),
    ("upper", -3.0, -3.0), ("upper", 7.0, math.log(100)), ("none", -3.0, -3.0), ("none", 7.0, 7.0)])
def test_clamp_policies(policy, value, expected):
    model = build_model(HeadConfig(out_dim=4), LossConfig(clamp=policy), 6, 3)
    with torch.no_grad():
        model.log_scale.fill_(value)
    model.clamp_logit_scale_()
    assert abs(model.log_scale.item() - expected) < 1e-6


def test_unknown_config_key_is_one_line_error():
    with pytest.raises(AlignError, match="unknown key 'outdim'"):
        validate(HeadConfig, {"outdim": 3}, "head")
