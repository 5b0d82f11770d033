"""Embedding benchmark: our pipeline vs a plain open_clip loop, and loading a cache vs re-encoding it.

    .venv/bin/python bench/bench_embed.py [--images 128] [--batch-size 32] [--repeats 3]

1. Throughput of ``align.cache.embed_split`` (dataset → DataLoader → encoders → shards → final arrays, manifest,
   checksums) against a plain loop of open_clip ``encode_image`` / ``encode_text`` over the same images and
   captions, same random ViT-S-32 weights, same batch size, models loaded beforehand on both sides (goal ≥ 0.95×).
   Runs alternate and the best of each is kept, so a busy machine hurts both sides alike.
2. Loading the finished cache (``load_cached_split`` → float32 PairedEmbeddings) against re-encoding it
   (goal ≥ 100×).
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


def plain_model():
    """What a user would write: open_clip's model, transform and tokenizer (same seed-0 random weights as ours)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32")
    return model.eval(), preprocess, open_clip.get_tokenizer("ViT-S-32")


def plain_loop(data, batch_size: int, built) -> tuple[tuple[float, float], torch.Tensor]:
    """Batched encode_image over the images, then encode_text over the captions (model already built)."""
    model, preprocess, tokenizer = built
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        images = [model.encode_image(torch.stack([preprocess(data.load_image(i))
                                                  for i in range(s, min(s + batch_size, len(data)))]))
                  for s in range(0, len(data), batch_size)]
        for s in range(0, len(data.captions), batch_size):
            model.encode_text(tokenizer(data.captions[s:s + batch_size]))
    return (time.perf_counter() - start, time.process_time() - cpu), torch.cat(images)


def pipeline(cfg, root: Path) -> tuple[float, float]:
    """embed_split from scratch: dataset, DataLoader, both towers, shards, final arrays, manifest, checksums.
    The model itself is already loaded (the encoders keep the last built ones), as in the plain loop."""
    from align.cache.write import embed_split

    shutil.rmtree(root, ignore_errors=True)
    cfg = cfg.model_copy(update={"cache_root": str(root)})
    start, cpu = time.perf_counter(), time.process_time()
    embed_split(cfg, "train", progress=False, log=lambda _m: None)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" is expected here

    from align.cache.key import EmbedConfig
    from align.cache.read import load_cached_split
    from align.data.datasets import load_image_caption_split as load_data

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

    from align.data.encoders import build_image_encoder, build_text_encoder

    built = plain_model()
    build_image_encoder(cfg.image_encoder, "cpu"), build_text_encoder(cfg.text_encoder, "cpu")  # load once
    plain_times, ours_times, reference = [], [], None
    for r in range(args.repeats):  # alternate, so background load hits both sides alike
        seconds, reference = plain_loop(data, args.batch_size, built)
        plain_times.append(seconds)
        ours_times.append(pipeline(cfg, tmp / "cache"))
        print(f"  repeat {r + 1}: plain loop {plain_times[-1][0]:.2f} s ({plain_times[-1][1]:.2f} s CPU), "
              f"align pipeline {ours_times[-1][0]:.2f} s ({ours_times[-1][1]:.2f} s CPU)")
    plain, ours = min(t[0] for t in plain_times), min(t[0] for t in ours_times)
    plain_cpu, ours_cpu = min(t[1] for t in plain_times), min(t[1] for t in ours_times)
    paired = load_cached_split(cfg, "train")
    max_diff = float((paired.image - reference).abs().max())

    loads = []
    for _ in range(20):
        start = time.perf_counter()
        loaded = load_cached_split(cfg, "train")
        loads.append(time.perf_counter() - start)
    load = min(loads)

    print()
    print(f"{'':44s}{'seconds':>10s}{'items/s':>10s}")
    print(f"{'plain open_clip encode_image/encode_text loop':44s}{plain:10.2f}{(n_img + n_cap) / plain:10.1f}")
    print(f"{'align embed_split (shards, manifest, sha256)':44s}{ours:10.2f}{(n_img + n_cap) / ours:10.1f}")
    print(f"{'align load_cached_split of the finished cache':44s}{load:10.4f}{(n_img + n_cap) / load:10.0f}")
    print()
    print(f"pipeline throughput / plain loop: {plain / ours:.3f}x wall, {plain_cpu / ours_cpu:.3f}x CPU time "
          f"(goal >= 0.95x)")
    print(f"load cached / re-encode:          {plain / load:.0f}x   (goal >= 100x)")
    print(f"max |cached - plain| image embedding: {max_diff:.2e} (same weights, same inputs)")
    print(f"cached shapes: image {tuple(loaded.image.shape)}, text {tuple(loaded.text.shape)}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
