"""How far one machine goes: peak anonymous memory and step rate of `align train` and `align compare` on caches of
100k to millions of pairs, made through `align cache import`, and of large contrastive batches.

    .venv/bin/python bench/bench_scale.py --scratch /data/scratch                    # 100k, 1M, 4M; batches
    .venv/bin/python bench/bench_scale.py --scratch /data/scratch --sizes 100000 --big 14000000 --orders blocks random
    .venv/bin/python bench/bench_scale.py --scratch /data/s --big 14000000 --prepare --keep   # the big import ahead
    .venv/bin/python bench/bench_scale.py --scratch /data/s --big 14000000 --reuse --batches   # ... then measure

Everything lives under ``--scratch`` (outside the repository) and is deleted at the end (``--keep`` keeps it).
Caches are random 512-d float16 embeddings (val and test 5,000 rows each), written as plain ``.npy`` pairs and
brought in with ``align cache import`` (the raw pair is deleted once imported: a size needs twice its cache's disk
only while it is imported). The --big cache is trained from a cold page cache (emptied first, where this process
may: root), in each of ``--orders``. Each measurement is one `align` process tree, watched from here every 0.2 s:

- memory: peak anonymous memory (``RssAnon`` of /proc/PID/status summed over the process tree, as
  ``../shared/tools/peakanon.py`` measures it), and the largest single process's. The pages of a memory-mapped cache
  count in RSS but the kernel can drop them, so RSS would not say what a run holds;
- speed: training steps per second between the 5th step record of ``metrics.jsonl`` and the last one (start-up,
  loading and the final evaluation excluded).

Training: 30 M-SAM steps at batch 4,096 (linear heads to 256-d, validation only at the end, no sharpness);
compare: 2 workers, AdamW and M-SAM one cell each (``--pack 1``); batches: 4,096, 16,384 and 32,768 on the
smallest cache for AdamW and M-SAM (3 steps each: one step of M-SAM at 32,768 takes minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from anon_memory import anon_kib, process_tree

DIM = 512
EVAL_ROWS = 5000
ALIGN = str(Path(sys.executable).parent / "align")


def watch(cmd: list[str], log: Path, metrics: Path | None = None) -> dict[str, float]:
    """Run ``cmd``; its peak anonymous memory over the tree and of one process (MiB), its wall time, and, given the
    run's ``metrics.jsonl``, its training steps per second after the 5th step."""
    seen: list[tuple[float, int]] = []
    peak_tree = peak_one = 0
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            values = [anon_kib(pid) for pid in process_tree(proc.pid)]
            peak_tree, peak_one = max(peak_tree, sum(values)), max(peak_one, max(values, default=0))
            if metrics is not None and metrics.exists():
                steps = sum(1 for line in metrics.read_text().splitlines() if '"kind": "train"' in line)
                if not seen or steps > seen[-1][1]:
                    seen.append((time.monotonic(), steps))
            time.sleep(0.2)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}): " + " / ".join(tail))
    rate = float("nan")
    late = [(t, s) for t, s in seen if s >= min(5, max(1, seen[-1][1] - 2))] if seen else []
    if len(late) >= 2 and late[-1][1] > late[0][1]:
        rate = (late[-1][1] - late[0][1]) / (late[-1][0] - late[0][0])
    return {"peak_tree_mib": peak_tree / 1024, "peak_one_mib": peak_one / 1024,
            "wall_s": time.monotonic() - start, "steps_per_s": rate}


def random_pair(folder: Path, rows: int, seed: int) -> tuple[Path, Path]:
    """image.npy and text.npy of ``rows`` random unit-norm-ish float16 rows, written in blocks (never whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in ("image", "text"):
        path = folder / f"{name}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, DIM))
        for lo in range(0, rows, 262_144):
            hi = min(rows, lo + 262_144)
            block = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
            out[lo:hi] = block / np.sqrt(DIM)
        out.flush()
        del out
        paths.append(path)
    return paths[0], paths[1]


def existing_cache(scratch: Path, name: str, split: str) -> Path | None:
    """The cache NAME of ``split`` a previous ``--keep`` run left complete (its manifest written last), if any."""
    return next((p for p in (scratch / "cache").glob(f"{name}-{split}-*") if (p / "manifest.json").exists()), None)


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that a run starts with none of a cache's pages in memory."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def import_cache(scratch: Path, name: str, split: str, rows: int, seed: int, reuse: bool = False) -> dict[str, float]:
    """Make a random pair of ``rows`` rows and import it as cache NAME (split ``split``); the raw pair is deleted.
    With ``reuse``, a complete cache of that name left by a previous ``--keep`` run is used as it is."""
    if reuse and existing_cache(scratch, name, split) is not None:
        return {"peak_tree_mib": float("nan"), "peak_one_mib": float("nan"), "wall_s": 0.0,
                "steps_per_s": float("nan")}
    raw = scratch / "raw" / name
    image, text = random_pair(raw, rows, seed)
    cmd = [ALIGN, "cache", "import", "--image", str(image), "--text", str(text), "--name", name, "--split", split,
           "--image-encoder", "random-512", "--text-encoder", "random-512", "--root", str(scratch / "cache"),
           "--no-progress"]
    try:
        return watch(cmd, scratch / f"import-{name}.log")
    finally:
        shutil.rmtree(raw, ignore_errors=True)


def train_config(scratch: Path, train: str, batch: int, steps: int, optimizer: str, order: str) -> dict:
    optim = {"name": optimizer, "lr": 1e-3}
    if optimizer != "adamw":
        optim.update(rho=0.05, base="adamw")
    return {"data": {"caches": {"train": train, "val": "val5k", "test": "test5k"},
                     "cache_root": str(scratch / "cache")},
            "head": {"kind": "linear", "out_dim": 256}, "optim": optim,
            "schedule": {"steps": steps, "batch_size": batch, "warmup_steps": 2, "order": order},
            "eval": {"every": steps, "sharpness": False}, "checkpoint_every": steps, "loss_at_step": steps}


def run_train(scratch: Path, label: str, cfg: dict) -> dict[str, float]:
    folder = scratch / "runs" / label
    shutil.rmtree(folder, ignore_errors=True)
    path = scratch / f"{label}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [ALIGN, "train", "--config", str(path), "--out", str(folder), "--no-progress"]
    return watch(cmd, scratch / f"{label}.log", folder / "metrics.jsonl")


def run_compare(scratch: Path, label: str, train: str, steps: int, order: str) -> dict[str, float]:
    cfg = train_config(scratch, train, 4096, steps, "msam", order)
    study = {"name": label, "data": cfg["data"], "head": cfg["head"], "schedule": cfg["schedule"],
             "eval": cfg["eval"], "workers": 2, "reference": "adamw",
             "grid": {"optimizers": ["adamw", "msam"], "lrs": [1e-3], "rhos": [0.05], "seeds": [0]}}
    path = scratch / f"{label}.yaml"
    path.write_text(yaml.safe_dump(study))
    folder = scratch / "studies" / label
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [ALIGN, "compare", "--config", str(path), "--out", str(folder), "--pack", "1", "--no-progress"]
    return watch(cmd, scratch / f"{label}.log")


def row(label: str, m: dict[str, float]) -> str:
    return (f"| {label} | {m['peak_tree_mib']:,.0f} | {m['peak_one_mib']:,.0f} | "
            f"{m['steps_per_s']:.3f} | {m['wall_s']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scratch", type=Path, required=True, help="a folder outside the repository, emptied at the end")
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000, 4_000_000])
    ap.add_argument("--big", type=int, default=0, help="also a cache of this many pairs (e.g. larger than RAM)")
    ap.add_argument("--batches", type=int, nargs="*", default=[4096, 16384, 32768])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--orders", nargs="+", choices=["random", "blocks"], default=["random"],
                    help="the orders the --big run is trained in, each from a cold page cache where it can be emptied")
    ap.add_argument("--compare-on", type=int, default=0, help="the size the 2-worker compare runs on (default: largest)")
    ap.add_argument("--prepare", action="store_true", help="only import the val/test and --big caches (with --keep)")
    ap.add_argument("--reuse", action="store_true", help="use caches a previous --keep run left instead of importing")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    lines = ["| what | peak anon, tree (MiB) | one process (MiB) | steps/s | wall (s) |", "|---|---|---|---|---|"]
    try:
        for name, split, seed in (("val5k", "val", 1), ("test5k", "test", 2)):
            import_cache(scratch, name, split, EVAL_ROWS, seed, args.reuse)
        if args.prepare:
            if args.big:
                lines.append(row(f"import {args.big:,} pairs", import_cache(scratch, f"s{args.big}", "train",
                                                                            args.big, 11, args.reuse)))
            return
        sizes = sorted(args.sizes)
        compare_on = args.compare_on or (sizes[-1] if sizes else 0)
        for n in sizes:
            lines += measure_size(scratch, n, args, first=n == sizes[0], compare=n == compare_on)
            if n != sizes[-1] or args.big:
                shutil.rmtree(existing_cache(scratch, f"s{n}", "train") or scratch / "none", ignore_errors=True)
            print("\n".join(lines), flush=True)
        if args.big:
            lines += measure_big(scratch, args)
    finally:
        print("\n".join(lines), flush=True)
        (scratch.parent / f"{scratch.name}-results.json").write_text(json.dumps(lines))
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


def measure_size(scratch: Path, n: int, args: argparse.Namespace, first: bool, compare: bool) -> list[str]:
    """Import ``n`` pairs and train on them (at batch 4,096; the batch sizes on the first; the 2-worker compare)."""
    name, lines = f"s{n}", []
    lines.append(row(f"import {n:,} pairs", import_cache(scratch, name, "train", n, 10, args.reuse)))
    lines.append(row(f"train {n:,} pairs, M-SAM, batch 4,096",
                     run_train(scratch, f"train-{n}", train_config(scratch, name, 4096, args.steps, "msam", "random"))))
    if first:
        for batch in args.batches:
            for opt in ("adamw", "msam"):
                lines.append(row(f"train {n:,} pairs, {opt}, batch {batch:,} (3 steps)",
                                 run_train(scratch, f"batch-{batch}-{opt}",
                                           train_config(scratch, name, batch, 3, opt, "random"))))
    if compare:
        lines.append(row(f"compare {n:,} pairs, 2 workers (tree: all; one: the largest process)",
                         run_compare(scratch, f"compare-{n}", name, args.steps, "random")))
    return lines


def measure_big(scratch: Path, args: argparse.Namespace) -> list[str]:
    """Import (or reuse) the --big cache and train on it in each of ``--orders``, from a cold page cache."""
    name = f"s{args.big}"
    lines = [row(f"import {args.big:,} pairs", import_cache(scratch, name, "train", args.big, 11, args.reuse))]
    for order in args.orders:
        cold = "cold page cache" if drop_page_cache() else "page cache not emptied"
        lines.append(row(f"train {args.big:,} pairs, M-SAM, batch 4,096, {order} order ({cold})",
                         run_train(scratch, f"train-{args.big}-{order}",
                                   train_config(scratch, name, 4096, args.steps, "msam", order))))
        print("\n".join(lines), flush=True)
    return lines


if __name__ == "__main__":
    main()
