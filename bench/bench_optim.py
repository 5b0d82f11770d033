"""Optimizer step cost, measured side by side in one run (ratios, never absolute goals).

    .venv/bin/python bench/bench_optim.py            # pip install -e ".[bench]" for the pytorch_optimizer row

1. Head-sized model (two Linear 768→512, CLIP loss, batch 1024), base AdamW:
   M-SAM step / SAM step (goal ≤ 1.03) and SAM step / base step (goal ≤ 2.1); GSAM, Friendly SAM and LookSAM
   (k = 10) over AdamW against AdamW alone, LookSAM against SAM, Lion against AdamW and SAM over Lion against
   Lion (each method's step time relative to its base optimizer).
2. A model with ~200 parameter tensors: our multi-tensor SAM vs a per-parameter Python loop (same math),
   and vs pytorch_optimizer's SAM.
Variants are interleaved round by round and the median per variant is reported, so machine noise hits all alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from align.optim import GSAM, MSAM, SAM, FriendlySAM, Lion, LookSAM


def clip_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = 14.3 * a @ b.T
    labels = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class LoopSAM(torch.optim.Optimizer):
    """Reference: the same SAM update written with a Python loop over parameters (the common public pattern)."""

    def __init__(self, params, base_optimizer, rho=0.05, **kw):
        super().__init__(params, dict(rho=rho, **kw))
        self.base_optimizer = base_optimizer(self.param_groups, **kw)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(torch.stack([p.grad.norm(2) for g in self.param_groups for p in g["params"]
                                       if p.grad is not None]), 2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(p.grad * scale)

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.copy_(self.state[p]["old_p"])
        self.base_optimizer.step()


def timed_rounds(variants: dict[str, Callable[[], None]], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each variant, interleaving the variants within every round."""
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def head_model_steps(batch: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 768), torch.randn(batch, 768)

    def make():
        return torch.nn.ModuleList([torch.nn.Linear(768, 512), torch.nn.Linear(768, 512)])

    def loss_of(m):
        return clip_loss(m[0](x), m[1](y))

    def single(opt_class, **kw):
        model = make()
        opt = opt_class(model.parameters(), lr=1e-4, **kw)

        def step():
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()
        return step

    def two_pass(cls, base=torch.optim.AdamW, **kw):
        model = make()
        opt = cls(model.parameters(), base, rho=0.05, lr=1e-4, **kw)
        return lambda: opt.step(lambda: loss_of(model).backward())

    return {"base AdamW": single(torch.optim.AdamW), "SAM": two_pass(SAM), "M-SAM": two_pass(MSAM),
            "GSAM": two_pass(GSAM), "Friendly SAM": two_pass(FriendlySAM), "LookSAM k=10": two_pass(LookSAM, k=10),
            "Lion": single(Lion), "SAM over Lion": two_pass(SAM, base=Lion)}


def many_tensor_steps(n_layers: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x = torch.randn(64, 32)

    def make():
        layers = []
        for _ in range(n_layers):
            layers += [torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)]
        return torch.nn.Sequential(*layers)

    def two_pass(model, opt):  # one full step, to build the base optimizer's state
        loss = model(x).square().mean()
        loss.backward()
        opt.first_step()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.second_step()
        opt.zero_grad()

    def update_only(model, opt):
        # Optimizer work alone: gradients already in .grad, no forward/backward.
        opt.first_step()
        opt.second_step()

    ours_model, loop_model = make(), make()
    ours = SAM(ours_model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, foreach=True)
    loop = LoopSAM(loop_model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, foreach=True)
    two_pass(ours_model, ours)
    for p_ours, p_loop in zip(ours_model.parameters(), loop_model.parameters()):
        p_ours.grad = torch.randn_like(p_ours)
        p_loop.grad = p_ours.grad.clone()
    variants = {"ours (foreach)": lambda: update_only(ours_model, ours),
                "per-parameter loop": lambda: update_only(loop_model, loop)}
    try:
        from pytorch_optimizer import SAM as PoSAM
    except ImportError:
        print("(pytorch_optimizer not installed: pip install -e '.[bench]' for its row)")
    else:
        po_model = make()
        po = PoSAM(po_model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, foreach=True)
        for p_ours, p_po in zip(ours_model.parameters(), po_model.parameters()):
            p_po.grad = p_ours.grad.clone()
        variants["pytorch_optimizer SAM"] = lambda: update_only(po_model, po)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--layers", type=int, default=50, help="Linear+LayerNorm pairs (4 tensors each): 50 → 200 tensors")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    t = timed_rounds(head_model_steps(args.batch), args.rounds, inner=10)  # 10: one LookSAM full step per round
    print(f"\n[1] head-sized model, batch {args.batch} (median ms/step)")
    for k, v in t.items():
        print(f"  {k:<22} {v * 1e3:8.2f}")
    print(f"  M-SAM / SAM  = {t['M-SAM'] / t['SAM']:.3f}   (goal ≤ 1.03)")
    print(f"  SAM / base   = {t['SAM'] / t['base AdamW']:.3f}   (goal ≤ 2.1)")
    for method, base in (("GSAM", "base AdamW"), ("Friendly SAM", "base AdamW"), ("LookSAM k=10", "base AdamW"),
                         ("LookSAM k=10", "SAM"), ("Lion", "base AdamW"), ("SAM over Lion", "Lion")):
        print(f"  {method} / {base} = {t[method] / t[base]:.3f}")

    variants = many_tensor_steps(args.layers)
    n_tensors = 4 * args.layers
    t = timed_rounds(variants, args.rounds, inner=5)
    print(f"\n[2] model with {n_tensors} parameter tensors: optimizer work per step (first_step + second_step, median ms)")
    for k, v in t.items():
        print(f"  {k:<22} {v * 1e3:8.2f}")
    ours = t["ours (foreach)"]
    for k, v in t.items():
        if k != "ours (foreach)":
            print(f"  {k} / ours = {v / ours:.2f}")


if __name__ == "__main__":
    main()
