"""Cells per second of a study grid trained in packs against the same grid trained one cell at a time (--pack 1),
measured side by side in one run.

    .venv/bin/python bench/bench_study.py                                  # the default study (CPU), both ways
    .venv/bin/python bench/bench_study.py --set grid.seeds=[0] --set grid.lrs=[0.003]   # a reduced grid
    .venv/bin/python bench/bench_study.py --synthetic --device cuda --heads 64 --dim 512 --batch 1024

Default mode: the packaged default study (or ``--config``), its embeddings cached first and not timed, then
``align.compare.run_study`` with ``pack=1`` and with ``pack="auto"``, each into a fresh temporary study folder:
what is timed is the study's training phase (every cell trained, validated, tested and its sharpness measured;
not the embedding, not the report). The two results.csv are compared too: a head in a pack of another size agrees
to floating-point noise (BLAS sums a matmul of another shape in another order), so the figure is the largest
difference of any test or validation R@1 column between the two, and whether they happen to be identical. ``--mixed`` also times one pack of single- and two-pass cells against
the same cells in two packs, one per kind.

``--step``: one optimizer step of a pack of one against a pack of ``--heads`` (default study's head shape, batch
``--batch``, ``--steps`` repetitions), ms per head-step and the matmul rate each reaches; beside each, the same
matmuls timed bare (what a step cannot do without), so the rest is what packing can amortise.

``--synthetic``: random paired embeddings of ``--dim`` dimensions in memory (no encoders, no cache: what a GPU
check can run), ``--heads`` cells (AdamW, SAM, M-SAM, ASAM × 4 learning rates × seeds) with 512-d-sized heads,
``--steps`` steps at ``--batch``, one validation, no test split and no sharpness; the packs against the cells one
by one (``--alone`` of them, extrapolated: on a GPU the cells-one-at-a-time rate is flat).

The load average is printed with the figures: on a machine shared with other work a ratio is only meaningful
when both sides ran under the same load (they run back to back).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _load(label: str) -> str:
    one, five, _ = os.getloadavg()
    return f"{label}: load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def study_mode(args: argparse.Namespace) -> dict:
    """run_study twice on the configured grid: one cell at a time, then in packs."""
    from align.cache.write import embed_all
    from align.study.config import CompareConfig, grid_cells
    from align.study.compare import run_study
    from align.common.config import load_config
    from align.common.config_files import packaged_config, resolve_config

    path = resolve_config(args.config, ("compare",)) if args.config else packaged_config("compare", "default")
    base = load_config(CompareConfig, path, list(args.set))
    embed_all(base.data, progress=False, log=lambda m: None)
    cells = len(grid_cells(base.grid))
    out: dict = {"cells": cells, "config": str(path), "overrides": list(args.set)}
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        for label, pack in (("pack 1", 1), ("packed", "auto")):
            cfg = base.model_copy(update={"study_dir": str(Path(tmp) / label.replace(" ", "")), "name": "bench"})
            print(_load(f"before {label}"), flush=True)
            t = time.perf_counter()
            rows[label] = run_study(cfg, log=lambda m: print("  " + m, flush=True), progress=False, pack=pack,
                                    memory_budget=args.memory_budget)
            seconds = time.perf_counter() - t
            out[label] = {"seconds": seconds, "cells_per_s": cells / seconds}
            print(f"{label}: {cells} cells in {seconds:.1f} s = {cells / seconds:.3f} cells/s", flush=True)
    out["results_csv_identical"] = rows["pack 1"] == rows["packed"]  # the rows results.csv is written from
    out["largest_R@1_difference"] = largest_recall_difference(rows["pack 1"], rows["packed"])
    out["speedup"] = out["packed"]["cells_per_s"] / out["pack 1"]["cells_per_s"]
    print(_load("after"))
    print(f"packed / pack 1: {out['speedup']:.2f}× cells per second (goal ≥ 2× on a quiet CPU); results.csv "
          f"{'identical' if out['results_csv_identical'] else 'not identical'}, largest R@1 difference "
          f"{100 * out['largest_R@1_difference']:.2f} points")
    return out


def largest_recall_difference(a: list[dict], b: list[dict]) -> float:
    """The largest |difference| of any R@k column between two studies' rows of the same cells (NaN if a cell's
    status or a column differs in presence)."""
    worst = 0.0
    for x, y in zip(a, b):
        if x["run"] != y["run"] or x["status"] != y["status"]:
            return float("nan")
        for key in (k for k in x if "R@" in k):
            if (x[key] is None) != (y.get(key) is None):
                return float("nan")
            if x[key] is not None:
                worst = max(worst, abs(float(x[key]) - float(y[key])))
    return worst


def _synthetic_data(args: argparse.Namespace):
    """Random paired embeddings (captions = a fixed map of their image + noise) as the trainer's splits."""
    import torch

    from align.cache.embeddings import PairedEmbeddings
    from align.train.run_data import RunData

    gen = torch.Generator().manual_seed(0)
    mapping = torch.randn(args.dim, args.dim, generator=gen) / args.dim ** 0.5

    def split(n: int) -> PairedEmbeddings:
        image = torch.randn(n, args.dim, generator=gen)
        c2i = torch.arange(n).repeat_interleave(2)
        return PairedEmbeddings(image, image[c2i] @ mapping + 0.5 * torch.randn(2 * n, args.dim, generator=gen), c2i)

    return RunData(train=split(args.images), val=split(1000), test=None)


def _synthetic_configs(args: argparse.Namespace, root: Path) -> list:
    """``--heads`` cells: AdamW, SAM, M-SAM and ASAM × 4 learning rates × seeds."""
    from align.common.config import validate
    from align.train.config import TrainConfig

    data = {"dataset": {"kind": "synthetic"}, "image_encoder": {"backend": "open_clip", "model": "ViT-B-32"},
            "text_encoder": {"backend": "open_clip", "model": "ViT-B-32"}}
    cells = [(name, lr, seed) for seed in range(1000) for name in ("adamw", "sam", "msam", "asam")
             for lr in (1e-3, 3e-3, 1e-2, 3e-2)][:args.heads]
    return [validate(TrainConfig, {
        "data": data, "device": args.device, "seed": seed, "image_dim": args.dim, "text_dim": args.dim,
        "head": {"out_dim": args.dim}, "optim": {"name": name, "lr": lr},
        "schedule": {"steps": args.steps, "batch_size": args.batch, "warmup_steps": 10},
        "eval": {"every": args.steps, "test_split": None, "sharpness": False, "backend": "torch"},
        "checkpoint_every": args.steps, "loss_at_step": args.steps, "out_dir": str(root / f"{name}_{lr}_{seed}")})
        for name, lr, seed in cells]


def synthetic_mode(args: argparse.Namespace) -> dict:
    """The packs of ``--heads`` cells against ``--alone`` of the same cells trained one by one."""
    import torch

    from align.study.config import Cell
    from align.study.packing import plan_packs
    from align.train.loop import train_pack

    data = _synthetic_data(args)
    out: dict = {"heads": args.heads, "dim": args.dim, "batch": args.batch, "steps": args.steps,
                 "device": str(args.device)}
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        cfgs = _synthetic_configs(args, Path(tmp) / "packed")
        cells = [Cell(c.optim.name, c.optim.lr, 0.05, c.seed) for c in cfgs]
        index = {cell: i for i, cell in enumerate(cells)}
        packs = [[index[c] for c in p] for p in plan_packs(cells, len(cells), 1)]
        warm = _synthetic_configs(args, Path(tmp) / "warm-up")[0]  # first-call costs (imports, allocator) untimed
        train_pack([warm], [Path(warm.out_dir)], progress=False, data=data)
        print(_load("before packed"), flush=True)
        t = time.perf_counter()
        for p in packs:
            train_pack([cfgs[i] for i in p], [Path(cfgs[i].out_dir) for i in p], progress=False, data=data)
        packed = time.perf_counter() - t
        alone_cfgs = _synthetic_configs(args, Path(tmp) / "alone")[:args.alone]
        t = time.perf_counter()
        for cfg in alone_cfgs:
            train_pack([cfg], [Path(cfg.out_dir)], progress=False, data=data)
        alone = time.perf_counter() - t
    out["packed"] = {"seconds": packed, "cells_per_s": len(cfgs) / packed, "packs": [len(p) for p in packs]}
    out["pack 1"] = {"seconds": alone, "cells": len(alone_cfgs), "cells_per_s": len(alone_cfgs) / alone}
    out["speedup"] = out["packed"]["cells_per_s"] / out["pack 1"]["cells_per_s"]
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    print(_load("after"))
    print(f"packed: {len(cfgs)} cells in {packed:.1f} s ({out['packed']['cells_per_s']:.2f} cells/s, packs "
          f"{out['packed']['packs']}); one at a time: {len(alone_cfgs)} cells in {alone:.1f} s "
          f"({out['pack 1']['cells_per_s']:.2f} cells/s); packed / one at a time: {out['speedup']:.1f}×")
    return out


def mixed_mode(args: argparse.Namespace) -> dict:
    """One pack of single- and two-pass cells against the same cells in two packs, one per kind."""
    from align.optim import optimizer_info
    from align.train.loop import train_pack

    data = _synthetic_data(args)
    times = {}
    for label in ("mixed", "separate"):
        with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
            cfgs = _synthetic_configs(args, Path(tmp))
            kinds = [[c for c in cfgs if optimizer_info(c.optim.name).two_pass == two] for two in (True, False)]
            packs = [cfgs] if label == "mixed" else [k for k in kinds if k]
            t = time.perf_counter()
            for p in packs:
                train_pack(p, [Path(c.out_dir) for c in p], progress=False, data=data)
            times[label] = time.perf_counter() - t
    print(f"{args.heads} cells, single- and two-pass heads in one pack: {times['mixed']:.1f} s; in a pack per kind: "
          f"{times['separate']:.1f} s ({times['mixed'] / times['separate']:.2f}× the time)")
    return {"mixed_s": times["mixed"], "separate_s": times["separate"]}


def step_mode(args: argparse.Namespace) -> dict:
    """One optimizer step of a pack of 1 against a pack of ``--heads`` M-SAM heads of the default study's shape
    (1280 → ``--dim`` and 384 → ``--dim`` at ``--batch``), on one thread: ms per head-step and the matmul rate
    it implies (2 passes of forward and weight-gradient matmuls; the rest is elementwise), the ceiling of what
    packing can gain on a CPU."""
    import torch

    from align.train.heads import HeadConfig, build_model
    from align.train.losses import LossConfig
    from align.optim.batched import head_hparams
    from align.train.pack import HeadPack

    torch.set_num_threads(1)
    from align.common.device import keep_freed_memory

    keep_freed_memory()
    x, y = torch.randn(args.batch, 1280), torch.randn(args.batch, 384)
    flops = 2 * 2 * 2 * args.batch * (1280 + 384) * args.dim  # passes × (forward + weight gradient) × 2 per MAC
    out = {}
    for k in (1, args.heads):
        models = []
        for seed in range(k):
            torch.manual_seed(seed)
            models.append(build_model(HeadConfig(out_dim=args.dim), LossConfig(), 1280, 384))
        pack = HeadPack(models, [head_hparams("msam", lr=3e-3, rho=0.05, base="adamw")] * k, ["open_clip"] * k)
        for _ in range(3):
            pack.step([(slice(0, k), x, y)], [3e-3] * k)
        t = time.perf_counter()
        for _ in range(args.steps):
            pack.step([(slice(0, k), x, y)], [3e-3] * k)
        per_head = (time.perf_counter() - t) / args.steps / k
        bare = _bare_matmuls(k, args.batch, args.dim, args.steps)
        out[k] = {"ms_per_head_step": 1000 * per_head, "matmul_gflops": flops / per_head / 1e9,
                  "bare_matmul_ms_per_head_step": 1000 * bare, "bare_matmul_gflops": flops / bare / 1e9}
        print(f"pack of {k}: {1000 * per_head:.1f} ms per head-step, {flops / per_head / 1e9:.0f} GFLOP/s of matmul "
              f"work; its matmuls alone: {1000 * bare:.1f} ms per head-step ({flops / bare / 1e9:.0f} GFLOP/s), "
              f"the rest {1000 * (per_head - bare):.1f} ms", flush=True)
    a = torch.randn(2048, 2048)
    a @ a
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    peak = 2 * 2048 ** 3 * 5 / (time.perf_counter() - t) / 1e9
    ceiling = flops / (peak * 1e9) * 1000  # ms per head-step if every FLOP ran at the sgemm rate
    print(f"packed / alone: {out[1]['ms_per_head_step'] / out[args.heads]['ms_per_head_step']:.2f}× per head-step; "
          f"a 2048³ sgemm runs at {peak:.0f} GFLOP/s on this thread, so no step can beat {ceiling:.1f} ms per "
          f"head (alone / that: {out[1]['ms_per_head_step'] / ceiling:.2f}×)")
    return {"step": out, "sgemm_gflops": peak, "ms_per_head_step_at_sgemm_peak": ceiling}


def _bare_matmuls(k: int, batch: int, dim: int, steps: int) -> float:
    """Seconds per head-step of a linear pack's matmuls and nothing else: both passes' forward products and
    weight gradients of both sides, shaped as the pack computes them (k heads' weights side by side, one shared
    batch). What is left of a step's time beyond this is what packing can amortise."""
    import torch

    sides = [(torch.randn(batch, width), torch.randn(k * dim, width), torch.randn(batch, k * dim),
              torch.empty(k * dim, width)) for width in (1280, 384)]

    def step() -> None:
        for _ in range(2):  # the SAM family's two passes
            for x, w, gy, gw in sides:
                x @ w.T
                torch.mm(gy.T, x, out=gw)

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="study YAML or packaged name (default: compare/default)")
    parser.add_argument("--set", action="append", default=[], help="override a study key, e.g. grid.seeds=[0]")
    parser.add_argument("--memory-budget", default=None)
    parser.add_argument("--synthetic", action="store_true", help="random embeddings in memory instead of a study")
    parser.add_argument("--mixed", action="store_true", help="also time mixed against separate packs (synthetic)")
    parser.add_argument("--step", action="store_true", help="only time one packed step against one alone (CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--alone", type=int, default=8, help="cells timed one at a time in --synthetic mode")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--json", default=None, help="write the figures here (default: $OUT/bench_study.json if set)")
    args = parser.parse_args()

    import torch

    from align.common.device import pick_device

    args.device = str(pick_device(args.device))
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads", flush=True)
    if args.step:
        out = step_mode(args)
    else:
        out = synthetic_mode(args) if args.synthetic else study_mode(args)
    if args.mixed:
        out["mixed"] = mixed_mode(args)
    target = args.json or (str(Path(os.environ["OUT"]) / "bench_study.json") if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
