"""Exact and approximate k-nearest-neighbour search by inner product, in bounded memory.

Ranking convention (both backends, everywhere in align): candidates are ordered by their inner product
computed in float64 from the float32 inputs, largest first; equal scores are ordered by LOWER gallery index
first. The float32 search (FAISS ``IndexFlatIP`` or a torch matmul) only proposes candidates; a margin check
and a float64 re-score make the result exact under this convention, so FAISS and torch agree bit for bit.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Backend = Literal["faiss", "torch"]


def knn_search(queries: Tensor, gallery: Tensor, k: int, backend: Backend = "faiss", chunk_size: int = 1024,
               exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k inner-product neighbours of (Q, D) queries in a (N, D) gallery → scores (Q, k) float32, indices (Q, k) int64.

    ``exclude_self``: queries and gallery are the same rows; row i never returns index i.
    Memory is O(chunk_size × (k + block)) beyond the inputs; no (Q, N) matrix is formed.
    """
    raise NotImplementedError


class ApproximateIndex:
    """A FAISS HNSW or IVF index over a normalised gallery; ``search`` returns (scores, indices) like ``knn_search``."""

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Approximate top-k of (Q, D) queries → scores (Q, k) float32, indices (Q, k) int64 (-1 where missing)."""
        raise NotImplementedError


def approximate_index(gallery: Tensor, kind: Literal["hnsw", "ivf"] = "hnsw", *, hnsw_m: int = 32,
                      ef_construction: int = 80, ef_search: int = 64, nlist: int | None = None, nprobe: int = 16,
                      seed: int = 0) -> ApproximateIndex:
    """Build an approximate inner-product index over a (N, D) gallery (HNSW, or IVF-Flat with nlist ≈ 4√N)."""
    raise NotImplementedError


def neighbour_recall(approx_indices: Tensor, exact_indices: Tensor) -> float:
    """Share of the exact top-k (Q, k) neighbours that the approximate (Q, k) result also returns."""
    raise NotImplementedError
