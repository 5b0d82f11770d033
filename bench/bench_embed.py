"""Embedding benchmark: our pipeline vs a plain open_clip loop, loading a cache vs re-encoding it, and webdataset
tar shards vs an image folder.

    .venv/bin/python bench/bench_embed.py [--images 128] [--batch-size 32] [--repeats 3] [--part all]

1. Throughput of ``align.cache.embed_split`` (dataset → DataLoader → encoders → shards → final arrays, manifest,
   checksums) against a plain loop of open_clip ``encode_image`` / ``encode_text`` over the same images and
   captions, same random ViT-S-32 weights, same batch size, models loaded beforehand on both sides (goal ≥ 0.95×).
   Runs alternate and the best of each is kept, so a busy machine hurts both sides alike.
2. Loading the finished cache (``load_cached_split`` → float32 PairedEmbeddings) against re-encoding it
   (goal ≥ 100×).
Both ratios are measured side by side in this one run.
3. (``--part webdataset``) The same ``--wds-images`` (2,000) synthetic JPEGs written by the benchmark as tar
   shards (img2dataset's layout) and as an image folder, embedded with one fixed tiny encoder: throughput
   webdataset / imagefolder (goal >= 0.95x, alternating, best of ``--repeats``); the peak anonymous memory of
   embedding 10x as many samples from tars against the 2,000 (goal <= 1.2x: nothing grows with N); and what a
   CLIP ViT-B-32 embed costs per 1,000 images on this CPU (``--cost-images``), scaled to CC3M. About 5 minutes.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from anon_memory import anon_kib, process_tree  # noqa: E402  (bench/ is on sys.path: the script's folder)


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
    parser.add_argument("--part", choices=["all", "pipeline", "webdataset"], default="all")
    parser.add_argument("--wds-images", type=int, default=2000)
    parser.add_argument("--cost-images", type=int, default=256)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" is expected here
    if args.part in ("all", "pipeline"):
        bench_pipeline(args)
    if args.part in ("all", "webdataset"):
        tmp = Path(tempfile.mkdtemp(prefix="bench-wds-"))
        try:
            bench_webdataset(args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def bench_pipeline(args: argparse.Namespace) -> None:
    """Sections 1 and 2: the pipeline against a plain loop, and loading against re-encoding."""
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
    max_diff = float((paired.image.to_tensor() - reference).abs().max())

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


# -- webdataset tar shards against an image folder of the same images ----------------------------------------

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PER_TAR = 1000  # samples per tar shard (img2dataset writes 10,000)


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random open_clip model as local-dir: the fixed encoder of both sides, cheap enough that reading and
    decoding the images dominate (the harshest case for the tar reader)."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = CLIP(**TINY_CLIP).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    return folder


def jpeg_samples(n: int) -> list[tuple[bytes, str]]:
    """``n`` synthetic 128 px images as JPEG bytes (quality 95, as img2dataset writes) with one caption each."""
    from align.data import synthetic as synth
    from align.data.synthetic import SyntheticConfig

    cfg = SyntheticConfig(train_images=n, captions_per_image=1)
    plan = synth.plan_split(cfg, "train", None)
    out = []
    for i, attributes in enumerate(plan.attributes):
        buf = io.BytesIO()
        synth.draw(cfg, "train", i, attributes).save(buf, "JPEG", quality=95)
        out.append((buf.getvalue(), plan.captions[i][0]))
    return out


def write_tars(folder: Path, samples: list[tuple[bytes, str]], total: int) -> str:
    """``total`` samples (cycling through ``samples``, each with its own key) as img2dataset's layout:
    KEY.jpg, KEY.txt, KEY.json in tars of PER_TAR → the brace pattern naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    tars = -(-total // PER_TAR)
    for t in range(tars):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(t * PER_TAR, min(total, (t + 1) * PER_TAR)):
                jpg, caption = samples[i % len(samples)]
                key = f"{t:05d}{i % PER_TAR:04d}"
                for ext, data in (("jpg", jpg), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": key, "caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{tars - 1:05d}}}.tar")


def write_folder(folder: Path, samples: list[tuple[bytes, str]]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (jpg, caption) in enumerate(samples):
        (folder / f"{i:06d}.jpg").write_bytes(jpg)
        rows.append(json.dumps({"file_name": f"{i:06d}.jpg", "caption": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return str(folder)


def peak_anon_mib(command: list[str], log: Path, env: dict[str, str]) -> tuple[int, float]:
    """Run ``command`` → (exit code, peak RssAnon of its process tree in MiB), sampled every 0.2 s
    (/work/shared/tools/peakanon.py's measure: anonymous memory, not the page cache of mapped files)."""
    peak = 0
    with open(log, "w") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            peak = max(peak, sum(anon_kib(q) for q in process_tree(proc.pid)))
            time.sleep(0.2)
    return proc.returncode, peak / 1024


def bench_webdataset(args: argparse.Namespace, tmp: Path) -> None:
    """Throughput of webdataset against imagefolder on the same images (tiny fixed encoder), the peak anonymous
    memory of a 10× larger webdataset embed, and the cost per 1,000 images of a CLIP-sized encoder (ViT-B-32)."""
    from align.cache.key import EmbedConfig
    from align.cache.write import embed_split

    samples = jpeg_samples(args.wds_images)
    tiny = {"backend": "open_clip", "model": f"local-dir:{save_tiny_clip(tmp / 'tiny')}"}
    base = {"splits": ["train"], "image_encoder": tiny, "text_encoder": tiny, "batch_size": 64, "device": "cpu"}
    datasets = {"imagefolder": {"kind": "imagefolder", "path": write_folder(tmp / "folder", samples)},
                "webdataset": {"kind": "webdataset", "shards": write_tars(tmp / "tars", samples, len(samples))}}
    print(f"\nwebdataset vs imagefolder: {len(samples)} synthetic 128 px JPEGs + 1 caption each, tiny random CLIP "
          f"(32 px input) on both sides, tars of {PER_TAR}, num_workers 0 (the default: the tars are read one block "
          f"ahead by a background thread, the folder's files as the encoder needs them), 1 torch thread")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in datasets}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: OpenMP's waits on a shared machine would swamp the reading cost compared
    for r in range(args.repeats):
        for name, dataset in datasets.items():  # alternate, so background load hits both sides alike
            shutil.rmtree(tmp / f"cache-{name}", ignore_errors=True)
            cfg = EmbedConfig.model_validate({**base, "dataset": dataset, "cache_root": str(tmp / f"cache-{name}")})
            start, cpu = time.perf_counter(), time.process_time()
            embed_split(cfg, "train", progress=False, log=lambda _m: None)
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
        print(f"  repeat {r + 1}: "
              + ", ".join(f"{n} {t[-1][0]:.2f} s ({t[-1][1]:.2f} s CPU)" for n, t in times.items()))
    torch.set_num_threads(threads)
    same = all((next((tmp / "cache-imagefolder").iterdir()) / a).read_bytes()
               == (next((tmp / "cache-webdataset").iterdir()) / a).read_bytes() for a in ("image.npy", "text.npy"))
    wall = {n: min(w for w, _ in t) for n, t in times.items()}
    cpu = {n: min(c for _, c in t) for n, t in times.items()}
    print(f"  throughput webdataset / imagefolder (best of {args.repeats}): "
          f"{wall['imagefolder'] / wall['webdataset']:.3f}x wall, "
          f"{cpu['imagefolder'] / cpu['webdataset']:.3f}x CPU time (goal >= 0.95x); "
          f"{len(samples) / wall['webdataset']:.0f} vs {len(samples) / wall['imagefolder']:.0f} images/s; "
          f"image.npy and text.npy byte-identical: {same}")

    peaks = {}
    for n in (len(samples), 10 * len(samples)):
        pattern = write_tars(tmp / f"tars-{n}", samples, n)
        config = tmp / f"mem-{n}.yaml"
        config.write_text(json.dumps({**base, "dataset": {"kind": "webdataset", "shards": pattern},
                                      "cache_root": str(tmp / f"cache-mem-{n}")}))
        code, peaks[n] = peak_anon_mib([sys.executable, "-m", "align.cli.main", "embed", "--config", str(config),
                                        "--no-progress"], tmp / f"mem-{n}.log", dict(os.environ, OMP_NUM_THREADS="1"))
        assert code == 0, (tmp / f"mem-{n}.log").read_text()[-2000:]
        shutil.rmtree(tmp / f"tars-{n}")
    small, large = sorted(peaks)
    print(f"  peak anonymous memory (RssAnon over the process tree), webdataset embed: {small} samples "
          f"{peaks[small]:.0f} MiB, {large} samples {peaks[large]:.0f} MiB: {peaks[large] / peaks[small]:.3f}x "
          f"(goal <= 1.2x)")

    n = args.cost_images
    vit = {"backend": "open_clip", "model": "ViT-B-32"}  # random weights: the compute of CLIP ViT-B/32
    cfg = EmbedConfig.model_validate({**base, "image_encoder": vit, "text_encoder": vit,
                                      "cache_root": str(tmp / "cost"), "dataset": {"kind": "webdataset",
                                                  "shards": write_tars(tmp / "tars-cost", samples[:n], n)}})
    from align.data.encoders import build_image_encoder, build_text_encoder

    build_image_encoder(cfg.image_encoder, "cpu"), build_text_encoder(cfg.text_encoder, "cpu")  # loaded once, untimed
    start, cpu_start = time.perf_counter(), time.process_time()
    embed_split(cfg, "train", progress=False, log=lambda _m: None)
    per_1000, cpu_1000 = [(t / n) * 1000 for t in (time.perf_counter() - start, time.process_time() - cpu_start)]
    print(f"  CLIP ViT-B-32 (random weights) embed of {n} images from tars on CPU ({torch.get_num_threads()} threads): "
          f"{per_1000:.1f} s wall ({cpu_1000:.1f} CPU-seconds) per 1,000 images with their captions; a CC3M-sized "
          f"set (3.3M images) at that wall rate: {per_1000 * 3300 / 3600:.0f} h")


if __name__ == "__main__":
    main()
