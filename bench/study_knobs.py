"""What the default study's head says about two optimizer knobs: Fisher SAM's η and the norm scope of ‖g‖.

    .venv/bin/python bench/study_knobs.py                    # the embedded default study (embeds it if needed)
    .venv/bin/python bench/study_knobs.py --set data.dataset.synthetic.seed=1 --train-etas 1 1e5

A SAM run of the default study's best SAM configuration (lr 0.003, ρ 0.05, seed 0; one head on the reference path
``align.train.optimizer.optimizer_and_schedule`` + ``take_step``, the one the pack's tests compare with) is
stopped at a few steps; on that step's own batch and gradient g it prints

- max gᵢ² over the perturbed parameters and the range of Fisher SAM's factor 1 + η gᵢ² at η = 1;
- ‖δ_F − δ_S‖/‖δ_S‖ per η, with δ_S = ρ g/‖g‖ and δ_F = ρ F⁻¹g/√(gᵀF⁻¹g), F⁻¹ = 1/(1 + η g²) (the closed forms);
- the logit scale's share of ‖g‖² (it is not perturbed; ``optim.norm_scope`` decides whether it counts in ‖g‖)
  and M-SAM's radius ρ/(n√(1 + n²)) with n over the perturbed parameters against n over all trainable ones.

Then it trains Fisher SAM at each ``--train-etas`` value and SAM, same seed and batches, and prints how far the
trained weights are apart, ‖θ_F − θ_S‖/‖θ_S‖. The default study's η axis (configs/compare/default.yaml) was chosen
from these numbers.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from align.cache.write import embed_all
from align.common.config import load_config
from align.common.config_files import packaged_config
from align.optim import backward_closure, take_step
from align.study.config import Cell, CompareConfig, cell_config
from align.train.heads import build_model
from align.train.losses import loss_for
from align.train.optimizer import optimizer_and_schedule
from align.train.run_data import Sampler, prepare_data

MEASURE_AT = (0, 1, 10, 20, 50, 100, 200, 300, 399)


class OneHead:
    """One cell of the default study trained alone on the reference path of one head (``optimizer_and_schedule``,
    ``take_step``, the clamp, the sampler the loop uses): what this script steps and looks inside."""

    def __init__(self, overrides: list[str], optimizer: str, eta: float | None, out: Path) -> None:
        cfg = load_config(CompareConfig, packaged_config("compare", "default"), overrides)
        embed_all(cfg.data, progress=False, log=print)  # a no-op when the study's caches are there
        method = (("eta", eta),) if eta is not None else ()
        self.cfg, data = prepare_data(cell_config(cfg, Cell(optimizer, 0.003, 0.05, 0, method), out))
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(self.cfg.head, self.cfg.loss, self.cfg.image_dim, self.cfg.text_dim)
        self.opt, self.schedule = optimizer_and_schedule(self.cfg, self.model)
        self.sampler = Sampler(data.train.caption_to_image, data.train.num_images, self.cfg.schedule.batch_size,
                               self.cfg.seed, torch.device("cpu"))
        self.loss_fn = loss_for(self.cfg.loss)
        self.image, self.text = data.train.image.float(), data.train.text.float()

    def loss(self, step: int) -> torch.Tensor:
        rows = self.sampler.batch(step)
        return self.loss_fn(**self.model(self.image[rows[0]], self.text[rows[1]]))

    def step(self, step: int) -> None:
        take_step(self.opt, backward_closure(lambda: self.loss(step)), self.cfg.optim.grad_clip)
        self.model.clamp_logit_scale_()
        self.schedule.step()


def step_gradient(head: OneHead, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first-pass gradient at ``step``'s batch → (perturbed gradients, gradients that are not perturbed)."""
    head.opt.zero_grad(set_to_none=True)
    head.loss(step).backward()
    perturbed, other = [], []
    for group in head.opt.param_groups:
        grads = [p.grad.detach().clone() for p in group["params"] if p.grad is not None]
        (perturbed if group.get("perturb", True) else other).extend(grads)
    head.opt.zero_grad(set_to_none=True)
    return perturbed, other


def fisher_vs_sam(grads: list[torch.Tensor], eta: float, rho: float = 0.05) -> float:
    """‖δ_F − δ_S‖/‖δ_S‖ for one gradient (closed forms of both perturbations)."""
    g = torch.cat([t.flatten() for t in grads]).double()
    d_sam = rho * g / g.norm()
    f_inv_g = g / (1.0 + eta * g * g)
    d_fisher = rho * f_inv_g / torch.sqrt((g * f_inv_g).sum())
    return float((d_fisher - d_sam).norm() / d_sam.norm())


def report_step(step: int, perturbed: list[torch.Tensor], other: list[torch.Tensor], etas: list[float]) -> None:
    """One line of figures for one step's gradient."""
    g2 = torch.cat([t.flatten() for t in perturbed]).double() ** 2
    n_p2 = float(g2.sum())
    n_o2 = float(sum(float((t.double() ** 2).sum()) for t in other))
    n_p, n_a = math.sqrt(n_p2), math.sqrt(n_p2 + n_o2)
    radius = {k: 0.05 / (n * math.sqrt(1.0 + n * n)) for k, n in (("perturbed", n_p), ("all", n_a))}
    fisher = "  ".join(f"η={eta:g}: {fisher_vs_sam(perturbed, eta):.2e}" for eta in etas)
    print(f"step {step:3d}  ‖g‖ {n_a:.3g}  logit share of ‖g‖² {100 * n_o2 / (n_p2 + n_o2):5.1f}%  "
          f"M-SAM radius all/perturbed {radius['all'] / radius['perturbed']:.3f}  max gᵢ² {float(g2.max()):.2e}  "
          f"(1 + gᵢ² ≤ {1 + float(g2.max()):.5f})  ‖δF−δS‖/‖δS‖ {fisher}", flush=True)


def flat_weights(head: OneHead) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in head.model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a study key")
    parser.add_argument("--etas", type=float, nargs="+", default=[1, 10, 100, 1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--train-etas", type=float, nargs="*", default=[1, 1e3, 1e4, 1e5, 1e6])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sam_head = OneHead(args.overrides, "sam", None, Path(tmp) / "sam")
        steps = sam_head.cfg.schedule.steps
        for step in range(steps):
            if step in MEASURE_AT:
                report_step(step, *step_gradient(sam_head, step), args.etas)
            sam_head.step(step)
        sam = flat_weights(sam_head)
        for eta in args.train_etas:
            fisher = OneHead(args.overrides, "fsam", eta, Path(tmp) / f"fsam{eta:g}")
            for step in range(steps):
                fisher.step(step)
            apart = float((flat_weights(fisher) - sam).norm() / sam.norm())
            print(f"trained {steps} steps: η={eta:g}  ‖θ_F − θ_S‖/‖θ_S‖ = {apart:.2e}", flush=True)


if __name__ == "__main__":
    main()
