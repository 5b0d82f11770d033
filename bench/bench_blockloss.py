"""Peak anonymous memory and step time of one training step with the contrastive loss in row blocks vs whole.

    .venv/bin/python bench/bench_blockloss.py                                  # 4,096, 16,384 and 32,768
    .venv/bin/python bench/bench_blockloss.py --batches 8192 --optimizers msam --steps 3

Each measurement is its own process, run under /work/shared/tools/peakanon.py (RssAnon summed over the process
tree, sampled every 0.2 s), so one configuration's allocations never count in another's. A process builds a
synthetic in-memory batch of B paired 512-d float32 embeddings (the batch as the trainer holds it; reading it from
a cache is the data path's business, not measured here), one linear head to 256-d, and takes ``--steps`` steps of
``align.train.pack.HeadPack`` exactly as ``align train`` does (AdamW: one pass; M-SAM: two); the time reported is
the median of all steps but the first. "blocks" is the automatic block size of ``loss.block_rows`` (``align.train.blockwise``: the
whole B × B while one head's float32 logits fit 256 MiB, so at 4,096 blocks of B / 4 are forced to show their
cost), "whole" is the plain B × B loss (``loss.block_rows`` = B), skipped where the memory model puts its logits
over ``--whole-limit`` (12 GB). "data" is the same process without a step: Python, torch and the batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from align.optim.batched import head_hparams
from align.train.blockwise import LOGIT_BYTES, loss_block_rows
from align.train.heads import HeadConfig, build_model
from align.train.losses import LossConfig
from align.train.memory import VALUE_BYTES, logits_values
from align.train.pack import HeadPack

PEAKANON = Path("/work/shared/tools/peakanon.py")
EMBED_DIM, OUT_DIM = 512, 256
HPARAMS = {"adamw": {"lr": 1e-3, "weight_decay": 0.1}, "msam": {"lr": 1e-3, "weight_decay": 0.1, "rho": 0.3}}


def block_for(batch: int, mode: str) -> int | None:
    """``loss.block_rows`` of a mode: blocks = automatic (or B / 4 where automatic means whole), whole = B."""
    if mode == "whole":
        return batch
    return None if loss_block_rows(None, batch, batch) is not None else batch // 4


def child(batch: int, optimizer: str, mode: str, steps: int) -> None:
    """One measurement (in its own process): the batch, the head, ``steps`` steps; a JSON line on stdout."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, EMBED_DIM, generator=gen)
    text = 0.5 * image + torch.randn(batch, EMBED_DIM, generator=gen)
    loss = LossConfig(block_rows=block_for(batch, mode))
    torch.manual_seed(0)
    model = build_model(HeadConfig(out_dim=OUT_DIM), loss, EMBED_DIM, EMBED_DIM)
    pack = HeadPack([model], [head_hparams(optimizer, **HPARAMS[optimizer])], [loss.clamp])
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        stats = pack.step([(slice(0, 1), image, text)], [1e-3])
        losses.append(float(stats.loss[0]))
        times.append(time.perf_counter() - start)
    timed = times[1:] or times  # the first step allocates what the others reuse
    print(json.dumps({"step_s": statistics.median(timed) if timed else None, "loss": losses}))


def measure(batch: int, optimizer: str, mode: str, steps: int) -> dict:
    """Run ``child`` under peakanon: its peak anonymous MiB and what it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.txt"
        cmd = [sys.executable, str(PEAKANON), str(out), "--", sys.executable, __file__, "--child", str(batch),
               optimizer, mode, str(steps)]
        rc, tree, _ = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        text = out.read_text()
    if rc != "0":
        return {"error": text.strip().splitlines()[-1] if text.strip() else f"exit {rc}"}
    return {"peak_mib": int(tree), **json.loads(text.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "msam"], choices=sorted(HPARAMS))
    parser.add_argument("--steps", type=int, default=3, help="steps per measurement; all but the first timed")
    parser.add_argument("--whole-limit", type=float, default=12.0, help="GB of whole logits not to try")
    parser.add_argument("--child", nargs=4, metavar=("BATCH", "OPTIMIZER", "MODE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch, optimizer, mode, steps = args.child
        child(int(batch), optimizer, mode, int(steps))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; linear head {EMBED_DIM} → {OUT_DIM}, "
          f"synthetic in-memory batch; peak anonymous memory (MiB) of each process; median time of steps 2–{args.steps}")
    header = (f"{'batch':>6} {'optim':>6} {'mode':>6} {'block':>6} {'model logits MiB':>17} {'peak MiB':>9} "
              f"{'step s':>8} {'loss':>8}")
    print(header)
    for batch in args.batches:
        data = measure(batch, "adamw", "data", 0)
        print(f"{batch:>6} {'-':>6} {'data':>6} {'-':>6} {'-':>17} {data.get('peak_mib', '?'):>9}")
        for optimizer in args.optimizers:
            for mode in ("blocks", "whole"):
                loss = LossConfig(block_rows=block_for(batch, mode))
                block = loss_block_rows(loss.block_rows, batch, batch) or batch
                logits = VALUE_BYTES * logits_values(loss, batch)
                if mode == "whole" and LOGIT_BYTES * 6 * batch * batch > args.whole_limit * 1e9:
                    print(f"{batch:>6} {optimizer:>6} {mode:>6} {block:>6} {logits / 2 ** 20:>17.0f} "
                          f"{'skipped: whole logits over ' + str(args.whole_limit) + ' GB':>9}")
                    continue
                row = measure(batch, optimizer, mode, args.steps)
                if "error" in row:
                    print(f"{batch:>6} {optimizer:>6} {mode:>6} {block:>6} {'':>17} failed: {row['error']}")
                    continue
                print(f"{batch:>6} {optimizer:>6} {mode:>6} {block:>6} {logits / 2 ** 20:>17.0f} "
                      f"{row['peak_mib']:>9} {row['step_s']:>8.2f} {row['loss'][-1]:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
