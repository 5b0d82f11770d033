"""The contrastive losses equal open_clip's ClipLoss / SigLipLoss on the same inputs (the reference)."""
import math

import pytest
import torch
import torch.nn.functional as F

from align.train.heads import HeadConfig, build_model
from align.train.losses import LossConfig, clip_loss, loss_for, siglip_loss

open_clip_loss = pytest.importorskip("open_clip.loss")


def _features(batch, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    y = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    return x, y


@pytest.mark.parametrize("batch,dim,scale,seed", [(8, 16, 1 / 0.07, 0), (33, 5, 1.0, 1), (128, 64, 100.0, 2)])
def test_clip_loss_equals_open_clip(batch, dim, scale, seed):
    x, y = _features(batch, dim, torch.float64, seed)
    s = torch.tensor(scale, dtype=torch.float64)
    ref = open_clip_loss.ClipLoss()(x, y, s)
    assert abs(float(clip_loss(x, y, s)) - float(ref)) < 1e-6
    x32, y32 = x.float(), y.float()
    ref32 = open_clip_loss.ClipLoss()(x32, y32, s.float())
    assert abs(float(clip_loss(x32, y32, s.float())) - float(ref32)) < 1e-5


@pytest.mark.parametrize("batch,dim,scale,bias,seed", [(8, 16, 10.0, -10.0, 0), (31, 7, 3.0, 0.5, 1),
                                                       (64, 32, 100.0, -5.0, 2)])
def test_siglip_loss_equals_open_clip(batch, dim, scale, bias, seed):
    x, y = _features(batch, dim, torch.float64, seed)
    s, b = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    ref = open_clip_loss.SigLipLoss()(x, y, s, b)
    assert abs(float(siglip_loss(x, y, s, b)) - float(ref)) < 1e-6


def test_gradients_match_open_clip():
    x, y = _features(16, 8, torch.float64, 3)
    for ours, theirs, extra in [(clip_loss, open_clip_loss.ClipLoss(), ()),
                                (siglip_loss, open_clip_loss.SigLipLoss(), (torch.tensor(-3.0, dtype=torch.float64),))]:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        s = torch.tensor(5.0, dtype=torch.float64)
        ga = torch.autograd.grad(ours(xa, y, s, *extra), xa)[0]
        gb = torch.autograd.grad(theirs(xb, y, s, *extra), xb)[0]
        assert torch.allclose(ga, gb, atol=1e-10)


def test_uniform_logits_give_log_batch():
    # The paper's "diverged" value: equal logits make the CLIP loss ln(batch).
    x = F.normalize(torch.ones(128, 4, dtype=torch.float64), dim=-1)
    assert abs(float(clip_loss(x, x, 1.0)) - math.log(128)) < 1e-9


def test_loss_for_and_model_output_feed_the_loss():
    # loss_for gives the plain function's value while the logits fit the budget (blocks: tests/test_blockwise.py).
    x, y = _features(8, 4, torch.float64, 4)
    assert loss_for(LossConfig(kind="clip"))(image_features=x, text_features=y, logit_scale=3.0) == clip_loss(x, y, 3.0)
    assert loss_for(LossConfig(kind="siglip"))(image_features=x, text_features=y, logit_scale=3.0, logit_bias=-1.0) \
        == siglip_loss(x, y, 3.0, -1.0)
    for kind in ("clip", "siglip"):
        cfg = LossConfig(kind=kind)
        model = build_model(HeadConfig(out_dim=8), cfg, 12, 10)
        out = model(torch.randn(6, 12), torch.randn(6, 10))
        ref = (open_clip_loss.ClipLoss()(**out) if kind == "clip" else open_clip_loss.SigLipLoss()(**out))
        assert abs(loss_for(cfg)(**out).item() - ref.item()) < 1e-5
