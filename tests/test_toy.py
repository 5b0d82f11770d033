"""The paper's 2-D experiments: losses and gradients against closed forms, the real optimizers against hand
recurrences, the banana acceptance numbers, the grid property, and one CLI run writing PNG + JSON."""
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from align.toy import experiments as toy
from align.toy.plots import write_outputs
from align.optim import MSAM, SAM

D = torch.float64


def _rand_points(n=64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 2, generator=g, dtype=D) * 2 - 1) * scale


# -- losses, gradients and Hessians against closed forms -----------------------------------------------------

def test_banana_gradient_and_hessian_closed_form():
    p = _rand_points()
    x, y = p[:, 0], p[:, 1]
    r = 1 - x * y
    torch.testing.assert_close(toy.banana(p), r ** 2)
    torch.testing.assert_close(toy.gradients(toy.banana, p), torch.stack([-2 * r * y, -2 * r * x], 1))
    h = torch.stack([torch.stack([2 * y ** 2, 4 * x * y - 2], 1), torch.stack([4 * x * y - 2, 2 * x ** 2], 1)], 1)
    torch.testing.assert_close(toy.hessians(toy.banana, p), h)


def test_sinc_value_and_gradient_closed_form():
    p = _rand_points(scale=1.5)
    u = (p ** 2).sum(1)
    torch.testing.assert_close(toy.sinc(p), 5 * torch.sin(u) / u)
    dldu = 5 * (u * torch.cos(u) - torch.sin(u)) / u ** 2
    torch.testing.assert_close(toy.gradients(toy.sinc, p), dldu[:, None] * 2 * p)
    origin = torch.zeros(1, 2, dtype=D)
    assert toy.sinc(origin).item() == 5.0  # the global maximum, finite
    assert toy.gradients(toy.sinc, origin).abs().max().item() == 0.0


@pytest.mark.parametrize("r", [1e-6, 6.8e-5, 1e-4, 0.1, 0.4999, 0.5001, 1.0, 3.0])
def test_sinc_gradient_is_exact_down_to_the_origin(r):
    """Against 5·(u cos u − sin u)/u² · 2θ, u = r², evaluated in 50-digit arithmetic (mpmath): no cancellation."""
    import mpmath

    mpmath.mp.dps = 50
    for phi in (0.3, 2.0, -1.2):
        p = torch.tensor([[r * math.cos(phi), r * math.sin(phi)]], dtype=D)
        x, y = (mpmath.mpf(v) for v in p[0].tolist())
        u = x * x + y * y
        dldu = 5 * (u * mpmath.cos(u) - mpmath.sin(u)) / u ** 2
        expected = torch.tensor([[float(dldu * 2 * x), float(dldu * 2 * y)]], dtype=D)
        got = toy.gradients(toy.sinc, p)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        assert toy.sinc(p).item() == pytest.approx(float(5 * mpmath.sin(u) / u), rel=1e-15)
        if r < 1e-3:  # the limit: 5·f'(u)·2θ with f'(u) = −u/3 + O(u³), i.e. ∇ℓ ≈ −(10/3) r² θ
            torch.testing.assert_close(got, -(10.0 / 3.0) * r * r * p, rtol=1e-9, atol=0)
            assert (got != 0).all()  # torch.sinc's derivative is exactly 0 here


def test_sinc_gradient_has_no_nan_from_the_unused_branch():
    p = torch.tensor([[0.0, 0.0], [1e-170, 0.0], [3e9, -4e9]], dtype=D)
    g = toy.gradients(toy.sinc, p)
    assert torch.isfinite(g).all() and g[0].abs().max().item() == 0.0


def test_runs_next_to_the_sinc_maximum_are_not_frozen():
    """With an exactly-zero gradient at r = 6.8e-5 the guard skipped every perturbation and the run never moved."""
    for method in ("sam", "msam"):
        tr = toy.run_optimizer(toy.sinc, torch.tensor([[6.8e-5, 0.0]], dtype=D), method, lr=0.05, rho=1.0, steps=3)
        assert tr.points[0, 1].norm().item() > 1e-3, method


def test_paraboloid_gradient_closed_form():
    p = _rand_points()
    torch.testing.assert_close(toy.gradients(toy.paraboloid, p), 2 * p)


# -- the runner drives the real optimizers, one per run ------------------------------------------------------

def test_batched_runs_equal_separate_runs_of_the_optimizer_class():
    """Batching B starts must not couple them (one optimizer over all would share one gradient norm)."""
    starts = torch.tensor([[-1.5, 0.5], [2.0, -0.3], [0.2, 0.1]], dtype=D)
    batched = toy.run_optimizer(toy.banana, starts, "msam", lr=0.01, rho=1.0, steps=30)
    for b in range(3):
        p = torch.nn.Parameter(starts[b].clone().view(1, 2))
        opt = MSAM([p], torch.optim.SGD, rho=1.0, lr=0.01)

        def closure():
            loss = toy.banana(p).sum()
            loss.backward()
            return loss

        for _ in range(30):
            opt.step(closure)
        torch.testing.assert_close(batched.final_points[b], p.detach().view(2), rtol=0, atol=1e-14)


def test_paraboloid_runs_match_hand_recurrences():
    """On ℓ = θ², SAM is θ ← θ − 2lr(θ + ρ sgnθ); M-SAM is θ ← θ − 2lr(θ + ρ sgnθ / √(1+4θ²))."""
    rho, steps = 0.3, 11
    for lr in (0.66, 0.74):
        res = {}
        for m in ("sam", "msam"):
            tr = toy.run_optimizer(toy.paraboloid, torch.tensor([[0.5, 0.0]], dtype=D), m, lr=lr, rho=rho,
                                   steps=steps)
            th = 0.5
            for _ in range(steps):
                n = abs(2 * th)
                d = rho * math.copysign(1.0, th) * (1.0 if m == "sam" else 1.0 / math.sqrt(1 + n * n))
                th = th - 2 * lr * (th + d)
            assert tr.final_points[0, 0].item() == pytest.approx(th, abs=1e-12)
            assert tr.final_points[0, 1].item() == 0.0
            res[m] = th * th
        assert res["msam"] < res["sam"], (lr, res)  # Fig. 3: M-SAM ends lower for both learning rates


def test_paraboloid_experiment_msam_lower_than_sam():
    r = toy.paraboloid_experiment()
    for lr in (0.66, 0.74):
        final = {row["method"]: row["final_loss"] for row in r.summary if row["lr"] == lr}
        assert final["M-SAM"] < final["SAM"]


# -- Fig. 1 acceptance --------------------------------------------------------------------------------------

def test_banana_acceptance_numbers():
    r = toy.banana_experiment()
    rows = {row["method"]: row for row in r.summary}
    gd, sam, msam = rows["GD"], rows["SAM"], rows["M-SAM"]
    assert gd["theta1"] == pytest.approx(-1.546, abs=1e-3) and gd["theta2"] == pytest.approx(-0.647, abs=1e-3)
    assert gd["loss"] < 1e-6
    assert math.hypot(sam["theta1"], sam["theta2"]) < 0.01 and sam["loss"] > 0.99
    assert msam["theta1"] == pytest.approx(-0.945, abs=1e-3) and msam["theta2"] == pytest.approx(-0.941, abs=1e-3)


# -- Fig. 4: the stability matrix -----------------------------------------------------------------------------

def test_stability_matrix_matches_hand_computation_and_the_optimizers_perturbation():
    pts = torch.tensor([[0.3, -0.2], [1.2, 0.5], [-0.7, -1.6]], dtype=D)
    rho = 0.4
    for method, cls in (("sam", SAM), ("msam", MSAM)):
        ev = toy.stability_eigenvalues(toy.banana, pts, method, rho)
        for i, (x, y) in enumerate(pts.tolist()):
            # δ* from the real optimizer's first_step, and its reported effective radius.
            p = torch.nn.Parameter(torch.tensor([[x, y]], dtype=D))
            opt = cls([p], torch.optim.SGD, rho=rho, lr=0.1)
            toy.banana(p).sum().backward()
            opt.first_step()
            dx, dy = (p.detach().view(2) - torch.tensor([x, y], dtype=D)).tolist()
            rt = opt.last_stats["effective_radius"]

            def hess(a, b):
                return [[2 * b * b, 4 * a * b - 2], [4 * a * b - 2, 2 * a * a]]

            hp = torch.tensor(hess(x + dx, y + dy), dtype=D)
            a = hp @ (torch.eye(2, dtype=D) + rt * torch.tensor(hess(x, y), dtype=D))
            ref = torch.linalg.eigvals(a).real.sort(descending=True).values
            torch.testing.assert_close(ev[i], ref)


def test_stability_at_rho_zero_is_the_hessian_spectrum():
    pts = _rand_points(16)
    ev = toy.stability_eigenvalues(toy.banana, pts, "sam", 0.0)
    ref = torch.linalg.eigvalsh(toy.hessians(toy.banana, pts)).flip(1)
    torch.testing.assert_close(ev, ref)


# -- Fig. 5 property --------------------------------------------------------------------------------------------

def test_grid_sam_ends_at_the_saddle_more_often_than_msam():
    r = toy.grid_experiment(n=6, max_steps=200, methods=("sam", "msam"))
    rows = {row["method"]: row for row in r.summary}
    assert rows["SAM"]["at_saddle"] > rows["M-SAM"]["at_saddle"]
    # The 6 anti-diagonal starts (θ₂ = −θ₁) lie on the saddle's stable manifold: every method ends there.
    assert rows["M-SAM"]["at_saddle"] >= 6
    for row in r.summary:
        assert row["at_saddle"] + row["at_flat"] + row["elsewhere"] == 36


# -- M-SAM's metric scale α in the toy runs --------------------------------------------------------------------

def test_msam_alpha_zero_repeats_sams_grid_runs_exactly():
    """α = 0 makes G = I: every grid run of M-SAM must be SAM's, bit for bit, and so must the counts."""
    r = toy.grid_experiment(n=4, max_steps=80, methods=("sam", "msam"), alpha=0.0)
    assert torch.equal(r.runs["msam"].points, r.runs["sam"].points)
    sam, msam = ({k: v for k, v in row.items() if k != "method"} for row in r.summary)
    assert msam == sam and r.settings["msam_alpha"] == 0.0
    paper = toy.grid_experiment(n=4, max_steps=80, methods=("msam",))
    assert not torch.equal(paper.runs["msam"].points, r.runs["sam"].points)  # α = 1 (the default) does differ


def test_msam_alpha_reaches_the_optimizer_with_the_scaled_radius():
    """First banana step by hand: δ = ρ g/(n√(1 + α²n²)), then θ₁ = θ₀ − lr ∇ℓ(θ₀ + δ)."""
    theta0, lr, rho = torch.tensor([[-1.5, 0.5]], dtype=D), 0.01, 1.0
    for alpha in (0.5, 2.0):
        g = toy.gradients(toy.banana, theta0)
        n = g.norm()
        delta = rho * g / (n * math.sqrt(1.0 + alpha ** 2 * n.item() ** 2))
        expected = theta0 - lr * toy.gradients(toy.banana, theta0 + delta)
        tr = toy.run_optimizer(toy.banana, theta0, "msam", lr=lr, rho=rho, steps=1, alpha=alpha)
        torch.testing.assert_close(tr.points[0, 1].view(1, 2), expected, rtol=1e-14, atol=0)
    sam = toy.run_optimizer(toy.banana, theta0, "sam", lr=lr, rho=rho, steps=40, alpha=2.0)  # SAM ignores α
    assert torch.equal(sam.points, toy.run_optimizer(toy.banana, theta0, "sam", lr=lr, rho=rho, steps=40).points)


# -- CLI ------------------------------------------------------------------------------------------------------

def test_cli_toy_paraboloid_writes_png_and_json(tmp_path):
    from align.cli.main import app

    result = CliRunner().invoke(app, ["toy", "paraboloid", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "M-SAM" in result.output
    png = tmp_path / "paraboloid.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "paraboloid.json").read_text())
    assert data["experiment"] == "paraboloid" and data["settings"]["rho"] == 0.3
    final = {(row["lr"], row["method"]): row["final_loss"] for row in data["summary"]}
    assert final[(0.66, "M-SAM")] < final[(0.66, "SAM")] and final[(0.74, "M-SAM")] < final[(0.74, "SAM")]
    assert len(data["runs"]["msam lr=0.66"]["final_points"]) == 1
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_cli_toy_banana_alpha_zero_ends_where_sam_ends(tmp_path):
    from align.cli.main import app

    result = CliRunner().invoke(app, ["toy", "banana", "--alpha", "0", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "M-SAM with α = 0" in result.output
    data = json.loads((tmp_path / "banana.json").read_text())
    rows = {row["method"]: row for row in data["summary"]}
    assert data["settings"]["msam_alpha"] == 0.0
    assert (rows["M-SAM"]["theta1"], rows["M-SAM"]["theta2"]) == (rows["SAM"]["theta1"], rows["SAM"]["theta2"])
    result = CliRunner().invoke(app, ["toy", "sinc", "--alpha", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--alpha applies to banana and grid" in result.output


def test_unknown_experiment_is_rejected():
    with pytest.raises(ValueError, match="unknown toy experiment"):
        toy.run_experiment("nope")
    result = CliRunner().invoke(__import__("align.cli.main", fromlist=["app"]).app, ["toy", "nope"])
    assert result.exit_code != 0


def test_toy_and_study_plots_share_labels_and_colours():
    from align.study import plots
    from align.optim import OPTIMIZERS

    for method in ("sam", "msam", "asam", "fsam"):
        assert toy.METHOD_LABELS[method] == plots._label(method) == OPTIMIZERS[method].label
        assert toy.METHOD_COLORS[method] == plots._color(method) == OPTIMIZERS[method].color
    # 'gd' is plain SGD: the sgd entry's colour, the paper's label.
    assert toy.METHOD_COLORS["gd"] == plots._color("sgd") and toy.METHOD_LABELS["gd"] == "GD"
    assert toy.METHOD_COLORS["msam"] != toy.METHOD_COLORS["sam"]


# -- the banana loss under the rescaling θ1 = c·φ1, θ2 = φ2/c (align toy banana --rescale) ----------------------

def test_rescaled_banana_at_c_1_is_the_banana_run_bit_for_bit():
    plain = toy.banana_experiment(steps=60, methods=["gd", "sam", "msam"])
    scaled = toy.banana_rescale_experiment(scales=[1.0], steps=60, methods=["gd", "sam", "msam"])
    for m in ("gd", "sam", "msam"):
        assert torch.equal(scaled.runs[f"{m} c=1"].points, plain.runs[m].points), m


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_gd_in_rescaled_coordinates_is_gd_preconditioned_by_c_squared_in_theta(c):
    """GD on φ is θ ← θ − lr·diag(c², 1/c²)·∇ℓ(θ): computed here by hand from the closed-form gradient."""
    lr, steps = 0.01, 80
    result = toy.banana_rescale_experiment(scales=[c], lr=lr, steps=steps, methods=["gd"])
    theta = np.array([-1.5, 0.5])
    for _ in range(steps):
        r = 1 - theta[0] * theta[1]
        grad = np.array([-2 * r * theta[1], -2 * r * theta[0]])
        theta = theta - lr * np.array([c * c, 1 / (c * c)]) * grad
    got = result.runs[f"gd c={c:g}"].final_points[0].numpy()
    np.testing.assert_allclose(got, theta, rtol=1e-12)
    row = next(r for r in result.summary if r["c"] == c)
    reference = result.runs["gd c=1"].final_points[0].numpy()
    assert row["shift"] == pytest.approx(float(np.linalg.norm(theta - reference)), rel=1e-9)
    assert [r["c"] for r in result.summary] == sorted({c, 1.0})  # c = 1 added as the reference


def test_banana_rescale_figure_and_json_are_written(tmp_path):
    result = toy.banana_rescale_experiment(scales=[0.5, 2.0], steps=20, methods=["gd", "msam"])
    png, js = write_outputs(result, tmp_path)
    assert png.name == "banana_rescale.png" and png.stat().st_size > 10_000
    data = json.loads(js.read_text())
    assert data["settings"]["scales"] == [0.5, 1.0, 2.0] and len(data["summary"]) == 6


@pytest.mark.parametrize("args,says", [(["sinc", "--rescale", "2"], "banana only"),
                                       (["banana", "--rescale", "0"], "finite numbers > 0"),
                                       (["banana", "--rescale", "-1"], "finite numbers > 0"),
                                       (["banana", "--rescale", "inf"], "finite numbers > 0")])
def test_rescale_outside_the_banana_run_is_one_line(args, says, tmp_path):
    from typer.testing import CliRunner

    from align.cli.main import app
    from faults import one_error_line

    line = one_error_line(CliRunner().invoke(app, ["toy", *args, "--out", str(tmp_path)]))
    assert says in line, line
