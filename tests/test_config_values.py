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
