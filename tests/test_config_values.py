"""Every bad value a user can type is refused when the config loads, before any data is read: one short line.

Each case was either a traceback after training had started (ZeroDivisionError at eval.every=0), or silently
accepted (lr=true read as 1.0, a NaN lr reported as the optimizer's divergence, duplicate seeds training one cell
twice, a study name escaping the studies folder).
"""
from __future__ import annotations

import copy

import pytest
import yaml

from align.common.config import validate
from align.common.errors import AlignError

from helpers import data_section


def study(**changes):
    cfg = {"data": data_section("/tmp/unused-cache"), "grid": {"optimizers": ["sgd", "sam"]}}
    for path, value in changes.items():
        node = cfg
        *parents, last = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


BAD = {
    "eval.every=0": {"eval__every": 0},
    "checkpoint_every=0": {"checkpoint_every": 0},
    "keep_checkpoints=-1": {"keep_checkpoints": -1},
    "diverge_patience=0": {"diverge_patience": 0},
    "loss.init_scale=0": {"loss__init_scale": 0},
    "lr=0": {"optim__lr": 0},
    "lr=true": {"optim__lr": True},
    "lr=nan": {"optim__lr": float("nan")},
    "lr=inf": {"optim__lr": float("inf")},
    "lr=-1": {"optim__lr": -1.0},
    "grad_clip=-1": {"optim__grad_clip": -1.0},
    "grad_clip=0": {"optim__grad_clip": 0},
    "grad_clip=inf": {"optim__grad_clip": float("inf")},
    "seed=2^63": {"seed": 2 ** 63},
    "seed=-1": {"seed": -1},
    "seed=true": {"seed": True},
    "knn_k=0": {"eval__knn_k": 0},
    "grid duplicate seeds": {"grid__seeds": [0, 1, 0]},
    "grid duplicate lrs": {"grid__lrs": [0.1, 0.1]},
    "grid nan lr": {"grid__lrs": [float("nan")]},
    "grid inf rho": {"grid__rhos": [float("inf")]},
    "grid negative rho": {"grid__rhos": [-0.1]},
    "grid lr override duplicate": {"grid__lr_overrides": {"sgd": [0.3, 0.3]}},
    "grid boolean lr": {"grid__lrs": [True]},
    "grid seed 2^63": {"grid__seeds": [2 ** 63]},
    "study name ../": {"name": "../outside"},
    "study name absolute": {"name": "/tmp/x"},
    "study name empty": {"name": ""},
    "rho=nan": {"optim__rho": float("nan")},
    # issue 21: values that were accepted, or refused only once the work had begun
    "betas=1": {"optim__betas": [0.9, 1.0]},  # torch refused it only when it built Adam, after the data loaded
    "betas=-0.1": {"optim__betas": [-0.1, 0.999]},
    "betas=nan": {"optim__betas": [float("nan"), 0.999]},
    "betas=true": {"optim__betas": [True, 0.999]},
    "sharpness_rho=inf": {"eval__sharpness_rho": float("inf")},  # align train finished, then crashed printing None
    "sharpness_rho=1e300": {"eval__sharpness_rho": 1e300},  # inf in the fp32 perturbation: every figure NaN
    "sharpness_rho=nan": {"eval__sharpness_rho": float("nan")},
    "sharpness_rho=0": {"eval__sharpness_rho": 0},
    "hidden_dim=-1": {"head__hidden_dim": -1},  # a traceback
    "hidden_dim=0": {"head__hidden_dim": 0},  # a degenerate head, trained with exit 0
    "out_dim=0": {"head__out_dim": 0},
    "lock_seed=true": {"head__lock_seed": True},
    "diverge_tol=inf": {"diverge_tol": float("inf")},  # every run "diverged", with a false reason
    "diverge_tol=nan": {"diverge_tol": float("nan")},
    "diverge_tol=0": {"diverge_tol": 0},  # never looks
    "diverge_grad_tol=inf": {"diverge_grad_tol": float("inf")},
    "diverge_grad_tol=0": {"diverge_grad_tol": 0},
    "ks entry true": {"eval__ks": [1, True]},  # read as [1, 1]
    "image_dim=0": {"image_dim": 0},
    "workers=0": {"workers": 0},
    "workers=true": {"workers": True},
    "grid boolean seed": {"grid__seeds": [0, True]},
    "grid lr_overrides outside the grid": {"grid__lr_overrides": {"msam": [0.1]}},  # ignored, echoed by the plan
    "grid rho_overrides outside the grid": {"grid__rho_overrides": {"msam": [0.1]}},
    "grid method_axes outside the grid": {"grid__method_axes": {"msam": {"alpha": [0.5]}}},
    "grid rho_overrides of a single-pass optimizer": {"grid__rho_overrides": {"sgd": [0.1]}},  # it has no ρ
    "synthetic val_images=0": {"data__dataset__synthetic__val_images": 0},  # failed only at embed
    "synthetic seed=true": {"data__dataset__synthetic__seed": True},
    "synthetic fraction=true": {"data__dataset__synthetic__texture_fraction": True},
    "data batch_size=true": {"data__batch_size": True},
    "a split the synthetic set lacks": {"data__splits": ["train", "val", "test", "extra"]},
    # issue 24: the new methods' hyper-parameters, in their ranges at load (a cell's own range included)
    "gsam alpha=2": {"optim__alpha": 2.0, "grid__optimizers": ["sam", "gsam"]},  # M-SAM's α may be 2, GSAM's not
    "gsam rho_min above rho": {"optim__rho_min": 0.5, "grid__optimizers": ["sam", "gsam"]},
    "gsam local perturbation": {"optim__perturbation": "local", "grid__optimizers": ["sam", "gsam"]},
    "friendly_sam sigma=-1": {"optim__sigma": -1.0},
    "friendly_sam lmbda=1": {"optim__lmbda": 1.0},
    "friendly_sam lmbda=nan": {"optim__lmbda": float("nan")},
    "looksam k=0": {"optim__k": 0},
    "looksam k=2.5": {"optim__k": 2.5},
    "looksam k=true": {"optim__k": True},
    "looksam alpha=-1": {"optim__alpha": -1.0},
    "looksam k axis 0": {"grid__method_axes": {"looksam": {"k": [0, 5]}}, "grid__optimizers": ["sam", "looksam"]},
    "looksam k axis 2.5": {"grid__method_axes": {"looksam": {"k": [2.5]}}, "grid__optimizers": ["sam", "looksam"]},
    "lion betas=1": {"optim__betas": [0.9, 1.0], "grid__optimizers": ["sam", "lion"]},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_value_is_one_short_line(case):
    from align.study.config import CompareConfig

    with pytest.raises(AlignError) as err:
        validate(CompareConfig, study(**BAD[case]))
    message = str(err.value)
    assert "\n" not in message and len(message) <= 300, message
    key = next(iter(BAD[case])).split("__")[-1]
    assert key in message or "grid" in message, message
    assert "Traceback" not in message


def mnist_data(**mnist):
    return {"dataset": {"kind": "mnist", "mnist": mnist}, "cache_root": "/tmp/unused-cache",
            "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
            "text_encoder": {"backend": "open_clip", "model": "ViT-S-16"}}


@pytest.mark.parametrize("mnist, key", [
    ({"val_per_class": 0}, "mnist.val_per_class is 0"),  # passed --dry-run, failed at embed
    ({"test_per_class": 0}, "mnist.test_per_class is 0"),
    ({"seed": True}, "mnist.seed"),  # read as seed 1
    ({"image_size": True}, "mnist.image_size"),
    ({"captions_per_image": True}, "mnist.captions_per_image"),
])
def test_bad_mnist_value_is_one_short_line(mnist, key):
    from align.cache.key import EmbedConfig

    with pytest.raises(AlignError) as err:
        validate(EmbedConfig, mnist_data(**mnist))
    message = str(err.value)
    assert "\n" not in message and len(message) <= 300 and key in message, message


def test_an_empty_mnist_split_that_is_not_embedded_is_fine():
    from align.cache.key import EmbedConfig

    cfg = validate(EmbedConfig, {**mnist_data(val_per_class=0), "splits": ["train", "test"]})
    assert cfg.dataset.mnist.val_per_class == 0 and cfg.splits == ["train", "test"]
    assert cfg.dataset.built_in_size("test") == (10 * 150, "mnist.test_per_class")  # ten digits of 150 each


def test_the_study_defaults_pass_the_same_checks():
    from align.study.config import CompareConfig

    cfg = validate(CompareConfig, study())
    assert cfg.optim.lr > 0 and cfg.eval.every >= 1


def test_a_huge_input_is_cut_in_the_error_line():
    from align.study.config import CompareConfig

    cfg = study(name="x" * 100_000)
    with pytest.raises(AlignError) as err:
        validate(CompareConfig, cfg)
    assert len(str(err.value)) <= 300


def test_yaml_1_1_exponent_without_a_dot_still_reads_as_a_number():
    from align.train.config import TrainConfig

    raw = yaml.safe_load("optim: {lr: 1e-3}")  # PyYAML gives the string "1e-3"
    cfg = validate(TrainConfig, {"data": data_section("/tmp/unused-cache"), **copy.deepcopy(raw)})
    assert cfg.optim.lr == 0.001
