"""Packs of heads: each head trained in a pack equals the same cell trained alone by the reference path
(torch.optim / align.optim's SAM classes driven by align.optim.step.take_step: helpers.reference_run); a head's bits do
not depend on what the other slots of its pack hold, and across pack sizes it agrees to float noise."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from align.common.config import validate
from align.train.heads import HeadConfig, build_model
from align.train.losses import LossConfig
from align.optim import OPTIMIZERS, optimizer_info
from align.optim.batched import head_hparams
from align.train.pack import HeadPack
from helpers import group_batches
from align.train.run_data import Sampler, lr_factor
from helpers import (CELLS, NEW_CELLS, SIZES, cell_kwargs, data_section, make_cache, reference_run,
                     synthetic_split, train_config, write_cache)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

STEPS, WARMUP, BATCH = 50, 5, 32


def _pack_run(cells, head, loss, image, text, c2i):
    """All cells as one pack (ordered by seed so heads sharing a batch sit together) → state dict per cell."""
    order = sorted(range(len(cells)), key=lambda i: cells[i]["seed"])
    models = []
    for i in order:
        torch.manual_seed(cells[i]["seed"])
        models.append(build_model(head, loss, image.shape[1], text.shape[1]).double())
    hparams = [head_hparams(cells[i]["name"], lr=cells[i]["lr"], weight_decay=cells[i].get("weight_decay", 0.0),
                            grad_clip=cells[i].get("grad_clip"), **cell_kwargs(cells[i])) for i in order]
    pack = HeadPack(models, hparams, [loss.clamp] * len(cells))
    samplers = {s: Sampler(c2i, image.shape[0], BATCH, s, torch.device("cpu")) for s in (0, 1)}
    seeds = [cells[i]["seed"] for i in order]
    for step in range(STEPS):
        groups = [(slice(seeds.index(s), len(seeds) - seeds[::-1].index(s)), *samplers[s].batch(step))
                  for s in sorted(set(seeds))]
        pack.step(group_batches(groups, image, text), [lr * lr_factor(step, STEPS, WARMUP) for lr in pack.hp.host["lr"]])
    return {i: pack.head_state(slot) for slot, i in enumerate(order)}


@pytest.mark.parametrize("head,loss", [
    (HeadConfig(kind="linear", out_dim=16), LossConfig(kind="clip")),
    (HeadConfig(kind="starmlp", out_dim=12, hidden_dim=20, pre_norm=True),
     LossConfig(kind="siglip", clamp="upper", perturb_logit_scale=True)),
    # head.rescale: the linear head's c·V through the model's own forward, the Dinh-rescaled ReLU MLP's start
    (HeadConfig(kind="linear", out_dim=16, rescale=10.0), LossConfig(kind="clip")),
    (HeadConfig(kind="mlp", activation="relu", out_dim=12, hidden_dim=20, rescale=0.1), LossConfig(kind="clip")),
], ids=["linear-clip", "starmlp-siglip", "linear-rescaled", "mlp-relu-rescaled"])
@pytest.mark.parametrize("cells", [CELLS, NEW_CELLS], ids=["registry", "issue24"])
def test_each_head_of_a_pack_equals_its_cell_trained_alone_in_float64(head, loss, cells):
    image, text, c2i = (torch.from_numpy(a) for a in synthetic_split("train", 256))
    image, text = image.double(), text.double()
    packed = _pack_run(cells, head, loss, image, text, c2i)
    assert {c["name"] for c in CELLS + NEW_CELLS} == set(OPTIMIZERS)  # the registry, every entry
    for i, cell in enumerate(cells):
        ref = reference_run(cell, head, loss, image, text, c2i, STEPS, WARMUP, BATCH)
        torch.manual_seed(cell["seed"])
        start = build_model(head, loss, image.shape[1], text.shape[1]).double().state_dict()
        for key, want in ref.items():
            got = packed[i][key]
            rel = float((got - want).norm() / want.norm().clamp_min(1e-300))
            assert rel <= 1e-9, (cell, key, rel)
            if key.endswith("weight") and want.ndim > 1:  # and the head did train
                assert float((want - start[key]).norm() / start[key].norm()) > 1e-3, (cell, key)


# -- through the trainer: files, float32 recall, and independence from the pack ---------------------------

TRAIN_CELLS = [{"name": "adamw", "lr": 1e-2, "weight_decay": 1e-4}, {"name": "msam", "lr": 1e-2, "rho": 0.05},
               {"name": "sgd", "lr": 2.0, "momentum": 0.9}, {"name": "fsam", "lr": 1e-2, "rho": 0.05}]


@pytest.fixture(scope="module")
def big_test_cache(tmp_path_factory) -> dict:
    """The training helpers' cache with a 1000-image test split, so that one retrieval flip is 0.05–0.1 points."""
    data = make_cache(tmp_path_factory.mktemp("cache"))
    write_cache(data, "test", *synthetic_split("test", 1000))
    return data


def _cfg(data, cell, seed):
    from align.train.config import TrainConfig

    return validate(TrainConfig, train_config(data, optim=cell, seed=seed, schedule={"steps": 60},
                                              eval={"every": 20, "sharpness": False}))


def _close(a, b, rel=1e-4) -> bool:
    """Equal structure; numbers equal or within ``rel`` (relative, with an absolute floor of ``rel``)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and sorted(a) == sorted(b) and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=rel, abs_tol=rel) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_a_pack_of_runs_writes_each_run_directory_like_a_lone_run(big_test_cache, tmp_path):
    """The same files and records as `align train` of each cell alone, equal to float32 noise (BLAS may sum a
    matmul of another shape in another order, so bit equality across pack sizes is not promised)."""
    from safetensors.torch import load_file

    from align.train.loop import train, train_pack

    cfgs = [_cfg(big_test_cache, cell, seed) for cell, seed in zip(TRAIN_CELLS, (0, 1, 1, 0))]
    packed = train_pack(cfgs, [tmp_path / f"pack{i}" for i in range(4)], progress=False)
    for i, cfg in enumerate(cfgs[:3]):  # each against the same cell alone (a pack of one: `align train`)
        alone = train(cfg, tmp_path / f"alone{i}", progress=False)
        a_res, p_res = ({k: v for k, v in r.items() if k != "wall_time_s"} for r in (alone, packed[i]))
        assert _close(a_res, p_res, rel=3e-3)  # a recall of 1000 queries moves by 0.001 a flip
        assert abs(a_res["final_test"]["mean_R@1"] - p_res["final_test"]["mean_R@1"]) <= 0.002
        a = load_file(tmp_path / f"alone{i}" / "checkpoints" / "step-0000060.safetensors")
        b = load_file(tmp_path / f"pack{i}" / "checkpoints" / "step-0000060.safetensors")
        assert sorted(a) == sorted(b)
        for k in a:
            if a[k].is_floating_point():
                assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
        records = [[json.loads(line) for line in (tmp_path / f"{kind}{i}" / "metrics.jsonl").read_text().splitlines()]
                   for kind in ("alone", "pack")]
        train_records = [[r for r in rs if r["kind"] == "train"] for rs in records]
        assert _close(*train_records), i
        assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]]
    assert json.loads((tmp_path / "pack1" / "results.json").read_text())["status"] == "done"


def test_float32_pack_test_recall_agrees_with_the_reference_loop(big_test_cache, tmp_path):
    from align.train.loop import train_pack
    from helpers import head_recall_at_1

    cfgs = [_cfg(big_test_cache, cell, 0) for cell in TRAIN_CELLS]
    results = train_pack(cfgs, [tmp_path / f"r{i}" for i in range(len(cfgs))], progress=False)
    image, text, c2i = synthetic_split("train", SIZES["train"])
    test = synthetic_split("test", 1000)
    for cfg, res in zip(cfgs, results):
        cell = dict(cfg.optim.model_dump(include={"name", "lr", "weight_decay", "momentum", "rho"}), seed=0)
        cell = {k: v for k, v in cell.items() if v is not None}
        if not optimizer_info(cell["name"]).two_pass:
            cell.pop("rho", None)
        if cell["name"] != "sgd":
            cell.pop("momentum", None)
        state = _reference_float32(cell, cfg, torch.from_numpy(image), torch.from_numpy(text), torch.from_numpy(c2i))
        ref = sum(head_recall_at_1(state, *test)) / 2
        got = res["final_test"]["mean_R@1"]
        assert abs(got - ref) <= 0.002, (cell["name"], got, ref)
        assert got > 0.3


def _reference_float32(cell, cfg, image, text, c2i):
    """The reference loop in float32 for the trainer's config (schedule and batch size from ``cfg``)."""
    sched = cfg.schedule
    return reference_run(cell, cfg.head, cfg.loss, image.float(), text.float(), c2i, sched.steps, sched.warmup_steps,
                          sched.batch_size)


@pytest.mark.parametrize("dims,head,loss", [
    ((8, 16, 16, 8), HeadConfig(out_dim=8), LossConfig()),  # the compare tests' tiny heads
    ((128, 1280, 384, 256), HeadConfig(out_dim=256), LossConfig()),  # the default study's
    ((8, 16, 16, 8), HeadConfig(kind="starmlp", out_dim=8, pre_norm=True), LossConfig(kind="siglip")),
    ((64, 32, 24, 32), HeadConfig(kind="mlp", out_dim=32), LossConfig()),
], ids=["tiny-linear", "default-linear", "tiny-starmlp-siglip", "mlp"])
@pytest.mark.parametrize("idle", ["fresh", "zero", "nan"])
def test_a_heads_bits_do_not_depend_on_what_the_other_slots_of_its_pack_hold(dims, head, loss, idle):
    """What lets a killed pack resume exactly with its finished runs idle: head 0 of a pack of 4 steps to the
    same bits whether the other 3 slots train beside it or sit idle holding other weights (even NaN)."""
    batch, image_dim, text_dim, _ = dims
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, image_dim, generator=gen), torch.randn(batch, text_dim, generator=gen)
    out = {}
    for case in ("training", idle):
        models = []
        for seed in range(4):
            torch.manual_seed(seed if case in ("training", "fresh") or seed == 0 else seed + 10)
            model = build_model(head, loss, image_dim, text_dim)
            if seed > 0 and case in ("zero", "nan"):
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(0.0 if case == "zero" else float("nan"))
            models.append(model)
        pack = HeadPack(models, [head_hparams("msam", lr=0.01, rho=0.5, metric_beta=0.5)] * 4, ["open_clip"] * 4)
        active = torch.tensor([True, case == "training", case == "training", case == "training"])
        for _ in range(3):
            stats = pack.step([(slice(0, 4), x, y)], [0.01] * 4, active=active)
        out[case] = (pack.head_state(0), stats, pack.encode(x, "image", slice(0, 4))[0], pack.optim_state(0))
    (w1, s1, e1, o1), (w2, s2, e2, o2) = out["training"], out[idle]
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    assert all(torch.equal(getattr(s1, f)[0], getattr(s2, f)[0]) for f in ("loss", "grad_norm", "delta_norm"))
    assert torch.equal(e1, e2)
    assert all(torch.equal(o1["state"][i][key], o2["state"][i][key]) for i in o1["state"] for key in o1["state"][i])
    assert torch.equal(o1["sam"]["metric_ema"][0], o2["sam"]["metric_ema"][0])
    torch.manual_seed(0)
    start = build_model(head, loss, image_dim, text_dim).state_dict()
    assert any(not torch.equal(w1[n], start[n]) for n in w1)  # it did train
    assert bool(s1.stepped[0]) and not bool(s2.stepped[1])  # an idle slot never steps


def test_a_head_in_a_pack_of_another_size_agrees_to_float_noise():
    """The other side of BLAS's shape-dependent kernels: a pack of 1 against the same head in a pack of 4."""
    x, y = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), torch.randn(8, 16)
    out = {}
    for k in (1, 4):
        models = []
        for seed in range(k):
            torch.manual_seed(seed)
            models.append(build_model(HeadConfig(out_dim=8), LossConfig(), 16, 16))
        pack = HeadPack(models, [head_hparams("msam", lr=0.01, rho=0.5)] * k, ["open_clip"] * k)
        for _ in range(3):
            pack.step([(slice(0, k), x, y)], [0.01] * k)
        out[k] = pack.head_state(0)
    assert all(torch.allclose(out[1][n], out[4][n], rtol=1e-5, atol=1e-6) for n in out[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/gpu_check.sh on one)")
def test_cuda_pack_step_and_validation_stay_within_the_memory_estimate():
    from align.train.config import TrainConfig
    from align.train.memory import OptimizerMemory, head_memory

    k, batch, dim, rows = 16, 1024, 512, 6000
    device = torch.device("cuda")
    head, loss = HeadConfig(out_dim=dim), LossConfig()
    x, y = torch.randn(batch, dim, device=device), torch.randn(batch, dim, device=device)
    val = torch.randn(rows, dim, device=device)
    data = torch.cuda.memory_allocated()
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model(head, loss, dim, dim).to(device))
    pack = HeadPack(models, [head_hparams("msam", lr=1e-3)] * k, ["open_clip"] * k)
    del models  # construction copies are not the pack's
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the optimizer state exists from the first step on
        pack.step([(slice(0, k), x, y)], [1e-3] * k, bf16=True)
    pack.encode(val, "image", slice(0, k))
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - data  # the pack at its peak: weights, state, gradients, activations
    cfg = TrainConfig.model_validate(train_config(data_section(Path("unused")), head=head.model_dump(),
                                                  loss=loss.model_dump(), schedule={"batch_size": batch},
                                                  image_dim=dim, text_dim=dim))
    estimate = head_memory(cfg, rows, OptimizerMemory()).bytes * k
    assert used <= estimate, (used, estimate)
    assert used >= estimate / 4, (used, estimate)  # and not a wild over-estimate


def test_shared_linears_gradients_equal_autograds_of_the_plain_expression():
    """The hand-written backward (weight gradient as one row-major matmul) against autograd of x Wᵀ + b, in
    float64, with the input's gradient too."""
    from align.train.pack import shared_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    probe = torch.randn(3, 8, 4, dtype=torch.float64, generator=gen)
    ours = torch.autograd.grad((shared_linear(x, w, b) * probe).sum(), [x, w, b])
    plain = torch.nn.functional.normalize(torch.einsum("ni,goi->gno", x, w) + b[:, None, :], dim=-1)
    theirs = torch.autograd.grad((plain * probe).sum(), [x, w, b])
    for a, e in zip(ours, theirs):
        assert torch.allclose(a, e, rtol=1e-12, atol=1e-12)
    assert torch.allclose(shared_linear(x, w, None), torch.nn.functional.normalize(torch.einsum("ni,goi->gno", x, w),
                                                                                   dim=-1), rtol=1e-12)
