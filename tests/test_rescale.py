"""head.rescale: a function-preserving reparameterization of the head (Dinh rescaling of a ReLU MLP, W = c·V for a
linear head). At initialisation the rescaled head computes the plain head's function; at c = 1 a run is the run
without the option, bit for bit; a pack of rescaled heads equals each head trained alone."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from align.cli.main import app
from align.common.config import validate
from align.train.config import TrainConfig, hashed_config
from align.train.heads import HeadConfig, build_model
from align.train.loop import train
from align.train.losses import LossConfig
from faults import one_error_line
from helpers import train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _double_model(head: HeadConfig, seed: int = 5):
    """The model built in float64 from the start (its initial draws and the rescaling both in float64)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        return build_model(head, LossConfig(), 24, 16)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("c", [0.01, 0.1, 10.0, 100.0])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_rescaled_head_starts_as_the_plain_heads_function_in_float64(kind, c):
    extra = {"activation": "relu", "hidden_dim": 40} if kind == "mlp" else {}
    plain = _double_model(HeadConfig(kind=kind, out_dim=8, **extra))
    scaled = _double_model(HeadConfig(kind=kind, out_dim=8, rescale=c, **extra))
    x_img = torch.randn(50, 24, dtype=torch.float64)
    x_txt = torch.randn(50, 16, dtype=torch.float64)
    with torch.no_grad():
        for side, x in (("image_head", x_img), ("text_head", x_txt)):
            a, b = getattr(plain, side)(x), getattr(scaled, side)(x)
            assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(a.abs().max())), (side, c)
    # ... and the parameters really are other coordinates of that function.
    first = scaled.image_head.weight if kind == "linear" else scaled.image_head[0].weight
    plain_first = plain.image_head.weight if kind == "linear" else plain.image_head[0].weight
    expected = plain_first / c if kind == "linear" else plain_first * c
    assert torch.allclose(first, expected, rtol=1e-15, atol=0)
    if kind == "mlp":
        assert torch.allclose(scaled.image_head[0].bias, plain.image_head[0].bias * c, rtol=1e-15, atol=0)
        assert torch.allclose(scaled.image_head[2].weight, plain.image_head[2].weight / c, rtol=1e-15, atol=0)
        assert torch.equal(scaled.image_head[2].bias, plain.image_head[2].bias)


@pytest.mark.parametrize("head", [{"kind": "linear"}, {"kind": "mlp", "activation": "relu", "hidden_dim": 24}],
                         ids=["linear", "mlp-relu"])
def test_rescale_1_run_is_bit_identical_to_the_run_without_the_option(head, cache_data, tmp_path):
    finals, hashes, results = [], [], []
    for i, extra in enumerate([{}, {"rescale": 1.0}]):
        cfg = validate(TrainConfig, train_config(cache_data, seed=2, head={"out_dim": 16, **head, **extra},
                                                 optim={"name": "sam", "lr": 1e-2, "rho": 0.05},
                                                 schedule={"steps": 30}, eval={"every": 15}))
        results.append(train(cfg, tmp_path / f"run{i}", progress=False))
        hashes.append(hashed_config(cfg))
        finals.append(load_file(tmp_path / f"run{i}" / "checkpoints" / "step-0000030.safetensors"))
    assert hashes[0] == hashes[1] and "rescale" not in hashes[0]["head"]
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    for key in ("best_test", "final_test", "best_val", "sharpness", "loss_at_step", "final_loss"):
        assert results[0][key] == results[1][key], key
    assert results[0]["config_hash"] == results[1]["config_hash"]


@pytest.mark.parametrize("head,says", [
    ({"kind": "starmlp", "rescale": 10}, "linear and ReLU mlp heads only"),
    ({"kind": "mlp", "rescale": 0.1}, "set head.activation=relu"),
    ({"kind": "linear", "rescale": 0}, "rescale"),
], ids=["starmlp", "mlp-gelu", "zero"])
def test_rescale_of_a_head_it_would_change_is_refused_in_one_line(head, says, cache_data, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(train_config(cache_data, head=head, out_dir=str(tmp_path / "run"))))
    line = one_error_line(CliRunner().invoke(app, ["train", "--config", str(path)]))
    assert says in line, line
    assert not (tmp_path / "run").exists()
