"""Evaluation: metrics of heads and raw embeddings against brute-force computations, sharpness against a direct
evaluation of its definition, and `align eval` for runs and caches."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from align.common.config import validate
from align.cache.embeddings import PairedEmbeddings
from align.cli.main import app
from helpers import (IMAGE_DIM, SIZES, TEXT_DIM, data_section, head_recall_at_1, make_cache, synthetic_split,
                        train_config, write_cache)

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def brute_recall(image: torch.Tensor, text: torch.Tensor, c2i: torch.Tensor, k: int) -> tuple[float, float]:
    """CLIP_benchmark convention by brute force: i2t any of the image's captions in the top k; t2i its image in top k."""
    sim = F.normalize(image.double(), dim=-1) @ F.normalize(text.double(), dim=-1).T
    top_captions = sim.topk(k, dim=1).indices
    i2t = float(np.mean([bool((c2i[top_captions[i]] == i).any()) for i in range(len(image))]))
    top_images = sim.T.topk(k, dim=1).indices
    t2i = float(np.mean([bool((top_images[j] == c2i[j]).any()) for j in range(len(text))]))
    return i2t, t2i


def brute_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean over rows of |kNN_a(i) ∩ kNN_b(i)| / k, cosine neighbours, self excluded (paper-notes definition)."""
    def knn(x: torch.Tensor) -> list[set[int]]:
        x = F.normalize(x.double(), dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        return [set(row.tolist()) for row in sim.topk(k, dim=1).indices]
    return float(np.mean([len(p & q) / k for p, q in zip(knn(a), knn(b))]))


def first_captions(c2i: torch.Tensor, n: int) -> torch.Tensor:
    return torch.tensor([int(torch.nonzero(c2i == i)[0]) for i in range(n)])


def test_raw_embeddings_of_equal_dims_get_retrieval_and_alignment():
    from align.metrics.measure import evaluate_embeddings

    image, text, c2i = (torch.from_numpy(a) for a in synthetic_split("val", 96, text_dim=IMAGE_DIM, noise=1.5))
    text = text + 0.3 * torch.randn(text.shape, generator=torch.Generator().manual_seed(1))
    result = evaluate_embeddings(PairedEmbeddings(image, text, c2i, {"split": "val"}), ks=(1, 5), knn_k=4,
                                 backend="torch")
    m = result["metrics"]
    for k in (1, 5):
        i2t, t2i = brute_recall(image, text, c2i, k)
        assert m[f"i2t_R@{k}"] == pytest.approx(i2t, abs=1e-12) and m[f"t2i_R@{k}"] == pytest.approx(t2i, abs=1e-12)
    assert m["mean_R@1"] == pytest.approx((m["i2t_R@1"] + m["t2i_R@1"]) / 2)
    # Alignment metrics pair each image with its FIRST caption.
    assert m["mutual_knn"] == pytest.approx(brute_mutual_knn(image, text[first_captions(c2i, 96)], 4), abs=1e-12)
    assert 0 < m["cknna"] <= 1 and 0 < m["cka"] <= 1
    assert result["notes"] == [] and result["kind"] == "raw"


def test_raw_embeddings_of_different_dims_report_alignment_only_and_say_why():
    from align.metrics.measure import evaluate_embeddings

    image, text, c2i = (torch.from_numpy(a) for a in synthetic_split("val", 64))
    result = evaluate_embeddings(PairedEmbeddings(image, text, c2i), knn_k=8, backend="faiss")
    assert not any("R@" in key for key in result["metrics"])
    assert set(result["metrics"]) == {"mutual_knn", "cknna", "cka"}
    assert result["metrics"]["mutual_knn"] == pytest.approx(
        brute_mutual_knn(image, text[first_captions(c2i, 64)], 8), abs=1e-12)
    assert len(result["notes"]) == 1 and "retrieval undefined" in result["notes"][0]
    assert f"{IMAGE_DIM}" in result["notes"][0] and f"{TEXT_DIM}" in result["notes"][0]


def test_head_sharpness_matches_its_definition_and_restores_the_weights():
    from align.metrics.measure import head_sharpness
    from align.train.heads import HeadConfig, build_model
    from align.train.losses import LossConfig, clip_loss
    from align.train.config import EvalConfig

    torch.manual_seed(0)
    model = build_model(HeadConfig(out_dim=8), LossConfig(), 12, 10)
    image, text = torch.randn(40, 12), torch.randn(40, 10)
    batches = [(torch.arange(0, 20), torch.arange(0, 20)), (torch.arange(20, 40), torch.arange(20, 40))]
    cfg = EvalConfig(sharpness_rho=0.1, sharpness_ascent_steps=3, hessian_iters=40, hutchinson_samples=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sharp = head_sharpness(model, clip_loss, image, text, batches, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # Direct: L at θ, g over the head weights only (logit scale fixed), L at θ + ρ g/‖g‖, the exact Hessian.
    names = [n for n, _ in model.named_parameters() if n != "log_scale"]
    shapes = [model.get_parameter(n).shape for n in names]
    flat0 = torch.cat([model.get_parameter(n).detach().flatten() for n in names]).double()
    fixed = {"log_scale": model.log_scale.detach().double()}

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        params, i = dict(fixed), 0
        for n, shape in zip(names, shapes):
            params[n] = flat[i:i + shape.numel()].view(shape)
            i += shape.numel()
        outs = [torch.func.functional_call(model.double(), params, (image[b].double(), text[t].double()))
                for b, t in batches]
        return sum(clip_loss(**o) for o in outs) / len(outs)

    base = loss_of(flat0)
    grad = torch.autograd.functional.jacobian(loss_of, flat0)
    moved = loss_of(flat0 + 0.1 * grad / grad.norm())
    hessian = torch.autograd.functional.hessian(loss_of, flat0)
    model.float()
    eig = torch.linalg.eigvalsh(hessian)
    assert sharp["loss"] == pytest.approx(float(base), rel=1e-6)
    assert sharp["grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-5)
    assert sharp["worst_case_first_order"] == pytest.approx(float(moved - base), rel=1e-3)
    assert sharp["worst_case_ascent"] >= sharp["worst_case_first_order"] - 1e-7
    assert sharp["hessian_top_eigenvalue"] == pytest.approx(float(eig[eig.abs().argmax()]), rel=2e-2)
    # Hutchinson with S Rademacher probes: unbiased, variance 2·Σ_{i≠j} H_ij² / S; allow 5 standard deviations.
    std = math.sqrt(2 * float((hessian ** 2).sum() - (hessian.diagonal() ** 2).sum()) / 48)
    assert abs(sharp["hessian_trace"] - float(eig.sum())) < 5 * std


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, dict]:
    from align.train.config import TrainConfig
    from align.train.loop import train

    root = tmp_path_factory.mktemp("eval")
    data = make_cache(root / "cache")
    cfg = validate(TrainConfig, train_config(data, schedule={"steps": 60}, eval={"every": 20, "sharpness": False},
                                             checkpoint_every=30))
    results = train(cfg, root / "run", progress=False)
    return root / "run", results


def test_evaluate_run_best_and_last_equal_brute_force_on_the_saved_heads(trained_run):
    from safetensors.torch import load_file

    from align.eval.evaluate import evaluate_run

    run, results = trained_run
    image, text, c2i = synthetic_split("test", SIZES["test"])
    for which, weights_file in (("best", "best.safetensors"), ("last", "step-0000060.safetensors")):
        out = evaluate_run(run, split="test", checkpoint=which)
        state = load_file(run / "checkpoints" / weights_file)
        state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith(("optim.", "best.", "rng."))}
        i2t, t2i = head_recall_at_1(state, image, text, c2i)
        assert out["metrics"]["i2t_R@1"] == pytest.approx(i2t, abs=1e-12)
        assert out["metrics"]["t2i_R@1"] == pytest.approx(t2i, abs=1e-12)
        assert out["step"] == (results["best_step"] if which == "best" else 60)
        assert json.loads((run / "eval" / f"test-{which}.json").read_text())["metrics"] == out["metrics"]
    assert evaluate_run(run, split="test", checkpoint="best")["metrics"] == pytest.approx(results["best_test"])


def test_align_eval_run_prints_a_table_and_rejects_bad_input(trained_run, tmp_path):
    run, _ = trained_run
    result = runner.invoke(app, ["eval", str(run), "--split", "val", "--checkpoint", "last",
                                 "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert "t2i_R@1" in result.output and "mutual_knn" in result.output
    assert json.loads((tmp_path / "e.json").read_text())["split"] == "val"
    for args, expected in ([["eval"], "either a RUN_DIR or --cache"],
                           [["eval", str(tmp_path)], "not a run directory"],
                           [["eval", str(run), "--checkpoint", "middle"], "use best or last"],
                           [["eval", str(run), "--split", "dev"], "not in the run's data.splits"]):
        out = runner.invoke(app, args)
        assert out.exit_code == 2 and expected in out.output and "Traceback" not in out.output, out.output


def test_align_eval_cache_reports_the_no_training_row(tmp_path):
    from align.cache.key import EmbedConfig, cache_key

    data = data_section(tmp_path / "cache")
    folder = write_cache(data, "test", *synthetic_split("test", 80))
    result = runner.invoke(app, ["eval", "--cache", str(folder)])
    assert result.exit_code == 0, result.output
    assert "mutual_knn" in result.output and "retrieval undefined" in result.output
    # By key (a unique prefix) under --cache-root, with the JSON written.
    key = cache_key(EmbedConfig.model_validate(data), "test")
    result = runner.invoke(app, ["eval", "--cache", key[:20], "--cache-root", str(tmp_path / "cache"),
                                 "--out", str(tmp_path / "raw.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "raw.json").read_text())
    image, text, c2i = (torch.from_numpy(a) for a in synthetic_split("test", 80))
    assert saved["metrics"]["mutual_knn"] == pytest.approx(
        brute_mutual_knn(image, text[first_captions(c2i, 80)], 8), abs=1e-12)
    out = runner.invoke(app, ["eval", "--cache", "nope", "--cache-root", str(tmp_path / "cache")])
    assert out.exit_code == 2 and "no cache 'nope'" in out.output
