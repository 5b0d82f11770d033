"""GSAM, Friendly SAM, LookSAM and Lion in the places a method reaches: the study plan's pass count, Lion's own betas
in a run's and a study cell's config, the perturbations that are not implemented, the grid axes the registry
declares, and the toy experiments."""
from __future__ import annotations

import math

import pytest
import torch

from align.common.config import validate
from align.optim.batched import head_hparams
from align.optim.registry import AXIS_SYMBOLS, METHOD_AXES, OPTIMIZERS
from align.study.compare import plan
from align.study.config import CompareConfig, cell_config, grid_cells
from align.toy import experiments as toy
from align.train.config import TrainConfig
from helpers import data_section


def _study(**grid):
    return validate(CompareConfig, {"data": data_section("/tmp/unused-cache"), "schedule": {"steps": 10, "warmup_steps": 2},
                                    "grid": {"seeds": [0], **grid}})


def test_the_plan_counts_looksams_single_pass_steps():
    """LookSAM takes its second pass on steps 0, k, 2k, ... only: 10 + ⌈10/k⌉ passes per run, not 20."""
    cfg = _study(optimizers=["sgd", "sam", "looksam", "gsam", "friendly_sam"],
                 method_axes={"looksam": {"k": [1, 3, 20]}})
    runs = plan(cfg)
    # sgd 10, sam 20, gsam 20, friendly_sam 20 (both take SAM's two passes on every step), looksam k=1: 20,
    # k=3: 14, k=20: 11 — one lr, one ρ, one seed each
    assert runs["forward_backward_passes"] == 10 + 20 + 20 + 20 + (10 + 10) + (10 + 4) + (10 + 1)
    shared = _study(optimizers=["sam", "looksam"], lrs=[0.1, 0.01])
    assert plan(shared)["forward_backward_passes"] == 2 * 20 + 2 * (10 + math.ceil(10 / 10))  # the default k 10


def test_lion_steps_with_its_own_betas_unless_the_config_sets_them():
    run = validate(TrainConfig, {"data": data_section("/tmp/unused-cache"), "optim": {"name": "lion"}})
    assert run.optim.betas == (0.9, 0.99)
    under_sam = validate(TrainConfig, {"data": data_section("/tmp/unused-cache"),
                                       "optim": {"name": "sam", "base": "lion"}})
    assert under_sam.optim.betas == (0.9, 0.99)
    adamw = validate(TrainConfig, {"data": data_section("/tmp/unused-cache")})
    assert adamw.optim.betas == (0.9, 0.999)  # as every run's config.yaml held it before
    given = validate(TrainConfig, {"data": data_section("/tmp/unused-cache"),
                                   "optim": {"name": "lion", "betas": [0.95, 0.98]}})
    assert given.optim.betas == (0.95, 0.98)
    study = _study(optimizers=["sam", "lion", "adamw"])
    assert study.optim.betas is None  # the study leaves them to each cell
    betas = {c.optimizer: cell_config(study, c, "/tmp/unused-run").optim.betas for c in grid_cells(study.grid)}
    assert betas == {"sam": (0.9, 0.999), "lion": (0.9, 0.99), "adamw": (0.9, 0.999)}


@pytest.mark.parametrize("name", ["gsam", "friendly_sam", "looksam"])
def test_a_local_perturbation_is_refused_where_it_is_not_implemented(name):
    with pytest.raises(ValueError, match=f"local is not implemented for {name}"):
        head_hparams(name, lr=0.1, perturbation="local")
    assert head_hparams("msam", lr=0.1, perturbation="local")["local_perturbation"]


def test_the_grid_axes_are_the_registrys_with_their_symbols():
    """α, ρ for GSAM (ρ by grid.rhos), σ, λ, ρ for Friendly SAM, k, α, ρ for LookSAM, as the issue asks."""
    axes = {name: [h.name for h in info.hparams if h.axis] for name, info in OPTIMIZERS.items() if info.two_pass}
    assert axes["gsam"] == ["alpha"] and axes["friendly_sam"] == ["sigma", "lmbda"] and axes["looksam"] == ["k", "alpha"]
    assert METHOD_AXES[:3] == ("eta", "alpha", "metric_beta")  # the column order of studies made before
    assert {AXIS_SYMBOLS[a] for a in ("sigma", "lmbda", "k")} == {"σ", "λ", "k"}
    cfg = _study(optimizers=["sam", "friendly_sam"], method_axes={"friendly_sam": {"sigma": [0.0, 1.0],
                                                                                  "lmbda": [0.6, 0.9]}})
    keys = sorted(c.key for c in grid_cells(cfg.grid) if c.optimizer == "friendly_sam")
    assert keys == ["friendly_sam_lr0.001_rho0.05_sigma0_lmbda0.6_s0", "friendly_sam_lr0.001_rho0.05_sigma0_lmbda0.9_s0",
                    "friendly_sam_lr0.001_rho0.05_sigma1_lmbda0.6_s0", "friendly_sam_lr0.001_rho0.05_sigma1_lmbda0.9_s0"]


def test_the_toy_grid_and_banana_run_every_method_with_the_registrys_label():
    banana = toy.banana_experiment(steps=30)
    assert [row["method"] for row in banana.summary] == ["GD", *(OPTIMIZERS[m].label for m in toy.TOY_METHODS
                                                                  if m != "gd")]
    grid = toy.grid_experiment(n=3, max_steps=20)
    assert list(grid.runs) == [m for m in toy.TOY_METHODS if m != "gd"]
    assert {"gsam", "friendly_sam", "looksam", "lion"} <= set(grid.runs)
    assert grid.settings["asam_eta"] == 0.01 and grid.settings["fsam_eta"] == 1.0
    for row in grid.summary:
        assert row["at_saddle"] + row["at_flat"] + row["elsewhere"] == 9


def test_a_toy_looksam_run_is_its_class_driven_alone():
    """The toy's batched runs drive LookSAM's one-pass steps in lockstep; each run equals its class alone."""
    starts = torch.tensor([[-1.5, 0.5], [2.0, -0.3]], dtype=torch.float64)
    batched = toy.run_optimizer(toy.banana, starts, "looksam", lr=0.01, rho=1.0, steps=25)
    for b in range(2):
        p = torch.nn.Parameter(starts[b].clone().view(1, 2))
        opt = toy.build_toy_optimizer("looksam", p, lr=0.01, rho=1.0)
        for _ in range(25):
            opt.step(lambda: toy.banana(p).sum().backward())
        torch.testing.assert_close(batched.final_points[b], p.detach().view(2), rtol=0, atol=1e-14)
