"""Head-training throughput against this machine's own matmul speed, measured side by side in one run.

    .venv/bin/python bench/bench_train.py                       # CPU here; CUDA when present (bf16 autocast)
    .venv/bin/python bench/bench_train.py --batches 1024 4096 --steps 50 --device cuda

What is timed is the training loop's core exactly as ``align.train`` runs it: gather a random batch of cached
embeddings on the device, ``align.optim.step.take_step`` (forward, backward, optimizer step — two passes for
M-SAM), the logit-scale clamp, the LR scheduler step, and the per-step host read of loss and ‖g‖ that the loop
logs. Default shapes are the offline pair's: EfficientNet-Lite0 1280-d images, MiniLM 384-d captions, linear
heads to 256-d. FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one real step
(matmuls; elementwise work is not counted, so achieved GFLOP/s is a lower bound on work done). The reference is
a square fp32 matmul (``torch.mm``) timed in the same process; on CUDA a bf16 one is timed too, since training
runs under bf16 autocast there. Goal: ≥ 50% of the reference at batch ≥ 1024. Variants are interleaved round by
round and the median is reported, so machine noise hits all alike.

On a CPU shared with other work, compare OMP_NUM_THREADS=1 too: with more OpenMP threads than free cores, threads
spin-wait at every small kernel and the share collapses (2 threads on a 2-core machine with load ≈ 5: 12–26% at
batch ≥ 1024; 1 thread: 60–71%, measured 2026-11-29).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from align.common.config import validate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, rounds: int = 5) -> float:
    """Median GFLOP/s of an (n, n) @ (n, n) product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 2
    torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        times.append((time.perf_counter() - t) / reps)
    return 2 * n ** 3 / statistics.median(times) / 1e9


class Variant:
    """One optimizer × batch size: model, optimizer and scheduler built the way ``align.train`` builds them."""

    def __init__(self, name: str, batch: int, args: argparse.Namespace, image: torch.Tensor, text: torch.Tensor,
                 device: torch.device) -> None:
        from align.train.heads import build_model
        from align.train.losses import loss_for
        from align.train.config import TrainConfig
        from align.train.optimizer import optimizer_and_schedule

        data = {"dataset": {"kind": "synthetic"},
                "image_encoder": {"backend": "efficientnet_lite", "model": "efficientnet-lite0"},
                "text_encoder": {"backend": "minilm", "model": "all-MiniLM-L6-v2"}}
        self.cfg = validate(TrainConfig, {"data": data, "optim": {"name": name, "lr": 1e-3, "base": "adamw"},
                                          "head": {"kind": args.head, "out_dim": args.out_dim},
                                          "schedule": {"steps": 10 ** 6, "batch_size": batch, "warmup_steps": 10}})
        torch.manual_seed(0)
        self.model = build_model(self.cfg.head, self.cfg.loss, image.shape[1], text.shape[1]).to(device)
        self.loss_fn = loss_for(self.cfg.loss)
        self.opt, self.sched = optimizer_and_schedule(self.cfg, self.model)
        self.name, self.batch, self.device = name, batch, device
        self.image, self.text = image, text
        self.bf16 = device.type == "cuda"
        self.gen = torch.Generator(device=device).manual_seed(0)

    def step(self) -> None:
        from align.optim.step import backward_closure, take_step

        rows = torch.randint(0, self.image.shape[0], (self.batch,), device=self.device, generator=self.gen)
        image, text = self.image[rows], self.text[rows]
        loss, grad_norm = take_step(self.opt, backward_closure(lambda: self.loss_fn(**self.model(image, text)),
                                                               self.bf16))
        self.model.clamp_logit_scale_()
        self.sched.step()
        float(loss), float(grad_norm)  # the loop logs both every step: one host sync

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops()

    def time_steps(self, steps: int) -> float:
        sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "msam"])
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="batch sizes (default: 256 1024 2048 on CPU, 1024 4096 16384 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 5 CPU, 50 CUDA)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-dim", type=int, default=1280)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--out-dim", type=int, default=256)
    parser.add_argument("--head", default="linear", choices=["linear", "mlp", "starmlp"])
    parser.add_argument("--pool", type=int, default=50_000, help="cached embeddings to draw batches from")
    args = parser.parse_args()

    from align.common.device import pick_device

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    batches = args.batches or ([1024, 4096, 16384] if cuda else [256, 1024, 2048])
    steps = args.steps or (50 if cuda else 5)
    threads = torch.get_num_threads()
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else f", {threads} threads")
          + f", torch {torch.__version__}; heads {args.head} {args.image_dim}→{args.out_dim}, "
            f"{args.text_dim}→{args.out_dim}; {'bf16 autocast' if cuda else 'fp32'}")

    n = 8192 if cuda else 2048
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is true fp32
    peak32 = matmul_gflops(n, torch.float32, device)
    peak16 = matmul_gflops(n, torch.bfloat16, device) if cuda else None
    print(f"reference matmul {n}³: fp32 {peak32:,.0f} GFLOP/s" + (f", bf16 {peak16:,.0f} GFLOP/s" if peak16 else ""))

    gen = torch.Generator().manual_seed(0)
    image = torch.randn(args.pool, args.image_dim, generator=gen).to(device)
    text = torch.randn(args.pool, args.text_dim, generator=gen).to(device)
    variants = [Variant(name, b, args, image, text, device) for b in batches for name in args.optimizers]
    flops = {}
    for v in variants:
        flops[v] = v.flops()
        v.time_steps(2)  # warm-up (allocator, kernels)
    # Each round times the reference matmul right before each variant, so a share is computed against the
    # machine's speed at that moment (other processes on a shared machine come and go).
    times: dict[Variant, list[float]] = {v: [] for v in variants}
    shares: dict[Variant, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            ref = matmul_gflops(n, torch.bfloat16 if cuda else torch.float32, device, rounds=1)
            times[v].append(v.time_steps(steps))
            shares[v].append(flops[v] / 1e9 / times[v][-1] / ref)

    ref_name = "bf16" if cuda else "fp32"
    print(f"\n{'optimizer':>9} {'batch':>6} {'ms/step':>9} {'samples/s':>11} {'GFLOP/step':>11} {'GFLOP/s':>9} "
          f"{'% ' + ref_name + ' mm':>10}  goal   (% = median over rounds of achieved / reference timed just before)")
    for v in variants:
        t = statistics.median(times[v])
        gf = flops[v] / 1e9
        achieved = gf / t
        share = statistics.median(shares[v])
        goal = ("ok" if share >= 0.5 else "BELOW") if v.batch >= 1024 else "—"
        print(f"{v.name:>9} {v.batch:>6} {t * 1e3:>9.2f} {v.batch / t:>11,.0f} {gf:>11.3f} {achieved:>9,.0f} "
              f"{100 * share:>9.1f}%  {goal}")
    for b in batches:
        by = {v.name: statistics.median(times[v]) for v in variants if v.batch == b}
        if "msam" in by and len(by) > 1:
            base = next(name for name in args.optimizers if name != "msam")
            print(f"batch {b}: msam step / {base} step = {by['msam'] / by[base]:.2f} (two passes: ideal ≈ 2)")


if __name__ == "__main__":
    main()
