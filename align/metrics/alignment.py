"""Representational-alignment metrics between paired rows of two feature sets (platonic-rep definitions).

Values equal minyoungg/platonic-rep's ``AlignmentMetrics`` (Huh et al. 2024) with features L2-normalised
first (its ``compute_score`` default, ``normalize=True``), but computed at scale: k-NN through
``align.knn`` in chunks (self excluded, ties to the lower index), linear (unbiased) CKA through D×D
feature-space products, CKNNA through the sparse k-NN masks; no N×N matrix is formed except for the RBF
kernel, which is streamed in row blocks. k is always explicit.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor


def mutual_knn(a: Tensor, b: Tensor, k: int, normalize: bool = True, backend: str = "faiss") -> float:
    """Mean over rows i of |kNN_a(i) ∩ kNN_b(i)| / k for paired (N, Da), (N, Db) features (self excluded)."""
    raise NotImplementedError


def cycle_knn(a: Tensor, b: Tensor, k: int, normalize: bool = True, backend: str = "faiss") -> float:
    """Share of rows i found among the a-neighbours of i's b-neighbours: i ∈ ∪_{j∈kNN_b(i)} kNN_a(j)."""
    raise NotImplementedError


def cka(a: Tensor, b: Tensor, kernel: Literal["linear", "rbf"] = "linear", sigma: float = 1.0,
        normalize: bool = True, chunk_size: int = 2048) -> float:
    """Biased-HSIC CKA: HSIC(K,L) / (√(HSIC(K,K)·HSIC(L,L)) + 1e-6), K, L linear or RBF kernels of (N, ·) rows."""
    raise NotImplementedError


def unbiased_cka(a: Tensor, b: Tensor, kernel: Literal["linear", "rbf"] = "linear", sigma: float = 1.0,
                 normalize: bool = True, chunk_size: int = 2048) -> float:
    """CKA with the unbiased HSIC estimator (Song et al. 2012, eq. 5); needs N ≥ 4."""
    raise NotImplementedError


def cknna(a: Tensor, b: Tensor, k: int, normalize: bool = True, backend: str = "faiss") -> float:
    """CKNNA (Huh et al. 2024): unbiased-HSIC CKA restricted to mutual k-NN pairs of linear kernels; k ≥ 2."""
    raise NotImplementedError


def svcca(a: Tensor, b: Tensor, dim: int = 10, normalize: bool = True) -> float:
    """Mean canonical correlation between the top-``dim`` left singular subspaces of the standardised features."""
    raise NotImplementedError
