"""Embedding benchmark: our pipeline vs a plain open_clip loop, and loading a cache vs re-encoding it.

    .venv/bin/python bench/bench_embed.py [--images 192] [--batch-size 32] [--repeats 2]

1. Throughput of ``align.cache.embed_split`` (dataset → DataLoader → encoders → shards → final arrays, manifest,
   checksums) against a plain loop of open_clip ``encode_image`` / ``encode_text`` over the same images and
   captions, same random ViT-S-32 weights, same batch size (goal ≥ 0.95×). Runs alternate and the best of each
   is kept, so a busy machine hurts both sides alike.
2. Loading the finished cache (``load_split`` → float32 PairedEmbeddings) against re-encoding it (goal ≥ 100×).
Both ratios are measured side by side in this one run.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def plain_loop(data, batch_size: int) -> tuple[float, torch.Tensor]:
    """What a user would write: open_clip's model, transform and tokenizer, batched encode calls."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32")
    tokenizer = open_clip.get_tokenizer("ViT-S-32")
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        images = [model.encode_image(torch.stack([preprocess(data.load_image(i))
                                                  for i in range(s, min(s + batch_size, len(data)))]))
                  for s in range(0, len(data), batch_size)]
        for s in range(0, len(data.captions), batch_size):
            model.encode_text(tokenizer(data.captions[s:s + batch_size]))
    return time.perf_counter() - start, torch.cat(images)


def pipeline(cfg, root: Path) -> float:
    from align.cache import embed_split

    shutil.rmtree(root, ignore_errors=True)
    cfg = cfg.model_copy(update={"cache_root": str(root)})
    start = time.perf_counter()
    embed_split(cfg, "train", progress=False, log=lambda _m: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" is expected here

    from align.cache import EmbedConfig, load_split
    from align.datasets import load_split as load_data

    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    cfg = EmbedConfig.model_validate({
        "dataset": {"kind": "synthetic", "synthetic": {"train_images": args.images, "captions_per_image": 1}},
        "splits": ["train"],
        "image_encoder": {"backend": "open_clip", "model": "ViT-S-32"},  # random weights, seed 0 (as the loop)
        "text_encoder": {"backend": "open_clip", "model": "ViT-S-32"},
        "batch_size": args.batch_size, "shard_size": 512, "device": "cpu", "cache_root": str(tmp / "cache")})
    data = load_data(cfg.dataset, "train")
    n_img, n_cap = len(data), len(data.captions)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; random ViT-S-32; {n_img} images "
          f"(synthetic, 128 px → 224 px) + {n_cap} captions; batch {args.batch_size}")

    plain_times, ours_times, reference = [], [], None
    for r in range(args.repeats):  # alternate, so background load hits both sides alike
        seconds, reference = plain_loop(data, args.batch_size)
        plain_times.append(seconds)
        ours_times.append(pipeline(cfg, tmp / "cache"))
        print(f"  repeat {r + 1}: plain loop {plain_times[-1]:.2f} s, align pipeline {ours_times[-1]:.2f} s")
    plain, ours = min(plain_times), min(ours_times)
    paired = load_split(cfg, "train")
    max_diff = float((paired.image - reference).abs().max())

    loads = []
    for _ in range(20):
        start = time.perf_counter()
        loaded = load_split(cfg, "train")
        loads.append(time.perf_counter() - start)
    load = min(loads)

    print()
    print(f"{'':44s}{'seconds':>10s}{'items/s':>10s}")
    print(f"{'plain open_clip encode_image/encode_text loop':44s}{plain:10.2f}{(n_img + n_cap) / plain:10.1f}")
    print(f"{'align embed_split (shards, manifest, sha256)':44s}{ours:10.2f}{(n_img + n_cap) / ours:10.1f}")
    print(f"{'align load_split of the finished cache':44s}{load:10.4f}{(n_img + n_cap) / load:10.0f}")
    print()
    print(f"pipeline throughput / plain loop: {plain / ours:.3f}x   (goal >= 0.95x)")
    print(f"load cached / re-encode:          {plain / load:.0f}x   (goal >= 100x)")
    print(f"max |cached - plain| image embedding: {max_diff:.2e} (same weights, same inputs)")
    print(f"cached shapes: image {tuple(loaded.image.shape)}, text {tuple(loaded.text.shape)}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
