"""Figures and JSON for the 2-D experiments of ``align.toy`` (edge layer: the only toy code that writes files).

``write_outputs(result, out_dir)`` writes ``<name>.png`` (a figure laid out like the paper's) and ``<name>.json``
(settings, the summary table, final points and losses per run). matplotlib is imported inside the functions
and used through ``matplotlib.figure.Figure`` (no pyplot, no GUI backend, no global state).
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align.common.files import atomic_write_bytes, json_safe
from align.toy.experiments import FLATTEST, METHOD_COLORS, METHOD_LABELS, SADDLE, ToyResult, banana, distance_to, sinc


# -- files --------------------------------------------------------------------------------------------------

def result_to_json(result: ToyResult) -> dict[str, Any]:
    """Settings, summary rows and, per run, final points [B, 2], final losses [B], steps and convergence."""
    runs = {key: {"final_points": tr.final_points, "final_losses": tr.final_losses, "steps": tr.steps,
                  "converged": tr.converged} for key, tr in result.runs.items()}
    data: dict[str, Any] = {"experiment": result.name, "settings": result.settings, "summary": result.summary,
                            "runs": runs}
    if "starts" in result.extra:
        data["starts"] = result.extra["starts"]
    return json_safe(data)


def write_outputs(result: ToyResult, out_dir: Path) -> list[Path]:
    """Write ``<name>.json`` and ``<name>.png`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    json_path = out_dir / f"{result.name}.json"
    png_path = out_dir / f"{result.name}.png"
    atomic_write_bytes(json_path, (json.dumps(result_to_json(result), indent=1) + "\n").encode("utf-8"))
    fig = PLOTTERS[result.name](result)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    atomic_write_bytes(png_path, buf.getvalue())
    return [png_path, json_path]


# -- shared drawing helpers ---------------------------------------------------------------------------------

def _surface(loss_fn, lim: float, n: int = 300) -> tuple[Any, Any, Any]:
    """Grid values of a toy loss on [−lim, lim]² as numpy arrays (X, Y, Z)."""
    axis = torch.linspace(-lim, lim, n, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    zz = loss_fn(torch.stack([xx, yy], dim=-1))
    return xx.numpy(), yy.numpy(), zz.numpy()


def _banana_background(ax, lim: float) -> None:
    """Filled log-contours of the banana loss, its valley θ₁θ₂ = 1, the saddle and the flattest minima."""
    from matplotlib.colors import LogNorm  # heavy: only when a figure is drawn

    x, y, z = _surface(banana, lim)
    levels = np.logspace(-3, math.log10(max(z.max(), 1.0)), 25)
    ax.contourf(x, y, np.maximum(z, 1e-3), levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.85)
    t = np.linspace(1.0 / lim, lim, 200)
    for sx in (1, -1):
        ax.plot(sx * t, sx / t, color="gold", lw=1.0, ls="--", alpha=0.9)
    ax.plot(*zip(*SADDLE), marker="X", color="black", ms=8, ls="none")
    ax.plot([p[0] for p in FLATTEST[:2]], [p[1] for p in FLATTEST[:2]], marker="*", color="gold", ms=11,
            ls="none", markeredgecolor="black")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel(r"$\theta_1$")
    ax.set_ylabel(r"$\theta_2$")


def _method_of(key: str) -> str:
    return key.split(" ")[0]


# -- one figure per experiment ------------------------------------------------------------------------------

def plot_banana(result: ToyResult):
    """Fig. 1: trajectories of GD, SAM and M-SAM over the banana loss, and loss per step."""
    from matplotlib.figure import Figure  # heavy: only when a figure is drawn

    fig = Figure(figsize=(11, 4.8))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    _banana_background(ax, 2.0)
    for key, tr in result.runs.items():
        m = _method_of(key)
        pts = tr.points[0].numpy()
        row = next(r for r in result.summary if r["method"] == METHOD_LABELS[m])
        label = f"{METHOD_LABELS[m]} → ({row['theta1']:.3f}, {row['theta2']:.3f}), ℓ={row['loss']:.3g}"
        ax.plot(pts[:, 0], pts[:, 1], color=METHOD_COLORS[m], lw=2, label=label)
        ax.plot(pts[-1, 0], pts[-1, 1], "o", color=METHOD_COLORS[m], ms=7, markeredgecolor="white")
        ax2.plot(tr.losses[0].numpy(), color=METHOD_COLORS[m], lw=2, label=METHOD_LABELS[m])
    start = result.settings["start"]
    ax.plot(start[0], start[1], "s", color="white", ms=8, markeredgecolor="black", label="start")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    s = result.settings
    ax.set_title(rf"$\ell(\theta)=(1-\theta_1\theta_2)^2$, $\rho$={s['rho']:g}, lr={s['lr']:g}, {s['steps']} steps")
    ax2.set_yscale("symlog", linthresh=1e-4)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss")
    ax2.set_title("loss per step (SAM stalls at the saddle, ℓ = 1)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    return fig


def plot_sinc(result: ToyResult):
    """Fig. 2: start and final points of SAM and M-SAM on the sinc loss, one row per ρ."""
    from matplotlib.figure import Figure  # heavy: only when a figure is drawn

    rhos = result.settings["rhos"]
    methods = list(dict.fromkeys(_method_of(k) for k in result.runs))
    fig = Figure(figsize=(4.0 * len(methods) + 1.2, 4.2 * len(rhos)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rhos), len(methods), squeeze=False))
    lim = 3.0
    x, y, z = _surface(sinc, lim)
    starts = result.extra["starts"].numpy()
    radius = float(result.settings["at_maximum"].split("<")[-1])
    for i, rho in enumerate(rhos):
        for j, m in enumerate(methods):
            ax = axes[i, j]
            cs = ax.contourf(x, y, z, levels=30, cmap="viridis")
            tr = result.runs[f"{m} rho={rho:g}"]
            row = next(r for r in result.summary if r["method"] == METHOD_LABELS[m] and r["rho"] == rho)
            fp = tr.final_points.numpy()
            ax.plot(starts[:, 0], starts[:, 1], ".", color="white", ms=3, alpha=0.6, label="starts")
            ax.plot(fp[:, 0], fp[:, 1], "o", color=METHOD_COLORS[m], ms=4, markeredgecolor="black", mew=0.4,
                    label="final points")
            ax.add_patch(_circle(radius))
            ax.set_title(f"{METHOD_LABELS[m]}, ρ = {rho:g}\n{row['at_maximum']}/{row['runs']} end at the maximum",
                         fontsize=10)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            if i == 0 and j == 0:
                ax.legend(loc="lower left", fontsize=8)
    fig.colorbar(cs, ax=axes.ravel().tolist(), shrink=0.8, label=r"$5\,\sin(x^2+y^2)/(x^2+y^2)$")
    s = result.settings
    fig.suptitle(f"sinc loss: {s['n_starts']} starts {s['starts']}, lr = {s['lr']:g}, {s['steps']} steps")
    return fig


def _circle(radius: float):
    from matplotlib.patches import Circle  # heavy: only when a figure is drawn

    return Circle((0.0, 0.0), radius, fill=False, color="white", lw=1.0, ls="--")


def plot_paraboloid(result: ToyResult):
    """Fig. 3: iterates on the parabola ℓ = θ² and loss per step, one column per learning rate."""
    from matplotlib.figure import Figure  # heavy: only when a figure is drawn

    lrs = result.settings["lrs"]
    fig = Figure(figsize=(5.2 * len(lrs), 7.5))
    axes = fig.subplots(2, len(lrs), squeeze=False)
    xs = np.linspace(-1.0, 1.0, 200)
    for j, lr in enumerate(lrs):
        top, bottom = axes[0, j], axes[1, j]
        top.plot(xs, xs ** 2, color="black", lw=1)
        for key, tr in result.runs.items():
            if not key.endswith(f"lr={lr:g}"):
                continue
            m = _method_of(key)
            th = tr.points[0, :, 0].numpy()
            loss = tr.losses[0].numpy()
            top.plot(th, th ** 2, "-o", color=METHOD_COLORS[m], ms=4, lw=1, alpha=0.8, label=METHOD_LABELS[m])
            bottom.plot(loss, "-o", color=METHOD_COLORS[m], ms=4, label=f"{METHOD_LABELS[m]} (final {loss[-1]:.3f})")
        top.set_title(f"lr = {lr:g}, ρ = {result.settings['rho']:g}")
        top.set_xlabel(r"$\theta$")
        top.set_ylabel(r"$\ell(\theta)=\theta^2$")
        top.legend(fontsize=8)
        bottom.set_xlabel("step")
        bottom.set_ylabel("loss")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=8)
    fig.suptitle(f"paraboloid, start θ = {result.settings['start'][0]:g}: M-SAM ends lower than SAM")
    fig.tight_layout()
    return fig


def plot_stability(result: ToyResult):
    """Fig. 4: heatmaps of the second eigenvalue of A_ρ, rows = methods, columns = ρ; blue = attracting."""
    from matplotlib.colors import SymLogNorm  # heavy: only when a figure is drawn
    from matplotlib.figure import Figure  # heavy: only when a figure is drawn

    maps = result.extra["second_eigenvalue"]
    rhos = result.settings["rhos"]
    methods = list(dict.fromkeys(_method_of(k) for k in maps))
    lim = result.settings["extent"][1]
    axis = result.extra["axis"].numpy()
    fig = Figure(figsize=(3.0 * len(rhos) + 1.2, 3.0 * len(methods) + 0.5), layout="constrained")
    axes = fig.subplots(len(methods), len(rhos), squeeze=False)
    norm = SymLogNorm(linthresh=0.1, vmin=-20, vmax=20, base=10)
    t = np.linspace(1.0 / lim, lim, 200)
    for i, m in enumerate(methods):
        for j, rho in enumerate(rhos):
            ax = axes[i, j]
            lam = maps[f"{m} rho={rho:g}"].numpy()
            im = ax.imshow(np.nan_to_num(lam, nan=0.0), origin="lower", extent=(-lim, lim, -lim, lim),
                           cmap="RdBu", norm=norm, interpolation="nearest")
            ax.contour(axis, axis, lam, levels=[0.0], colors="black", linewidths=0.6)
            for sx in (1, -1):
                ax.plot(sx * t, sx / t, color="gold", lw=0.8, ls="--")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_title(f"{METHOD_LABELS[m]}, ρ = {rho:g}", fontsize=10)
            if j == 0:
                ax.set_ylabel(r"$\theta_2$")
            if i == len(methods) - 1:
                ax.set_xlabel(r"$\theta_1$")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85,
                 label=r"second eigenvalue of $A_\rho$ (> 0 with the first: attracting)")
    fig.suptitle(r"$A_\rho=\nabla^2\ell(\theta+\delta^*)(I+\tilde\rho\,\nabla^2\ell(\theta))$ on "
                 r"$\ell=(1-\theta_1\theta_2)^2$")
    return fig


def plot_grid(result: ToyResult):
    """Fig. 5: trajectories from a grid of starts, end points coloured by saddle / flattest / elsewhere."""
    from matplotlib.figure import Figure  # heavy: only when a figure is drawn

    methods = list(result.runs)
    cols = min(len(methods), GRID_COLUMNS)
    rows = math.ceil(len(methods) / cols)
    fig = Figure(figsize=(4.3 * cols, 4.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    radius = result.settings["radius"]
    lim = 3.0
    for ax, m in zip(axes, methods):
        _banana_background(ax, lim)
        tr = result.runs[m]
        for b in range(tr.points.shape[0]):
            p = tr.points[b, : int(tr.steps[b]) + 1].numpy()
            ax.plot(p[:, 0], p[:, 1], color=METHOD_COLORS[m], lw=0.6, alpha=0.5)
        starts = result.extra["starts"].numpy()
        ax.plot(starts[:, 0], starts[:, 1], ".", color="black", ms=3)
        fp = tr.final_points
        saddle = (distance_to(fp, SADDLE) < radius).numpy()
        flat = (distance_to(fp, FLATTEST) < radius).numpy()
        other = ~saddle & ~flat
        fpn = fp.numpy()
        for mask, color, label in ((saddle, "red", "saddle"), (flat, "lime", "(±1, ±1)"), (other, "cyan", "elsewhere")):
            ax.plot(fpn[mask, 0], fpn[mask, 1], "o", color=color, ms=6, markeredgecolor="black", mew=0.6,
                    label=f"{label}: {int(np.sum(mask))}")
        ax.set_title(METHOD_LABELS[m])
        ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    s = result.settings
    fig.suptitle(f"banana loss, {s['grid']} starts, lr = {s['lr']:g}, ρ = {s['rho']:g}, "
                 f"≤ {s['max_steps']} steps")
    fig.tight_layout()
    return fig


def plot_banana_rescale(result: ToyResult):
    """One panel per method: its θ-space trajectories on the banana loss for every rescaling c (line style per c),
    end points marked; the legend gives each end point's distance from the one at c = 1."""
    from matplotlib.figure import Figure  # heavy: only when a figure is drawn

    s = result.settings
    methods = list(dict.fromkeys(_method_of(k) for k in result.runs))
    cols = min(GRID_COLUMNS, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.0 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    styles = ["-", "--", ":", "-."]
    for ax, m in zip(axes, methods):
        _banana_background(ax, 2.0)
        for i, c in enumerate(s["scales"]):
            pts = result.runs[f"{m} c={c:g}"].points[0].numpy()
            row = next(r for r in result.summary if r["method"] == METHOD_LABELS[m] and r["c"] == c)
            ax.plot(pts[:, 0], pts[:, 1], styles[i % len(styles)], color=METHOD_COLORS[m], lw=2,
                    label=f"c = {c:g} → ({row['theta1']:.2f}, {row['theta2']:.2f}), shift {row['shift']:.3f}")
            ax.plot(pts[-1, 0], pts[-1, 1], "o", color=METHOD_COLORS[m], ms=6, markeredgecolor="white")
        ax.plot(*s["start"], "s", color="white", ms=7, markeredgecolor="black")
        ax.set_title(METHOD_LABELS[m])
        ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    for ax in axes[len(methods):]:
        ax.set_axis_off()
    fig.suptitle(rf"banana loss in $\theta_1 = c\,\varphi_1$, $\theta_2 = \varphi_2/c$ (trained in $\varphi$, drawn in "
                 rf"$\theta$): lr = {s['lr']:g}, $\rho$ = {s['rho']:g}, {s['steps']} steps")
    fig.tight_layout()
    return fig


GRID_COLUMNS = 4  # panels per row of the grid figure (one per method)
PLOTTERS = {"banana": plot_banana, "sinc": plot_sinc, "paraboloid": plot_paraboloid,
            "stability": plot_stability, "grid": plot_grid, "banana_rescale": plot_banana_rescale}
