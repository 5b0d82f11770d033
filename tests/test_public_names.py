"""The import paths users' scripts rely on keep working after the regrouping into packages: the README's example
(``align.optim``), and the paths that existed before it for the metrics, the losses and the study statistics
(``align.metrics``, ``align.losses``, ``align.study_stats``), each name the same object as in its new home."""
from __future__ import annotations

import importlib

import pytest

# The documented paths and the names they give, each with the module that now holds it.
DOCUMENTED = [  # (documented path, the module that holds the names now, names)
    ("align.optim", "align.optim.sam", ["SAM"]),  # one file per method since issue 24
    ("align.optim", "align.optim.msam", ["MSAM"]),
    ("align.optim", "align.optim.asam", ["ASAM"]),
    ("align.optim", "align.optim.fsam", ["FisherSAM"]),
    ("align.optim", "align.optim.gsam", ["GSAM"]),
    ("align.optim", "align.optim.friendly_sam", ["FriendlySAM"]),
    ("align.optim", "align.optim.looksam", ["LookSAM"]),
    ("align.optim", "align.optim.lion", ["Lion"]),
    ("align.optim", "align.optim.registry", ["OPTIMIZERS", "BASE_OPTIMIZERS", "OptimizerInfo", "create_optimizer",
                                             "default_hparams", "optimizer_info"]),
    ("align.optim", "align.optim.step", ["backward_closure", "take_step"]),
    ("align.metrics", "align.metrics.alignment", ["mutual_knn", "cycle_knn", "cka", "unbiased_cka", "cknna", "svcca"]),
    ("align.metrics", "align.metrics.retrieval", ["retrieval_recall", "approximate_retrieval_recall"]),
    ("align.metrics", "align.metrics.sharpness", ["worst_case_sharpness", "hessian_top_eigenvalue", "hessian_trace"]),
    ("align.losses", "align.train.losses", ["LossConfig", "clip_loss", "siglip_loss", "clip_loss_rows",
                                            "siglip_loss_rows", "loss_for", "rows_loss_for"]),
    ("align.study_stats", "align.study.stats", ["SCORE", "METHOD_AXES", "config_key", "best_configs", "summary",
                                                "table3", "robustness", "rank_agreement", "paired_interval",
                                                "paired_t_test", "holm_adjust", "student_t_quantile",
                                                "verdicts_vs_reference"]),
]


@pytest.mark.parametrize("path, home, names", DOCUMENTED, ids=[f"{p}<-{h}" for p, h, _ in DOCUMENTED])
def test_each_documented_name_imports_from_its_documented_path_as_the_same_object(path, home, names):
    documented, actual = importlib.import_module(path), importlib.import_module(home)
    for name in names:
        assert getattr(documented, name) is getattr(actual, name), f"{path}.{name}"
        exec(f"from {path} import {name}", {})  # the statement a script writes


@pytest.mark.parametrize("path", ["align.losses", "align.study_stats", "align.optim", "align.metrics"])
def test_a_documented_modules_all_lists_only_names_it_has(path):
    module = importlib.import_module(path)
    assert module.__all__ and all(hasattr(module, name) for name in module.__all__)


def test_the_readme_example_runs():
    """README "M-SAM in a plain PyTorch loop", on a tiny regression."""
    import torch
    from align.optim import MSAM

    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1)
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    opt = MSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    first = None
    for _ in range(50):
        def closure():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        loss = float(opt.step(closure).detach())
        first = loss if first is None else first
    assert loss < first
