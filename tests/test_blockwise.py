"""The contrastive losses in row blocks (align.train.blockwise) against the textbook B × B formulas written here and
against open_clip's ClipLoss / SigLipLoss: the loss and every input's gradient (and second derivatives, which the
sharpness measures take) to 1e-10 relative in float64 at B = 1,024 with blocks of 100; packed K-head steps with
blocks against the same steps without; the block-size rule, the config key, the config hash and the memory model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from align.common import device
from align.common.errors import AlignError
from align.optim.batched import head_hparams
from align.train import blockwise
from align.train.blockwise import (
    blockwise_clip_loss,
    blockwise_clip_loss_rows,
    blockwise_siglip_loss,
    blockwise_siglip_loss_rows,
    loss_block_rows,
)
from align.train.config import TrainConfig, hashed_config
from align.train.heads import HeadConfig, build_model
from align.train.identity import config_hash
from align.train.losses import LossConfig, clip_loss, loss_for
from align.train.memory import OptimizerMemory, check_head_fits, head_memory, heads_that_fit, logits_values
from align.train.pack import HeadPack
from helpers import group_batches
from align.train.run_data import Sampler, lr_factor
from helpers import CELLS, IMAGE_DIM, TEXT_DIM, cell_kwargs, data_section, synthetic_split, train_config

pytestmark = pytest.mark.usefixtures("one_thread")

B, D, BLOCK = 1024, 24, 100  # 10 blocks of 100 and one of 24
ROWS = slice(256, 768)  # a rank's rows (2 of 4 ranks): 5 blocks of 100 and one of 12


# -- the textbook formulas, B × B at once ----------------------------------------------------------------------

def textbook_clip(x, y, s, rows=slice(None)):
    """Mean over the rows of −log softmax(L)_ii both ways, L = s x yᵀ (rows: those images and those texts)."""
    logits = s * x @ y.T
    own = torch.arange(len(x))[rows]
    image_to_text = torch.logsumexp(logits[own], dim=1) - logits[own, own]
    text_to_image = torch.logsumexp(logits[:, own], dim=0) - logits[own, own]
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


def textbook_siglip(x, y, s, b, rows=slice(None)):
    """−Σ_ij log σ(z_ij (s xᵢ·yⱼ + b)) over the rows' images and all texts / their count, z = +1 on the pairs."""
    own = torch.arange(len(x))[rows]
    logits = s * x[own] @ y.T + b
    z = -torch.ones_like(logits)
    z[torch.arange(len(own)), own] = 1.0
    return -torch.log(torch.sigmoid(z * logits)).sum() / len(own)


def _inputs(seed: int, batch: int = B, siglip: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, D, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(0.6 * x + torch.randn(batch, D, generator=g, dtype=torch.float64), dim=-1)  # paired
    scalars = [14.0, -4.0] if siglip else [14.0]
    return [t.requires_grad_() for t in (x, y, *(torch.tensor(v, dtype=torch.float64) for v in scalars))]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _loss_and_grads(fn, inputs):
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


CASES = {  # name: (blockwise, textbook, siglip?)
    "clip": (lambda *a: blockwise_clip_loss(*a, block_rows=BLOCK), textbook_clip, False),
    "siglip": (lambda *a: blockwise_siglip_loss(*a, block_rows=BLOCK), textbook_siglip, True),
    "clip-rows": (lambda *a: blockwise_clip_loss_rows(*a, rows=ROWS, block_rows=BLOCK),
                  lambda *a: textbook_clip(*a, rows=ROWS), False),
    "siglip-rows": (lambda *a: blockwise_siglip_loss_rows(*a, rows=ROWS, block_rows=BLOCK),
                    lambda *a: textbook_siglip(*a, rows=ROWS), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_of_100_give_the_textbook_loss_and_every_gradient_to_1e_10_in_float64(name):
    blocked, textbook, siglip = CASES[name]
    inputs = _inputs(0, siglip=siglip)
    want, want_grads = _loss_and_grads(textbook, inputs)
    got, got_grads = _loss_and_grads(blocked, inputs)
    assert _rel(got, want) <= 1e-10
    for which, g, w in zip(["image", "text", "scale", "bias"], got_grads, want_grads):
        assert _rel(g, w) <= 1e-10, (name, which, _rel(g, w))


def test_blocks_give_open_clips_clip_and_siglip_losses_and_gradients():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    for blocked, theirs, siglip in [(CASES["clip"][0], open_clip_loss.ClipLoss(), False),
                                    (CASES["siglip"][0], open_clip_loss.SigLipLoss(), True)]:
        inputs = _inputs(1, siglip=siglip)
        want, want_grads = _loss_and_grads(theirs, inputs)
        got, got_grads = _loss_and_grads(blocked, inputs)
        assert _rel(got, want) <= 1e-10
        for g, w in zip(got_grads, want_grads):
            assert _rel(g, w) <= 1e-10


@pytest.mark.parametrize("name", list(CASES))
def test_second_derivatives_in_blocks_equal_the_textbooks_so_sharpness_needs_no_b_squared(name):
    """Hessian–vector products (what hessian_top_eigenvalue and hessian_trace take) through the blocks."""
    blocked, textbook, siglip = CASES[name]
    inputs = _inputs(2, siglip=siglip)
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in inputs]

    def hvp(fn):
        grads = torch.autograd.grad(fn(*inputs), inputs, create_graph=True)
        return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(grads, v)), inputs)

    for got, want in zip(hvp(blocked), hvp(textbook)):
        assert _rel(got, want) <= 1e-10, name


def test_k_heads_under_vmap_equal_each_head_alone():
    """The pack's use: vmap over K heads' features and scales, differentiated with autograd.grad."""
    x, y, _ = (t.detach() for t in _inputs(4))
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, D, D, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([5.0, 10.0, 20.0], dtype=torch.float64, requires_grad=True)

    def head(fn, wk, sk):
        return fn(F.normalize(x @ wk, dim=-1), F.normalize(y @ wk.T, dim=-1), sk)

    batched = torch.func.vmap(lambda wk, sk: head(CASES["clip"][0], wk, sk))(w, scale)
    grads = torch.autograd.grad(batched.sum(), [w, scale])
    for k in range(3):
        alone = head(textbook_clip, w[k], scale[k])
        want = torch.autograd.grad(alone, [w, scale])
        assert _rel(batched[k].detach(), alone.detach()) <= 1e-10
        assert _rel(grads[0][k], want[0][k]) <= 1e-10 and _rel(grads[1][k], want[1][k]) <= 1e-10


def test_bf16_features_under_autocast_are_computed_in_float32_inside():
    """Autocast (CPU here, CUDA in training) must not take the blocks' matmuls to bf16, forward or backward."""
    x, y, s = (t.detach() for t in _inputs(6, batch=256))
    x16, y16 = x.to(torch.bfloat16).requires_grad_(), y.to(torch.bfloat16).requires_grad_()
    x32, y32 = x16.detach().float().requires_grad_(), y16.detach().float().requires_grad_()
    want = blockwise_clip_loss(x32, y32, s.float(), block_rows=50)
    want_grads = torch.autograd.grad(want, [x32, y32])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = blockwise_clip_loss(x16, y16, s.float(), block_rows=50)
        got_grads = torch.autograd.grad(got, [x16, y16])
    assert got.dtype == torch.float32 and torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w.to(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_under_bf16_autocast_the_blocks_agree_with_the_float32_loss():
    x, y, s, b = (t.detach().cuda().float() for t in _inputs(7, siglip=True))
    for blocked, textbook, extra in [(CASES["clip"][0], textbook_clip, ()),
                                     (CASES["siglip"][0], textbook_siglip, (b,))]:
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        want, want_grads = _loss_and_grads(lambda *a, f=textbook, e=extra: f(*a, s, *e), [xs, ys])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = blocked(xs.to(torch.bfloat16), ys.to(torch.bfloat16), s, *extra)
        got_grads = torch.autograd.grad(got, [xs, ys])
        assert got.dtype == torch.float32 and _rel(got.detach(), want) <= 1e-2
        for g, w in zip(got_grads, want_grads):
            assert _rel(g, w) <= 3e-2


# -- the block size and where the loss takes it -------------------------------------------------------------

@pytest.mark.parametrize("setting, rows, heads, block", [
    (None, 128, 1, None), (None, 128, 4096, None),  # the default study: the plain loss, as before
    (None, 8192, 1, None),  # 8192² × 4 bytes = 256 MiB exactly: still whole
    (None, 16384, 1, 4096), (None, 32768, 1, 2048),  # 2**28 / (B × 4)
    (None, 16384, 8, 512), (None, 32768, 3, 682),  # 2**28 / (K × B × 4), rounded down
    (None, 10 ** 9, 1, 1),  # at least one row
    (100, 1024, 1, 100), (100, 1024, 64, 100), (1024, 1024, 1, None), (5000, 1024, 1, None),  # forced
])
def test_the_block_rule(setting, rows, heads, block):
    assert loss_block_rows(setting, rows, rows, heads) == block


def test_the_default_at_a_small_batch_is_todays_loss_bit_for_bit():
    """No blocks while the logits fit: the default study's numbers cannot move."""
    x, y, s = (t.detach().float() for t in _inputs(8, batch=128))
    assert torch.equal(loss_for(LossConfig(), heads=64)(image_features=x, text_features=y, logit_scale=s),
                       clip_loss(x, y, s))


def test_the_configured_loss_takes_blocks_where_the_rule_says(monkeypatch):
    seen = []
    original = blockwise._SoftmaxBlocks.apply
    monkeypatch.setattr(blockwise._SoftmaxBlocks, "apply", lambda *a: seen.append(a[-1].block) or original(*a))
    x, y, s = (t.detach() for t in _inputs(9))
    loss_for(LossConfig(block_rows=100))(image_features=x, text_features=y, logit_scale=s)
    monkeypatch.setattr(blockwise, "LOGITS_BUDGET", 3 * B * 4 * 70)  # 3 heads' rows of 1,024 float32 logits, 70 of them
    loss_for(LossConfig(), heads=3)(image_features=x, text_features=y, logit_scale=s)
    assert seen == [100, 70]


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "auto"])
def test_a_block_rows_that_is_not_a_whole_number_of_at_least_one_is_refused_at_load(tmp_path, value):
    with pytest.raises(ValidationError, match="block_rows"):
        TrainConfig.model_validate(train_config(data_section(tmp_path), loss={"block_rows": value}))


def test_block_rows_at_its_default_leaves_the_config_hash_as_it_was(tmp_path):
    """Runs trained before the key existed keep their hash (and resume); a forced block is hashed."""
    cfg = TrainConfig.model_validate(train_config(data_section(tmp_path)))
    before = hashed_config(cfg)
    assert "block_rows" not in before["loss"]
    dumped = cfg.model_dump(mode="json")
    del dumped["loss"]["block_rows"]
    assert hashed_config(cfg) == hashed_config(TrainConfig.model_validate(dumped))
    forced = TrainConfig.model_validate(train_config(data_section(tmp_path), loss={"block_rows": 100}))
    assert config_hash(hashed_config(forced)) != config_hash(before)


# -- packed K-head steps with blocks against the same steps without ---------------------------------------------

STEPS, BATCH = 6, 40  # blocks of 7: five of 7 and one of 5


def _pack_states(head: HeadConfig, loss: LossConfig, cells: list[dict]) -> list[dict[str, torch.Tensor]]:
    image, text, c2i = (torch.from_numpy(a) for a in synthetic_split("train", 256))
    image, text = image.double(), text.double()
    models = []
    for cell in cells:
        torch.manual_seed(cell["seed"])
        models.append(build_model(head, loss, image.shape[1], text.shape[1]).double())
    hparams = [head_hparams(c["name"], lr=c["lr"], weight_decay=c.get("weight_decay", 0.0),
                            grad_clip=c.get("grad_clip"), **cell_kwargs(c)) for c in cells]
    pack = HeadPack(models, hparams, [loss.clamp] * len(cells))
    sampler = Sampler(c2i, image.shape[0], BATCH, 0, torch.device("cpu"))
    for step in range(STEPS):
        batches = group_batches([(slice(0, len(cells)), *sampler.batch(step))], image, text)
        pack.step(batches, [lr * lr_factor(step, STEPS, 2) for lr in pack.hp.host["lr"]])
    return [pack.head_state(k) for k in range(len(cells))]


ADAMW_AND_MSAM = [dict(CELLS[2], seed=0), dict(CELLS[4], seed=0), dict(CELLS[5], seed=0)]


@pytest.mark.parametrize("head, loss", [
    (HeadConfig(kind="linear", out_dim=16), LossConfig(kind="clip")),
    (HeadConfig(kind="starmlp", out_dim=12, hidden_dim=20, pre_norm=True),
     LossConfig(kind="siglip", clamp="upper", perturb_logit_scale=True)),
], ids=["linear-clip", "starmlp-siglip"])
def test_packed_adamw_and_msam_steps_with_blocks_equal_the_steps_without(head, loss):
    plain = _pack_states(head, loss, ADAMW_AND_MSAM)
    blocked = _pack_states(head, loss.model_copy(update={"block_rows": 7}), ADAMW_AND_MSAM)
    torch.manual_seed(0)
    start = build_model(head, loss, IMAGE_DIM, TEXT_DIM).double().state_dict()  # every cell's seed is 0
    for cell, want, got in zip(ADAMW_AND_MSAM, plain, blocked):
        for key in want:
            assert _rel(got[key], want[key]) <= 1e-10, (cell["name"], key)
        moved = [k for k in want if k.endswith("weight") and want[k].ndim > 1]
        assert all(_rel(want[k], start[k]) > 1e-3 for k in moved), cell  # and the heads did train


# -- the memory model --------------------------------------------------------------------------------------------

def _config(**sections) -> TrainConfig:
    return TrainConfig.model_validate(train_config(data_section(Path("unused")), image_dim=512, text_dim=512,
                                                   **sections))


def test_the_memory_model_counts_the_blocks_logits_not_b_squared():
    """Batch 32,768 of one head: blocks of 2,048 rows, two (2,048 × 32,768) float32 matrices at once = 512 MiB;
    forced whole: 6 B² values = 25.8 GB."""
    auto = _config(schedule={"batch_size": 32768})
    assert head_memory(auto).logits == 2 * 2048 * 32768
    assert logits_values(auto.loss, 32768, heads=4) == 4 * 2 * 512 * 32768  # a pack of 4: blocks of 512
    assert head_memory(auto, heads=4).logits == 2 * 512 * 32768  # each head's share
    small = _config(schedule={"batch_size": 128})
    assert head_memory(small).logits == 6 * 128 * 128  # the plain loss, as the model counted before


def test_the_check_refuses_logits_that_cannot_fit_and_says_which_key_to_set(monkeypatch):
    monkeypatch.setattr(device, "available_memory", lambda dev: 8 * 10 ** 9)
    check_head_fits(_config(schedule={"batch_size": 32768}), torch.device("cpu"))  # automatic blocks fit 8 GB
    whole = _config(schedule={"batch_size": 32768}, loss={"block_rows": 32768})
    with pytest.raises(AlignError, match=r"25.8 GB in the loss's logits.*smaller loss.block_rows") as err:
        check_head_fits(whole, torch.device("cpu"))
    assert "\n" not in str(err.value) and len(str(err.value)) <= 300


def test_a_pack_counts_its_logits_once_for_all_its_heads():
    """At batch 16,384 the plain loss's logits (6 B² × 4 bytes = 6.4 GB a head) would allow no head in 4 GiB; in
    blocks the pack's logits stay at 2 × 2**28 bytes whatever K, so the heads' own bytes decide."""
    cfg = _config(schedule={"batch_size": 16384}, head={"out_dim": 256})
    alone = head_memory(cfg, 0, OptimizerMemory())
    rest = alone.bytes - 4 * alone.logits
    budget = 4 * 2 ** 30
    k = heads_that_fit(cfg, budget, 0, OptimizerMemory())

    def logits_of(heads: int) -> int:
        return 4 * heads * 16384 * 2 * max(1, 2 ** 28 // (heads * 16384 * 4))

    assert k * rest + logits_of(k) <= budget < (k + 1) * rest + logits_of(k + 1)
    assert k > budget // alone.bytes  # more than one head alone's count allows
    plain = _config(schedule={"batch_size": 128})
    one = head_memory(plain, 0, OptimizerMemory()).bytes
    assert heads_that_fit(plain, 10 * one + 5, 0, OptimizerMemory()) == 10  # unblocked: as the planner always did


# -- a whole run ------------------------------------------------------------------------------------------------

def _close(a, b, rel: float) -> bool:
    if isinstance(a, dict):
        return sorted(a) == sorted(b) and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1.0)
    return a == b


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_align_train_with_blocks_gives_the_run_without_sharpness_included(cache_data, tmp_path, kind):
    """Training, validation, test and the sharpness measures (second derivatives) through the blocks, float32."""
    from align.common.config import validate
    from align.train.loop import train

    ev = {"every": 20, "sharpness_batches": 2, "hessian_iters": 3, "hutchinson_samples": 2,
          "sharpness_ascent_steps": 1}
    results = []
    for name, block_rows in (("whole", None), ("blocks", 24)):  # batch 64: blocks of 24, 24 and 16
        cfg = validate(TrainConfig, train_config(cache_data, optim={"name": "msam", "lr": 1e-2, "rho": 0.05},
                                                 loss={"kind": kind, "block_rows": block_rows},
                                                 schedule={"steps": 40}, eval=ev))
        results.append(train(cfg, tmp_path / name, progress=False))
    whole, blocked = ({k: v for k, v in r.items() if k not in ("wall_time_s", "config_hash")} for r in results)
    assert whole["sharpness"]["final"]["hessian_trace"] > 0
    assert _close(blocked, whole, rel=1e-4), kind  # float32: 2.5e-6 apart at most, measured
