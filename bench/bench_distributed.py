"""Throughput of `align embed`, `align compare` and (when data-parallel training is there) `align train` at 1 and 2
ranks on this machine: one row per configuration, each command run as a user runs it.

    .venv/bin/python bench/bench_distributed.py                 # ≈ 5 min on 2 cores
    .venv/bin/python bench/bench_distributed.py --images 512 --cells 6   # quicker look

1 rank is the plain command (`align embed ...`); 2 ranks is `torchrun --standalone --nproc-per-node 2 --no-python
align embed ...` (gloo on CPU, nccl on CUDA: ``--device``). The encoders are a tiny random open_clip model (no
download), the data the built-in synthetic set. Each configuration is run twice into the same folder: the first
run does the work; the second finds it done (cached embeddings, finished cells) and measures what is not work:
interpreter and library start-up, the rendezvous, cache checks, the report. ``work s`` = first − second, and the
throughput is items / work s. ``wall s`` is the first run's whole time, start-up included.

- embed: images + captions of the three splits (shards of 64 rows dealt out to the ranks) per second;
- compare: cells (AdamW, SAM, M-SAM × lrs × seeds) per second, packs dealt out to the ranks (1 worker each);
- train: `align train` steps per second at one global batch split across the ranks; measured only when this
  checkout has data-parallel training (``optim.perturbation``), else the row says so.

The byte identity of 1 and 2 ranks (cache arrays, results.csv) is checked too. The load average is printed: on a
machine shared with other work the 1- and 2-rank figures are only comparable under the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = {"embed_dim": 64,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
ARRAYS = ("image.npy", "text.npy", "caption_to_image.npy", "image_rows.npy", "caption_rows.npy")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def tiny_clip(folder: Path) -> Path:
    """A random open_clip model saved as local-dir (the tests' helper, a little larger)."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in CLIP(**TINY_CFG).state_dict().items()},
              folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    return folder


def study_config(args: argparse.Namespace, model: Path, root: Path) -> dict:
    encoder = {"backend": "open_clip", "model": f"local-dir:{model}"}
    lrs = [0.003, 0.01, 0.03][:max(1, args.cells // 6)]
    return {
        "name": "bench", "workers": 1, "reference": "sam",
        "data": {"dataset": {"kind": "synthetic", "synthetic": {"train_images": args.images, "val_images": 128,
                                                                "test_images": 128, "image_size": 64,
                                                                "captions_per_image": 2}},
                 "splits": ["train", "val", "test"], "image_encoder": encoder, "text_encoder": encoder,
                 "batch_size": 64, "shard_size": 64, "device": args.device, "cache_root": str(root / "cache")},
        "head": {"kind": "linear", "out_dim": 64},
        "optim": {"base": "adamw"},
        "schedule": {"steps": args.steps, "batch_size": 64, "warmup_steps": 10},
        "eval": {"every": args.steps // 2, "sharpness_batches": 1, "hessian_iters": 2, "hutchinson_samples": 2,
                 "sharpness_ascent_steps": 1},
        "loss_at_step": args.steps // 2, "checkpoint_every": args.steps // 2, "device": args.device,
        "grid": {"optimizers": ["adamw", "sam", "msam"], "lrs": lrs, "rhos": [0.05], "seeds": [0, 1]},
    }


def command(ranks: int, *args: str) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "align.cli.main", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "--no-python", "align", *args]


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds


def twice(cmd: list[str]) -> dict:
    """The command run to do the work, then again to find it done: {wall_s, baseline_s, work_s}."""
    wall = timed(cmd)
    baseline = timed(cmd)
    return {"wall_s": wall, "baseline_s": baseline, "work_s": max(wall - baseline, 1e-9)}


def embed_rows(args: argparse.Namespace, config: Path, root: Path) -> list[dict]:
    rows, caches = [], {}
    items = (args.images + 2 * 128) * 3  # images and their 2 captions each: train, val and test splits
    for ranks in (1, 2):
        cache = root / f"cache-{ranks}"
        print(f"embed, {ranks} rank(s): {_load()}", flush=True)
        t = twice(command(ranks, "embed", "--config", str(config), "--set", f"data.cache_root={cache}",
                          "--no-progress"))
        caches[ranks] = cache
        rows.append({"kind": "embed", "ranks": ranks, **t, "items": items, "unit": "images+captions/s",
                     "per_s": items / t["work_s"]})
    same = all((caches[1] / k.name / n).read_bytes() == (caches[2] / k.name / n).read_bytes()
               for k in caches[1].iterdir() for n in ARRAYS)
    rows[-1]["identical_to_1_rank"] = same
    return rows


def compare_rows(args: argparse.Namespace, config: Path, root: Path, cells: int) -> list[dict]:
    rows, outs = [], {}
    for ranks in (1, 2):
        out = root / f"study-{ranks}"
        print(f"compare, {ranks} rank(s): {_load()}", flush=True)
        t = twice(command(ranks, "compare", "--config", str(config), "--set", f"data.cache_root={root / 'cache-1'}",
                          "--out", str(out), "--no-progress"))
        outs[ranks] = out
        rows.append({"kind": "compare", "ranks": ranks, **t, "items": cells, "unit": "cells/s",
                     "per_s": cells / t["work_s"]})
    rows[-1]["identical_to_1_rank"] = (outs[1] / "results.csv").read_bytes() == (outs[2] / "results.csv").read_bytes()
    return rows


def train_rows(args: argparse.Namespace, config: dict, root: Path) -> list[dict]:
    """`align train` of one head at 1 and 2 ranks (the same global batch), if this checkout can."""
    from align.train.config import OptimConfig

    if "perturbation" not in OptimConfig.model_fields:
        return [{"kind": "train", "ranks": ranks, "note": "data-parallel `align train` is not in this checkout: "
                 "the compare rows measure training throughput instead"} for ranks in (1, 2)]
    train = {k: v for k, v in config.items() if k not in ("name", "workers", "reference", "grid")}
    train["data"] = dict(train["data"], cache_root=str(root / "cache-1"))
    train.update(optim={"name": "msam", "lr": 0.01, "rho": 0.05}, schedule=dict(train["schedule"], batch_size=256))
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(train))
    rows = []
    for ranks in (1, 2):
        run = root / f"train-{ranks}"
        print(f"train, {ranks} rank(s): {_load()}", flush=True)
        wall = timed(command(ranks, "train", "--config", str(path), "--out", str(run), "--no-progress"))
        inside = json.loads((run / "results.json").read_text())["wall_time_s"]
        rows.append({"kind": "train", "ranks": ranks, "wall_s": wall, "work_s": inside, "items": args.steps,
                     "unit": "steps/s (batch 256)", "per_s": args.steps / inside})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="training images (2 captions each)")
    parser.add_argument("--cells", type=int, default=12, help="study cells: 6 per learning rate (1 to 3 lrs)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the rows here (default: $OUT/bench_distributed.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        root = Path(tmp)
        cfg = study_config(args, tiny_clip(root / "tiny-clip"), root)
        config = root / "study.yaml"
        config.write_text(yaml.safe_dump(cfg))
        cells = 6 * len(cfg["grid"]["lrs"])
        rows = embed_rows(args, config, root) + compare_rows(args, config, root, cells) + train_rows(args, cfg, root)
        shutil.rmtree(root / "cache-2", ignore_errors=True)
    print(f"\nafter: {_load()}")
    print(f"{'kind':8} {'ranks':>5} {'wall s':>7} {'start s':>7} {'work s':>7} {'items':>6}  throughput")
    for r in rows:
        if "note" in r:
            print(f"{r['kind']:8} {r['ranks']:>5}  {r['note']}")
            continue
        same = {True: ", identical to 1 rank", False: ", DIFFERENT from 1 rank"}.get(r.get("identical_to_1_rank"), "")
        print(f"{r['kind']:8} {r['ranks']:>5} {r['wall_s']:7.1f} {r.get('baseline_s', float('nan')):7.1f} "
              f"{r['work_s']:7.1f} {r['items']:6d}  {r['per_s']:.2f} {r['unit']}{same}")
    target = args.json or (str(Path(os.environ["OUT"]) / "bench_distributed.json") if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
