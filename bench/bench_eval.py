"""Benchmark: retrieval evaluation of N images × N captions at dim 256 in bounded memory.

Run:  .venv/bin/python bench/bench_eval.py            (N = 100,000: ≈ 3 min on 2 cores)
      .venv/bin/python bench/bench_eval.py --n 20000  (quick look)

Measured side by side in one run, on the same synthetic embeddings (captions = image + noise, one caption
per image):
1. ``retrieval_recall(backend="torch")``: one pass over (chunk × block) similarity tiles giving R@k and
   mean/median ranks both ways — time, achieved GFLOP/s against a plain sgemm of the same tile shape, and the
   peak extra resident memory (sampled from /proc every 5 ms, plus the ru_maxrss delta) against the
   N × N float32 matrix it avoids;
2. exact FAISS ``IndexFlatIP`` top-10 for a subset of caption queries (``--queries``) — per-query cost next
   to the fused pass;
3. an approximate index (IVF-Flat, and HNSW with ``--hnsw``): build time, query time and its top-10 recall
   against the exact top-10 of the same queries.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.metrics.knn import approximate_index, knn_search, neighbour_recall
from align.metrics.retrieval import retrieval_recall  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the resident set size every 5 ms while active; ``extra`` = peak − RSS at entry."""

    def __enter__(self) -> "PeakRSS":
        self.start = rss_bytes()
        self.start_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.cpu0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start
        self.maxrss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start_max


def make_data(n: int, dim: int, latent: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with ``latent``-dimensional structure (as real embeddings have; 0: isotropic), captions = image + noise."""
    gen = torch.Generator().manual_seed(seed)
    if latent:
        basis = torch.randn(latent, dim, generator=gen)
        img = torch.randn(n, latent, generator=gen) @ basis / latent ** 0.5 + 0.3 * torch.randn(n, dim, generator=gen)
    else:
        img = torch.randn(n, dim, generator=gen)
    txt = img + noise * torch.randn(n, dim, generator=gen) / dim ** 0.5 * img.norm(dim=1, keepdim=True)
    return img, txt, torch.arange(n)


def sgemm_gflops(rows: int, cols: int, dim: int) -> float:
    a, b = torch.randn(rows, dim), torch.randn(cols, dim)
    a @ b.T
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b.T
    return 2 * rows * cols * dim * reps / (time.perf_counter() - t0) / 1e9


def mib(x: float) -> str:
    return f"{x / 2 ** 20:,.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="images (= captions)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--noise", type=float, default=3.0, help="caption noise relative to the image norm")
    p.add_argument("--latent", type=int, default=32, help="intrinsic dimension of the images (0: isotropic)")
    p.add_argument("--queries", type=int, default=5_000, help="caption queries for the FAISS / approximate part")
    p.add_argument("--hnsw", action="store_true", help="also build an HNSW index (slower to build)")
    p.add_argument("--chunk", type=int, default=1024, help="image rows per tile")
    args = p.parse_args()
    torch.manual_seed(0)
    n, d = args.n, args.dim
    print(f"threads: torch {torch.get_num_threads()}; N = {n:,} images × {n:,} captions, dim {d}; "
          f"load average at start {os.getloadavg()[0]:.1f} (other processes share the cores when > 0)")
    img, txt, c2i = make_data(n, d, args.latent, args.noise, seed=0)
    print(f"inputs: {mib(img.numel() * 4 * 2)} (images + captions, float32); an N×N float32 similarity "
          f"matrix would be {n * n * 4 / 2 ** 30:,.1f} GiB")

    from align.metrics import retrieval as retrieval_mod
    gemm = sgemm_gflops(args.chunk, retrieval_mod.TILE_COLS, d)
    with PeakRSS() as m:
        res = retrieval_recall(img, txt, c2i, ks=(1, 5, 10), backend="torch", chunk_size=args.chunk)
    flops = 2 * n * n * d
    print(f"\n[1] fused retrieval pass (torch, R@k + ranks, both directions): {m.seconds:.1f} s, "
          f"{flops / m.seconds / 1e9:.0f} GFLOP/s vs sgemm {gemm:.0f} GFLOP/s on the same tile "
          f"({flops / m.seconds / 1e9 / gemm:.0%}); CPU time {m.cpu_seconds:.1f} s "
          f"(≈ {m.cpu_seconds / torch.get_num_threads():.0f} s wall on {torch.get_num_threads()} idle cores)")
    print(f"    extra memory: peak RSS +{mib(m.extra)} (ru_maxrss +{mib(m.maxrss_delta)}) = "
          f"{m.extra / (n * n * 4):.4%} of the N×N matrix")
    print("    " + ", ".join(f"{k} {v:.4f}" if "R@" in k else f"{k} {v:.1f}" for k, v in res.items()))

    q = min(args.queries, n)
    imgn = torch.nn.functional.normalize(img, dim=-1)
    txtn = torch.nn.functional.normalize(txt[:q], dim=-1)
    with PeakRSS() as f:
        _, exact = knn_search(txtn, imgn, 10, backend="faiss")
    per_query_fused = m.seconds / (2 * n)  # the fused pass serves 2n queries (n per direction)
    print(f"\n[2] exact FAISS IndexFlatIP top-10, {q:,} caption queries over {n:,} images: {f.seconds:.1f} s "
          f"({f.seconds / q * 1e3:.2f} ms/query vs {per_query_fused * 1e3:.2f} ms/query in the fused pass; "
          f"extra memory +{mib(f.extra)})")
    exact_r1 = float((exact[:, 0] == c2i[:q]).double().mean())

    kinds = ["ivf"] + (["hnsw"] if args.hnsw else [])
    print(f"\n[3] approximate indexes over the {n:,} images, {q:,} caption queries, top-10 recall vs exact:")
    for kind in kinds:
        t0 = time.perf_counter()
        index = approximate_index(imgn, kind)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, approx = index.search(txtn, 10)
        search = time.perf_counter() - t0
        r1 = float((approx[:, 0] == c2i[:q]).double().mean())
        print(f"    {kind}: build {build:.1f} s, search {search:.2f} s ({search / q * 1e3:.3f} ms/query, "
              f"{f.seconds / max(search, 1e-9):.0f}× faster than exact), neighbour recall@10 "
              f"{neighbour_recall(approx, exact):.4f}; t2i R@1 on these queries {r1:.4f} (exact {exact_r1:.4f})")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
