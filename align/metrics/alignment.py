"""Representational-alignment metrics between paired rows of two feature sets (platonic-rep definitions).

Values follow minyoungg/platonic-rep's ``AlignmentMetrics`` (Huh et al. 2024) with rows L2-normalised first
(its ``compute_score`` default; ``normalize=False`` skips that), computed at scale:
- k-NN through ``align.knn.knn_search`` in query chunks, self excluded, ties to the lower index (the
  reference breaks ties arbitrarily);
- linear CKA / unbiased CKA through (D × D) feature-space products, in float64;
- the RBF kernel streamed in row blocks (O(N²) time, O(block × N) memory);
- CKNNA through the sparse k-NN masks (N × k entries);
- SVCCA through (D × D) Gram matrices and exact eigen-decompositions (the reference uses a randomised SVD and
  an iterative CCA, which approximate the same quantities).
No N × N matrix is formed. k is always explicit. Scores use the reference's ``+ 1e-6`` in CKA denominators.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from align.common.errors import AlignError
from align.metrics.knn import check_finite, knn_search, pair_scores

EPS = 1e-6  # platonic-rep's denominator guard: hsic_kl / (sqrt(hsic_kk * hsic_ll) + 1e-6)


def _pair(a: Tensor, b: Tensor, normalize: bool, min_rows: int = 2) -> tuple[Tensor, Tensor]:
    """Validated float32 copies of paired (N, Da), (N, Db) features, rows L2-normalised if asked."""
    if a.ndim != 2 or b.ndim != 2:
        raise AlignError("alignment metrics need 2-D (rows, dim) features")
    if a.shape[0] != b.shape[0]:
        raise AlignError(f"alignment metrics need paired rows: got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < min_rows:
        raise AlignError(f"this alignment metric needs at least {min_rows} rows, got {a.shape[0]}")
    check_finite(a, "features")
    check_finite(b, "features")
    a, b = a.detach().float(), b.detach().float().to(a.device)
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a.contiguous(), b.contiguous()


def _check_k(k: int, n: int, low: int = 1) -> None:
    if not low <= k <= n - 1:
        raise AlignError(f"k={k} must be between {low} and the number of rows minus one ({n - 1})")


def _neighbours(x: Tensor, k: int, backend: str) -> Tensor:
    """(N, k) indices of each row's k nearest other rows by inner product."""
    return knn_search(x, x, k, backend=backend, exclude_self=True)[1]


def mutual_knn(a: Tensor, b: Tensor, k: int, normalize: bool = True, backend: str = "faiss") -> float:
    """Mean over rows i of |kNN_a(i) ∩ kNN_b(i)| / k for paired (N, Da), (N, Db) features (self excluded)."""
    a, b = _pair(a, b, normalize)
    _check_k(k, a.shape[0])
    na, nb = _neighbours(a, k, backend), _neighbours(b, k, backend)
    shared = torch.zeros(a.shape[0], dtype=torch.long)
    for s in range(0, a.shape[0], 8192):  # (rows, k, k) comparisons, bounded
        shared[s:s + 8192] = (na[s:s + 8192, :, None] == nb[s:s + 8192, None, :]).any(2).sum(1).cpu()
    return float(shared.double().mean() / k)


def cycle_knn(a: Tensor, b: Tensor, k: int, normalize: bool = True, backend: str = "faiss") -> float:
    """Share of rows i found among the a-neighbours of i's b-neighbours: i ∈ ∪_{j∈kNN_b(i)} kNN_a(j)."""
    a, b = _pair(a, b, normalize)
    _check_k(k, a.shape[0])
    na, nb = _neighbours(a, k, backend), _neighbours(b, k, backend)
    found = torch.zeros(a.shape[0], dtype=torch.bool)
    for s in range(0, a.shape[0], 8192):
        rows = torch.arange(s, min(a.shape[0], s + 8192), device=na.device)
        found[s:s + 8192] = (na[nb[rows]] == rows[:, None, None]).flatten(1).any(1).cpu()
    return float(found.double().mean())


# --- CKA -------------------------------------------------------------------------------------------------
# Both HSIC estimators need only these kernel statistics: the Frobenius products <K,L>, <K,K>, <L,L>, the
# row sums and the diagonals of K and L (symmetric kernels). Linear kernels give them from feature products.

def _linear_stats(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    a, b = a.double(), b.double()
    ata, btb, atb = a.T @ a, b.T @ b, a.T @ b
    return {"kl": (atb * atb).sum(), "kk": (ata * ata).sum(), "ll": (btb * btb).sum(),
            "rk": a @ a.sum(0), "rl": b @ b.sum(0), "dk": (a * a).sum(1), "dl": (b * b).sum(1)}


def _rbf_block(x: Tensor, sq: Tensor, rows: slice, sigma: float) -> Tensor:
    """RBF kernel rows exp(−‖x_i − x_j‖² / 2σ²) for i in ``rows``, all j, float64 (zero self-distance)."""
    d2 = (sq[rows, None] + sq[None, :] - 2.0 * (x[rows] @ x.T)).clamp_(min=0.0)
    idx = torch.arange(rows.start, rows.stop, device=x.device)
    d2[idx - rows.start, idx] = 0.0
    return torch.exp(-d2 / (2.0 * sigma ** 2))


def _rbf_stats(a: Tensor, b: Tensor, sigma: float, chunk_size: int) -> dict[str, Tensor]:
    a, b = a.double(), b.double()
    n = a.shape[0]
    sqa, sqb = (a * a).sum(1), (b * b).sum(1)
    stats = {"kl": 0.0, "kk": 0.0, "ll": 0.0, "rk": torch.empty(n, dtype=torch.float64, device=a.device),
             "rl": torch.empty(n, dtype=torch.float64, device=a.device)}
    for s in range(0, n, chunk_size):
        rows = slice(s, min(n, s + chunk_size))
        k, l = _rbf_block(a, sqa, rows, sigma), _rbf_block(b, sqb, rows, sigma)
        stats["kl"] += (k * l).sum()
        stats["kk"] += (k * k).sum()
        stats["ll"] += (l * l).sum()
        stats["rk"][rows], stats["rl"][rows] = k.sum(1), l.sum(1)
    stats["dk"] = stats["dl"] = torch.ones(n, dtype=torch.float64, device=a.device)
    return stats


def _hsic_biased(kl: Tensor, rk: Tensor, rl: Tensor) -> Tensor:
    """tr(K H L H) = <K,L> − (2/n) rK·rL + (ΣK)(ΣL)/n² for symmetric K, L with row sums rK, rL."""
    n = rk.shape[0]
    return kl - 2.0 / n * (rk @ rl) + rk.sum() * rl.sum() / n ** 2


def _hsic_unbiased(kl: Tensor, rk: Tensor, rl: Tensor, dk: Tensor, dl: Tensor) -> Tensor:
    """Song et al. (2012) eq. 5 on K̃, L̃ = K, L with zeroed diagonals, from statistics of symmetric K, L."""
    n = rk.shape[0]
    rk_t, rl_t = rk - dk, rl - dl  # row sums of K̃, L̃
    term = (kl - dk @ dl) + rk_t.sum() * rl_t.sum() / ((n - 1) * (n - 2)) - 2.0 * (rk_t @ rl_t) / (n - 2)
    return term / (n * (n - 3))


def _cka(a: Tensor, b: Tensor, kernel: str, sigma: float, normalize: bool, chunk_size: int, unbiased: bool) -> float:
    a, b = _pair(a, b, normalize, min_rows=4 if unbiased else 2)
    if kernel == "linear":
        st = _linear_stats(a, b)
    elif kernel == "rbf":
        if sigma <= 0:
            raise AlignError(f"the RBF kernel width sigma must be positive, got {sigma}")
        st = _rbf_stats(a, b, sigma, chunk_size)
    else:
        raise AlignError(f"unknown CKA kernel {kernel!r}; use 'linear' or 'rbf'")
    if unbiased:
        kl = _hsic_unbiased(st["kl"], st["rk"], st["rl"], st["dk"], st["dl"])
        kk = _hsic_unbiased(st["kk"], st["rk"], st["rk"], st["dk"], st["dk"])
        ll = _hsic_unbiased(st["ll"], st["rl"], st["rl"], st["dl"], st["dl"])
    else:
        kl = _hsic_biased(st["kl"], st["rk"], st["rl"])
        kk = _hsic_biased(st["kk"], st["rk"], st["rk"])
        ll = _hsic_biased(st["ll"], st["rl"], st["rl"])
    return float(kl / (torch.sqrt(kk * ll) + EPS))


def cka(a: Tensor, b: Tensor, kernel: Literal["linear", "rbf"] = "linear", sigma: float = 1.0,
        normalize: bool = True, chunk_size: int = 2048) -> float:
    """Biased-HSIC CKA: HSIC(K,L) / (√(HSIC(K,K)·HSIC(L,L)) + 1e-6), K, L linear or RBF kernels of (N, ·) rows."""
    return _cka(a, b, kernel, sigma, normalize, chunk_size, unbiased=False)


def unbiased_cka(a: Tensor, b: Tensor, kernel: Literal["linear", "rbf"] = "linear", sigma: float = 1.0,
                 normalize: bool = True, chunk_size: int = 2048) -> float:
    """CKA with the unbiased HSIC estimator (Song et al. 2012, eq. 5); needs N ≥ 4."""
    return _cka(a, b, kernel, sigma, normalize, chunk_size, unbiased=True)


# --- CKNNA -----------------------------------------------------------------------------------------------

def _sparse_hsic_unbiased(rows: Tensor, cols: Tensor, x: Tensor, y: Tensor, n: int) -> Tensor:
    """Unbiased HSIC of the sparse (n × n) matrices X, Y sharing the support {(rows[p], cols[p])} (no diagonal).

    X, Y need not be symmetric: <X̃, Ỹᵀ> pairs entry (i, j) of X with entry (j, i) of Y, and 1ᵀX̃Ỹ1 is the
    column sums of X against the row sums of Y.
    """
    key = rows * n + cols
    order = torch.argsort(key)
    key_sorted = key[order]
    mirror = cols * n + rows
    pos = torch.searchsorted(key_sorted, mirror).clamp_(max=key.numel() - 1)
    has_mirror = key_sorted[pos] == mirror
    y_mirror = torch.where(has_mirror, y[order[pos]], torch.zeros_like(y))
    trace_term = (x * y_mirror).sum()
    col_x = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, cols, x)
    row_y = torch.zeros(n, dtype=y.dtype, device=y.device).index_add_(0, rows, y)
    term = trace_term + x.sum() * y.sum() / ((n - 1) * (n - 2)) - 2.0 * (col_x @ row_y) / (n - 2)
    return term / (n * (n - 3))


def cknna(a: Tensor, b: Tensor, k: int, normalize: bool = True, backend: str = "faiss") -> float:
    """CKNNA (Huh et al. 2024): unbiased-HSIC CKA restricted to mutual k-NN pairs of linear kernels; k ≥ 2."""
    a, b = _pair(a, b, normalize, min_rows=4)
    n = a.shape[0]
    _check_k(k, n, low=2)
    na, nb = _neighbours(a, k, backend), _neighbours(b, k, backend)
    rows = torch.arange(n, device=na.device)[:, None].expand(n, k).reshape(-1)
    ca, cb = na.reshape(-1), nb.reshape(-1)
    # K-masks: k-NN of a (for <K,K>), of b (for <L,L>), and their intersection (for <K,L>).
    ka = pair_scores(a, a, rows, ca)
    lb = pair_scores(b, b, rows, cb)
    sim_kk = _sparse_hsic_unbiased(rows, ca, ka, ka, n)
    sim_ll = _sparse_hsic_unbiased(rows, cb, lb, lb, n)
    key_b = torch.sort(rows * n + cb).values
    key_a = rows * n + ca
    both = torch.isin(key_a, key_b)
    r, c = rows[both], ca[both]
    sim_kl = _sparse_hsic_unbiased(r, c, pair_scores(a, a, r, c), pair_scores(b, b, r, c), n)
    return float(sim_kl / (torch.sqrt(sim_kk * sim_ll) + EPS))


# --- SVCCA -----------------------------------------------------------------------------------------------

def _standardised_gram(x: Tensor, chunk_size: int = 16384) -> tuple[Tensor, Tensor]:
    """Column means (D,) and the float64 Gram (D, D) of the column-centred x, accumulated in row chunks."""
    mean = x.double().mean(0)
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk_size):
        c = x[s:s + chunk_size].double() - mean
        gram += c.T @ c
    return mean, gram


def svcca(a: Tensor, b: Tensor, dim: int = 10, normalize: bool = True, chunk_size: int = 16384) -> float:
    """Mean canonical correlation between the top-``dim`` left singular subspaces of the standardised features.

    Standardisation as in platonic-rep: centre each column, divide by its (N − 1) std + 1e-8. The canonical
    correlations of two orthonormal, centred bases U1, U2 are the singular values of U1ᵀU2, computed here as
    S1⁻¹ V1ᵀ (A_sᵀ B_s) V2 S2⁻¹ from (D × D) products.
    """
    a, b = _pair(a, b, normalize, min_rows=3)
    n = a.shape[0]
    if not 1 <= dim <= min(a.shape[1], b.shape[1], n - 1):
        raise AlignError(f"svcca dim={dim} must be between 1 and min(feature dims, rows - 1) = "
                         f"{min(a.shape[1], b.shape[1], n - 1)}")
    mean_a, gram_a = _standardised_gram(a, chunk_size)
    mean_b, gram_b = _standardised_gram(b, chunk_size)
    scale_a = 1.0 / (torch.sqrt(torch.diagonal(gram_a) / (n - 1)) + 1e-8)
    scale_b = 1.0 / (torch.sqrt(torch.diagonal(gram_b) / (n - 1)) + 1e-8)
    cross = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for s in range(0, n, chunk_size):
        cross += (a[s:s + chunk_size].double() - mean_a).T @ (b[s:s + chunk_size].double() - mean_b)
    gram_a = gram_a * scale_a[:, None] * scale_a[None, :]
    gram_b = gram_b * scale_b[:, None] * scale_b[None, :]
    cross = cross * scale_a[:, None] * scale_b[None, :]
    ev_a, vec_a = torch.linalg.eigh(gram_a)  # ascending eigenvalues = squared singular values
    ev_b, vec_b = torch.linalg.eigh(gram_b)
    va, sa = vec_a[:, -dim:], ev_a[-dim:].clamp(min=0).sqrt()
    vb, sb = vec_b[:, -dim:], ev_b[-dim:].clamp(min=0).sqrt()
    if float(sa.min()) <= 1e-12 * float(sa.max()) or float(sb.min()) <= 1e-12 * float(sb.max()):
        raise AlignError(f"svcca dim={dim} exceeds the rank of the features; use a smaller dim")
    m = (va.T @ cross @ vb) / sa[:, None] / sb[None, :]
    return float(torch.linalg.svdvals(m).clamp(max=1.0).mean())
