"""The paper's 2-D experiments (Jacobsen & Arvanitidis, arXiv 2502.08448, Figures 1–5), as pure tensor code.

Every trajectory is produced by the REAL optimizer classes of ``align.optim`` (built with ``create_optimizer``,
SGD without momentum as the base, exactly as in training) on 2-element parameters; nothing here re-implements a
method's update. Gradients come from autograd. The only closed forms are in the stability analysis (Fig. 4),
which is theory about the update, not a runner.

Each parameter has shape [1, 2] rather than [2]: ASAM applies T = |θ| + η to weight tensors (ndim > 1) only, so a
1-D parameter would be treated like a bias and ASAM would collapse to SAM. As a "1×2 weight" all four methods see
the two coordinates exactly as the paper's 2-D figures do.

Core layer: no disk, no printing. Plots and JSON are written by ``align.toy_plots``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from align.optim import create_optimizer, optimizer_info
from align.optim.registry import TWO_PASS_METHODS
from align.optim.step import finish, first_pass

LossFn = Callable[[Tensor], Tensor]

# Toy method → registry entry: 'gd' is plain SGD (no momentum), labelled "GD" as in the paper's figures; then
# every method of the SAM family (over plain SGD) and Lion. Every other label and every colour is the registry's,
# so a method looks the same in study and toy plots.
TOY_METHODS = {"gd": "sgd", **{name: name for name in TWO_PASS_METHODS}, "lion": "lion"}
MSAM = "msam"  # the method whose metric scale α the experiments take (``alpha``)
METHOD_LABELS = {m: "GD" if m == "gd" else optimizer_info(name).label for m, name in TOY_METHODS.items()}
METHOD_COLORS = {m: optimizer_info(name).color for m, name in TOY_METHODS.items()}
EXPERIMENTS = ("banana", "sinc", "paraboloid", "stability", "grid")
DTYPE = torch.float64  # the toy runs are tiny; float64 keeps the end points comparable to the paper's digits


# -- the toy losses (θ[..., 2] → ℓ[...]) ------------------------------------------------------------------

def banana(theta: Tensor) -> Tensor:
    """ℓ = (1 − θ₁θ₂)²: θ[..., 2] → [...]. Minima on θ₁θ₂ = 1, saddle (0, 0), flattest minima (±1, ±1)."""
    return (1.0 - theta[..., 0] * theta[..., 1]) ** 2


# sin(u)/u = Σₖ (−1)ᵏ u²ᵏ/(2k+1)!; through k = 6 the series and its derivative are exact to float64 round-off
# for u < 1/4, where the closed form's derivative (u cos u − sin u)/u² loses digits to cancellation.
_SINC_SERIES = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(7))
_SINC_SERIES_BELOW = 0.25


def sinc(theta: Tensor) -> Tensor:
    """ℓ = 5 sin(r²)/r², r² = x² + y²: θ[..., 2] → [...]. Global maximum 5 at the origin, minima on a ring.

    Value and gradient are exact down to r = 0: torch.sinc's derivative is exactly 0 already at r ≈ 6.8e-5,
    which made the optimizers' zero-gradient guard skip the perturbation and froze runs near the maximum.
    """
    u = (theta ** 2).sum(-1)
    small = u < _SINC_SERIES_BELOW
    # Each branch only sees inputs where it is finite: where() would pass 0 · ∞ = NaN gradients otherwise.
    w = torch.where(small, u, torch.zeros_like(u)) ** 2
    series = torch.full_like(w, _SINC_SERIES[-1])
    for c in reversed(_SINC_SERIES[:-1]):
        series = series * w + c
    u_closed = torch.where(small, torch.ones_like(u), u)
    return 5.0 * torch.where(small, series, torch.sin(u_closed) / u_closed)


def paraboloid(theta: Tensor) -> Tensor:
    """ℓ = ‖θ‖² = x² + y²: θ[..., 2] → [...]."""
    return (theta ** 2).sum(-1)


LOSSES: dict[str, LossFn] = {"banana": banana, "sinc": sinc, "paraboloid": paraboloid}


def gradients(loss_fn: LossFn, points: Tensor) -> Tensor:
    """∇ℓ at each point by autograd: points[N, 2] → [N, 2]."""
    x = points.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(x).sum(), x)
    return grad


def hessians(loss_fn: LossFn, points: Tensor) -> Tensor:
    """∇²ℓ at each point by autograd (vectorised with torch.func): points[N, 2] → [N, 2, 2]."""
    # Reverse-over-reverse: torch.func.hessian's forward mode would load TorchScript decompositions (slow, warns).
    return vmap(jacrev(jacrev(loss_fn)))(points.detach())


# -- running the real optimizers --------------------------------------------------------------------------

@dataclass
class Trajectories:
    """B runs of one method. A run that converged stops early; its rows are padded with its last point/loss.

    points[B, T+1, 2], losses[B, T+1] (loss at each iterate), steps[B] (steps taken), converged[B] (bool).
    """

    points: Tensor
    losses: Tensor
    steps: Tensor
    converged: Tensor

    @property
    def final_points(self) -> Tensor:
        """[B, 2]."""
        return self.points[:, -1]

    @property
    def final_losses(self) -> Tensor:
        """[B]."""
        return self.losses[:, -1]


def build_toy_optimizer(method: str, param: Tensor, *, lr: float, rho: float, eta: float | None = None,
                        alpha: float | None = None) -> torch.optim.Optimizer:
    """The optimizer a toy run uses: 'gd' = plain SGD; SAM family = the registry's class over SGD (no momentum).

    ``alpha`` (M-SAM's metric scale) goes to M-SAM only (GSAM's and LookSAM's α are other knobs) and ``eta`` to
    the methods that have one, so one setting can run every method of an experiment. Lion runs alone, at ``lr``
    with its default betas.
    """
    name = TOY_METHODS[method]
    info = optimizer_info(name)
    if not info.two_pass:
        return create_optimizer(name, [param], lr=lr)
    return create_optimizer(name, [param], lr=lr, rho=rho, eta=eta if info.hparam("eta") else None,
                            alpha=alpha if name == MSAM else None, base="sgd")  # the paper's plain SGD base


def run_optimizer(loss_fn: LossFn, starts: Tensor, method: str, *, lr: float, rho: float, steps: int,
                  tol: float | None = None, **hparams: float | None) -> Trajectories:
    """Run ``method`` from each start (starts[B, 2]) for at most ``steps`` steps, each run with its own optimizer.

    The B runs are independent: one optimizer per run, because one optimizer over B parameters would share a
    single global gradient norm. Only the forward/backward passes are batched (the loss is a sum of per-run
    terms, so each parameter receives exactly its own gradient). With ``tol``, a run stops once
    ‖θₜ − θₜ₋₂‖ < tol: a fixed point, or the 2-cycle SAM-type updates settle into. ``hparams``: ``eta`` (ASAM,
    Fisher SAM) and ``alpha`` (M-SAM's metric scale), as ``build_toy_optimizer`` takes them (None: the defaults).
    """
    if starts.ndim != 2 or starts.shape[1] != 2:
        raise ValueError(f"starts must have shape [B, 2], got {tuple(starts.shape)}")
    params = [torch.nn.Parameter(s.detach().to(DTYPE).clone().view(1, 2)) for s in starts]
    opts = [build_toy_optimizer(method, p, lr=lr, rho=rho, **hparams) for p in params]
    b = len(params)
    points = [[p.detach().view(2).clone()] for p in params]
    losses: list[list[float]] = [[] for _ in range(b)]
    steps_taken = torch.zeros(b, dtype=torch.long)
    converged = torch.zeros(b, dtype=torch.bool)
    active = list(range(b))

    def forward_backward(idx: list[int]) -> Tensor:
        value = loss_fn(torch.cat([params[i] for i in idx]))  # [A]
        value.sum().backward()
        return value.detach()

    for _ in range(steps):
        if not active:
            break
        running = [opts[i] for i in active]
        closure = functools.partial(forward_backward, active)
        value = first_pass(running, closure)
        for i, v in zip(active, value.tolist()):
            losses[i].append(v)
        finish(running, closure)
        still = []
        for i in active:
            points[i].append(params[i].detach().view(2).clone())
            steps_taken[i] += 1
            if tol is not None and len(points[i]) >= 3 and (points[i][-1] - points[i][-3]).norm() < tol:
                converged[i] = True
            else:
                still.append(i)
        active = still

    with torch.no_grad():
        final_losses = loss_fn(torch.stack([pts[-1] for pts in points])).tolist()
    for i in range(b):
        losses[i].append(final_losses[i])
    length = int(steps_taken.max().item()) + 1 if b else 1
    pad_p = torch.stack([torch.stack(pts + [pts[-1]] * (length - len(pts))) for pts in points])
    pad_l = torch.tensor([ls + [ls[-1]] * (length - len(ls)) for ls in losses], dtype=DTYPE)
    return Trajectories(points=pad_p, losses=pad_l, steps=steps_taken, converged=converged)


# -- experiment results -----------------------------------------------------------------------------------

@dataclass
class ToyResult:
    """One experiment: its settings, table rows (JSON-able), and the tensors its figure needs.

    ``runs`` maps a run key (e.g. 'sam' or 'msam rho=1') to its trajectories; ``extra`` holds anything else the
    figure needs (e.g. eigenvalue maps).
    """

    name: str
    settings: dict[str, Any]
    summary: list[dict[str, Any]]
    runs: dict[str, Trajectories] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def distance_to(points: Tensor, centers: Sequence[tuple[float, float]]) -> Tensor:
    """Distance of each point to the nearest centre: points[N, 2] → [N]."""
    c = torch.tensor(centers, dtype=points.dtype)
    return torch.cdist(points, c).min(dim=1).values


SADDLE = [(0.0, 0.0)]
FLATTEST = [(1.0, 1.0), (-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0)]  # as in the task: within 0.2 of (±1, ±1)


def _msam_alpha(alpha: float | None) -> float:
    """The α an M-SAM run uses (the registry default when None), for the experiments' settings."""
    return float(optimizer_info(MSAM).defaults["alpha"] if alpha is None else alpha)


def banana_experiment(start: tuple[float, float] = (-1.5, 0.5), lr: float = 0.01, rho: float = 1.0,
                      steps: int = 200, methods: Sequence[str] | None = None,
                      alpha: float | None = None) -> ToyResult:
    """Fig. 1: GD, SAM, M-SAM (and every other toy method: ``methods`` None) on the banana loss from one start;
    end points and losses per method.

    ``alpha``: M-SAM's metric scale (0 gives SAM's run, 1 the paper's M-SAM).
    """
    methods = list(TOY_METHODS) if methods is None else methods
    starts = torch.tensor([start], dtype=DTYPE)
    runs = {m: run_optimizer(banana, starts, m, lr=lr, rho=rho, steps=steps, alpha=alpha) for m in methods}
    summary = []
    for m, tr in runs.items():
        p = tr.final_points[0]
        summary.append({"method": METHOD_LABELS[m], "theta1": p[0].item(), "theta2": p[1].item(),
                        "loss": tr.final_losses[0].item(),
                        "dist_saddle": distance_to(p.view(1, 2), SADDLE).item(),
                        "dist_flattest": distance_to(p.view(1, 2), FLATTEST).item()})
    settings = {"loss": "(1 - t1*t2)^2", "start": list(start), "lr": lr, "rho": rho, "steps": steps,
                "msam_alpha": _msam_alpha(alpha), "base": "SGD (no momentum)"}
    return ToyResult("banana", settings, summary, runs)


def rescaled(loss_fn: LossFn, c: float) -> LossFn:
    """The loss in coordinates φ with θ₁ = c·φ₁, θ₂ = φ₂/c: the same surface reparameterized (for the banana loss
    the rescaling leaves θ₁θ₂ and so the loss unchanged, as Dinh's rescaling does a ReLU network's)."""
    return lambda phi: loss_fn(torch.stack([c * phi[..., 0], phi[..., 1] / c], dim=-1))


def banana_rescale_experiment(scales: Sequence[float] = (0.5, 1.0, 2.0), start: tuple[float, float] = (-1.5, 0.5),
                              lr: float = 0.01, rho: float = 1.0, steps: int = 200,
                              methods: Sequence[str] | None = None, alpha: float | None = None) -> ToyResult:
    """Fig. 1 under reparameterization: every method runs on the banana loss in coordinates φ (``rescaled``) for
    each c of ``scales`` (1 added: the reference), from the same θ start; its trajectory is mapped back to θ. An
    optimizer invariant to the rescaling would follow one θ path for every c. Summary per method and c: the θ end
    point, its loss and ``shift``, the distance of that end point from the method's end point at c = 1."""
    methods = list(TOY_METHODS) if methods is None else methods
    scales = sorted({float(c) for c in scales} | {1.0})
    runs = {}
    for c in scales:
        to_theta = torch.tensor([c, 1.0 / c], dtype=DTYPE)
        phi0 = torch.tensor([[start[0] / c, start[1] * c]], dtype=DTYPE)
        for m in methods:
            tr = run_optimizer(rescaled(banana, c), phi0, m, lr=lr, rho=rho, steps=steps, alpha=alpha)
            runs[f"{m} c={c:g}"] = Trajectories(tr.points * to_theta, tr.losses, tr.steps, tr.converged)
    summary = []
    for m in methods:
        reference = runs[f"{m} c=1"].final_points[0]
        for c in scales:
            tr = runs[f"{m} c={c:g}"]
            p = tr.final_points[0]
            summary.append({"method": METHOD_LABELS[m], "c": c, "theta1": p[0].item(), "theta2": p[1].item(),
                            "loss": tr.final_losses[0].item(), "shift": float((p - reference).norm())})
    settings = {"loss": "(1 - t1*t2)^2 in phi: t1 = c*phi1, t2 = phi2/c", "scales": scales, "start": list(start),
                "lr": lr, "rho": rho, "steps": steps, "msam_alpha": _msam_alpha(alpha), "base": "SGD (no momentum)"}
    return ToyResult("banana_rescale", settings, summary, runs)


def sinc_experiment(n_starts: int = 200, half_width: float = 1.0, steps: int = 200, lr: float = 0.05,
                    rhos: Sequence[float] = (0.2, 1.0), methods: Sequence[str] = ("sam", "msam"),
                    max_radius: float = 0.2, seed: int = 0) -> ToyResult:
    """Fig. 2: final points of SAM and M-SAM on 5·sin(r²)/r² from uniform starts in [−h, h]²; count at the maximum.

    A run "ends at the global maximum" when its final point is within ``max_radius`` of the origin. The starts'
    square defaults to [−1, 1]²: in the literal [−0.5, 0.5]² the gradient is so small (‖g‖ < 1.2) that M-SAM
    behaves like SAM and both end at the maximum alike, unlike the paper's figure (see the settings' note).
    """
    gen = torch.Generator().manual_seed(seed)
    starts = (torch.rand(n_starts, 2, generator=gen, dtype=DTYPE) * 2.0 - 1.0) * half_width
    runs: dict[str, Trajectories] = {}
    summary = []
    for rho in rhos:
        for m in methods:
            tr = run_optimizer(sinc, starts, m, lr=lr, rho=rho, steps=steps)
            key = f"{m} rho={rho:g}"
            runs[key] = tr
            r = tr.final_points.norm(dim=1)
            summary.append({"method": METHOD_LABELS[m], "rho": rho, "at_maximum": int((r < max_radius).sum()),
                            "runs": n_starts, "mean_final_loss": tr.final_losses.mean().item(),
                            "median_final_radius": r.median().item()})
    settings = {"loss": "5*sin(x^2+y^2)/(x^2+y^2)", "n_starts": n_starts,
                "starts": f"uniform in [-{half_width:g}, {half_width:g}]^2", "half_width": half_width,
                "steps": steps, "lr": lr, "rhos": list(rhos), "at_maximum": f"final ||theta|| < {max_radius:g}",
                "seed": seed, "base": "SGD (no momentum)",
                "note": "the paper's 'centred unit square' is read as [-1, 1]^2: in [-0.5, 0.5]^2 every start has "
                        "||g|| < 1.2, where M-SAM ~ SAM, and at rho = 1 both end at the maximum (200 vs 196 of "
                        "200, seed 0), which contradicts the paper's figure; use --sinc-half-width 0.5 to see it"}
    return ToyResult("sinc", settings, summary, runs, {"starts": starts})


def paraboloid_experiment(start: float = 0.5, rho: float = 0.3, steps: int = 11,
                          lrs: Sequence[float] = (0.66, 0.74),
                          methods: Sequence[str] = ("gd", "sam", "msam")) -> ToyResult:
    """Fig. 3: loss per step on ℓ = ‖θ‖² from (start, 0) (the y-coordinate stays 0: the paper's 1-D parabola)."""
    starts = torch.tensor([[start, 0.0]], dtype=DTYPE)
    runs: dict[str, Trajectories] = {}
    summary = []
    for lr in lrs:
        for m in methods:
            tr = run_optimizer(paraboloid, starts, m, lr=lr, rho=rho, steps=steps)
            runs[f"{m} lr={lr:g}"] = tr
            summary.append({"lr": lr, "method": METHOD_LABELS[m], "final_theta": tr.final_points[0, 0].item(),
                            "final_loss": tr.final_losses[0].item()})
    settings = {"loss": "x^2 + y^2 (start on the x-axis)", "start": [start, 0.0], "rho": rho, "steps": steps,
                "lrs": list(lrs), "base": "SGD (no momentum)"}
    return ToyResult("paraboloid", settings, summary, runs)


# -- Fig. 4: linear stability of the SAM-type flow ---------------------------------------------------------

def effective_radius(method: str, grad_norm: Tensor, rho: float) -> Tensor:
    """ρ̃ with δ* = ρ̃ g: SAM ρ/n, M-SAM ρ/(n√(1+n²)); grad_norm[N] → [N] (NaN where n = 0)."""
    n = torch.where(grad_norm > 0, grad_norm, torch.full_like(grad_norm, float("nan")))
    if method == "sam":
        return rho / n
    if method == "msam":
        return rho / (n * torch.sqrt(1.0 + n * n))
    raise ValueError(f"effective radius is defined here for 'sam' and 'msam', not {method!r}")


def stability_eigenvalues(loss_fn: LossFn, points: Tensor, method: str, rho: float) -> Tensor:
    """Eigenvalues (real parts, descending) of A_ρ = ∇²ℓ(θ+δ*)(I + ρ̃∇²ℓ(θ)): points[N, 2] → [N, 2].

    θ attracts the SAM-type flow when both are positive. ρ = 0 gives the Hessian's eigenvalues.
    """
    pts = points.to(DTYPE)
    g = gradients(loss_fn, pts)
    h = hessians(loss_fn, pts)
    if rho == 0:
        a = h
    else:
        rt = effective_radius(method, g.norm(dim=1), rho)  # [N]
        h_pert = hessians(loss_fn, pts + rt[:, None] * g)
        a = h_pert @ (torch.eye(2, dtype=DTYPE) + rt[:, None, None] * h)
    ev = torch.linalg.eigvals(a).real  # A is not symmetric; its eigenvalues may form a complex pair
    return ev.sort(dim=1, descending=True).values


def stability_experiment(rhos: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8), lim: float = 2.0,
                         resolution: int = 200, methods: Sequence[str] = ("sam", "msam"),
                         box: float = 0.5) -> ToyResult:
    """Fig. 4: the second eigenvalue of A_ρ over [−lim, lim]² on the banana loss, per method and ρ.

    Summary: the share of the box [−box, box]² around the saddle that attracts (both eigenvalues > 0).
    """
    axis = torch.linspace(-lim, lim, resolution, dtype=DTYPE)  # an even count keeps the exact saddle (g = 0) off
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    near = (pts.abs() <= box).all(dim=1)
    maps: dict[str, Tensor] = {}
    summary = []
    for m in methods:
        for rho in rhos:
            ev = stability_eigenvalues(banana, pts, m, rho)
            maps[f"{m} rho={rho:g}"] = ev[:, 1].reshape(resolution, resolution)
            stable = (ev > 0).all(dim=1)
            summary.append({"method": METHOD_LABELS[m], "rho": rho,
                            "attracting_near_saddle": stable[near].double().mean().item(),
                            "attracting_overall": stable.double().mean().item()})
    settings = {"loss": "(1 - t1*t2)^2", "A": "H(theta + delta*) (I + rho_eff H(theta))", "rhos": list(rhos),
                "extent": [-lim, lim], "resolution": resolution, "near_saddle_box": [-box, box],
                "theory": "the saddle (Hessian eigenvalues +-2) attracts iff rho_eff > 1/2"}
    return ToyResult("stability", settings, summary, extra={"axis": axis, "second_eigenvalue": maps})


# -- Fig. 5: where each method ends from a grid of starts ---------------------------------------------------

def grid_starts(n: int = 10, lim: float = 3.0) -> Tensor:
    """The n×n grid of starts on [−lim, lim]²: [n*n, 2]."""
    axis = torch.linspace(-lim, lim, n, dtype=DTYPE)
    return torch.cartesian_prod(axis, axis)


GRID_TOL = 1e-7  # a grid run has stopped once ‖θₜ − θₜ₋₂‖ is below this
GRID_RADIUS = 0.2  # a run "ends at" the saddle or a flattest minimum within this distance (Figure 5's classes)
def grid_experiment(n: int = 10, lim: float = 3.0, lr: float = 0.01, rho: float = 1.0, max_steps: int = 500,
                    methods: Sequence[str] | None = None, etas: Mapping[str, float] | None = None,
                    alpha: float | None = None) -> ToyResult:
    """Fig. 5: each method (``methods`` None: every toy method but GD — the paper's SAM, M-SAM, Fisher SAM, ASAM
    and the others of the registry) from each start of an n×n grid on the banana loss; count ends at the
    saddle / (±1, ±1). ``etas``: η per method that has one (None: the registry's defaults, ASAM 0.01, Fisher SAM 1).

    Convergence: a run stops when ‖θₜ − θₜ₋₂‖ < ``GRID_TOL``, else after ``max_steps``. Near a minimum SAM-type updates
    with a finite lr settle into a small limit cycle rather than a point, so many runs stop at the cap; their
    class (saddle / flattest / elsewhere on the valley) no longer changes by then except for ASAM's slow drift.
    ``alpha``: M-SAM's metric scale (0 repeats SAM's runs exactly).
    """
    methods = [m for m in TOY_METHODS if m != "gd"] if methods is None else methods
    etas = {m: optimizer_info(m).defaults["eta"] for m in methods if m in TWO_PASS_METHODS and
            optimizer_info(m).hparam("eta")} if etas is None else etas
    starts = grid_starts(n, lim)
    tol, radius = GRID_TOL, GRID_RADIUS
    runs: dict[str, Trajectories] = {}
    summary = []
    for m in methods:
        tr = run_optimizer(banana, starts, m, lr=lr, rho=rho, steps=max_steps, eta=etas.get(m), tol=tol, alpha=alpha)
        runs[m] = tr
        fp = tr.final_points
        at_saddle = distance_to(fp, SADDLE) < radius
        at_flat = distance_to(fp, FLATTEST) < radius
        summary.append({"method": METHOD_LABELS[m], "at_saddle": int(at_saddle.sum()),
                        "at_flat": int(at_flat.sum()), "elsewhere": int((~at_saddle & ~at_flat).sum()),
                        "converged": int(tr.converged.sum()), "runs": len(starts),
                        "mean_loss": tr.final_losses.mean().item()})
    settings = {"loss": "(1 - t1*t2)^2", "grid": f"{n}x{n} on [-{lim:g}, {lim:g}]^2", "lr": lr, "rho": rho,
                "max_steps": max_steps, "converged": f"||theta_t - theta_(t-2)|| < {tol:g}",
                **{f"{m}_eta": eta for m, eta in etas.items()}, "msam_alpha": _msam_alpha(alpha), "radius": radius,
                "at_saddle": "final point within radius of (0, 0)", "at_flat": "within radius of (+-1, +-1)", "base": "SGD (no momentum)"}
    return ToyResult("grid", settings, summary, runs, {"starts": starts})


def run_experiment(name: str, **kwargs: Any) -> ToyResult:
    """Run one experiment by name ('banana', 'sinc', 'paraboloid', 'stability', 'grid', 'banana_rescale')."""
    funcs = {"banana": banana_experiment, "sinc": sinc_experiment, "paraboloid": paraboloid_experiment,
             "stability": stability_experiment, "grid": grid_experiment, "banana_rescale": banana_rescale_experiment}
    if name not in funcs:
        raise ValueError(f"unknown toy experiment {name!r}; choose one of {', '.join(funcs)}")
    return funcs[name](**kwargs)
