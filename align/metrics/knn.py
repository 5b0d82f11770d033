"""Exact and approximate k-nearest-neighbour search by inner product, in bounded memory.

Ranking convention (both backends, everywhere in align): gallery items are ordered by their inner product with
the query computed in float64 from the float32 inputs (``pair_scores``), largest first; equal scores are
ordered by LOWER gallery index first. The float32 search (FAISS ``IndexFlatIP`` or a blocked torch matmul) only
proposes candidates: the k + ``margin`` best in float32 are re-scored in float64, and a row whose candidate
list might miss a true neighbour (its last candidate lies within the float32 error bound of its k-th) is
re-searched over the whole gallery. So the result is exact under the convention and FAISS and torch return
identical indices, ties included.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from align.common.errors import AlignError

Backend = Literal["faiss", "torch"]
PAIR_SUM_BLOCK = 4096  # float64 pair scores are summed in column blocks of this size (see pair_scores)
GALLERY_BLOCK = 16384  # gallery columns per tile of the torch search: tile memory = chunk × block × 4 bytes
DOUBLE_ONCE = 4 * 2 ** 20  # pair_scores widens an input of at most this many elements to float64 once (32 MiB)


def float32_error_bound(dim: int, max_norm_product: float = 1.0) -> float:
    """Upper bound on |float32 dot − exact dot| for vectors of length ``dim`` (any summation order), with slack."""
    unit = 2.0 ** -24  # float32 unit roundoff
    return 1.01 * (dim + 2) * unit * max_norm_product + 1e-12


def pair_scores(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, pair_chunk: int = 8192) -> Tensor:
    """Float64 inner products of the float32 pairs (a[rows[p]], b[cols[p]]) → (P,) float64.

    The one routine behind every tie decision: each value depends only on the two vectors (elementwise product
    then a sum over the last dimension), so identical vectors always get identical scores.
    """
    out = torch.zeros(rows.shape[0], dtype=torch.float64, device=a.device)
    # Small inputs are widened once (exact, so the same bits), not every gathered row again: half the time.
    a = a.double() if a.numel() <= DOUBLE_ONCE else a
    b = b.double() if b.numel() <= DOUBLE_ONCE else b
    for start in range(0, rows.shape[0], pair_chunk):
        r = rows[start:start + pair_chunk]
        c = cols[start:start + pair_chunk]
        # Sum in fixed column blocks: a long single reduction may be split across threads depending on the
        # number of pairs, which would change the rounding of the same pair from one call to the next.
        for d0 in range(0, a.shape[1], PAIR_SUM_BLOCK):
            a_d, b_d = (x if x.shape[1] <= PAIR_SUM_BLOCK else x[:, d0:d0 + PAIR_SUM_BLOCK] for x in (a, b))
            # index_select: twice the speed of a[r, slice] for the same contiguous (pairs, dim) rows
            out[start:start + pair_chunk] += (a_d.index_select(0, r).double() * b_d.index_select(0, c).double()
                                              ).sum(dim=-1)
    return out


def check_finite(x: Tensor, name: str) -> None:
    """Raise AlignError when ``x`` holds NaN or inf (a diverged head or a corrupt cache)."""
    if not bool(torch.isfinite(x).all()):
        raise AlignError(f"{name} contain NaN or inf values: check the embeddings or the trained head")


def _as_matrix(x: Tensor, name: str) -> Tensor:
    if x.ndim != 2:
        raise AlignError(f"{name} must be a 2-D (rows, dim) tensor, got shape {tuple(x.shape)}")
    check_finite(x, name)
    return x.detach().float().contiguous()


def _torch_candidates(q: Tensor, g: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Float32 top-m of (C, D) queries over (N, D) gallery in gallery blocks → scores (C, m), indices (C, m)."""
    best_s = best_i = None
    for start in range(0, g.shape[0], GALLERY_BLOCK):
        s = q @ g[start:start + GALLERY_BLOCK].T
        top = min(m, s.shape[1])
        vs, ix = torch.topk(s, top, dim=1)
        ix = ix + start
        if best_s is not None:
            vs, pos = torch.topk(torch.cat([best_s, vs], 1), min(m, best_s.shape[1] + top), dim=1)
            ix = torch.gather(torch.cat([best_i, ix], 1), 1, pos)
        best_s, best_i = vs, ix
    return best_s, best_i


def _faiss_index(g: Tensor):
    import faiss  # heavy: loaded only when a FAISS search runs

    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g.cpu().numpy())
    return index


def top_k_pairs(q: Tensor, g: Tensor, rows: Tensor, cols: Tensor, k: int, num_rows: int) -> tuple[Tensor, Tensor]:
    """Exact top-k per row among candidate pairs (rows[p] local query, cols[p] gallery) → (num_rows, k) each.

    Orders by float64 score descending, then gallery index ascending; every row must have ≥ k candidates.
    """
    s64 = pair_scores(q, g, rows, cols)
    # Lexicographic sort (row asc, score desc, col asc) by stable sorts from the last key to the first.
    order = torch.argsort(cols, stable=True)
    order = order[torch.argsort(s64[order], descending=True, stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    rows_sorted = rows[order]
    counts = torch.bincount(rows_sorted, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    pick = (starts[:, None] + torch.arange(k, device=q.device)[None, :]).reshape(-1)
    chosen = order[pick]
    return s64[chosen].reshape(num_rows, k), cols[chosen].reshape(num_rows, k)


def knn_search(queries: Tensor, gallery: Tensor, k: int, backend: Backend = "faiss", chunk_size: int = 1024,
               exclude_self: bool = False, margin: int = 16) -> tuple[Tensor, Tensor]:
    """Top-k inner-product neighbours of (Q, D) queries in a (N, D) gallery → scores (Q, k) float32, indices (Q, k) int64.

    ``exclude_self``: queries and gallery are the same rows; row i never returns index i. Exact under the
    module's ranking convention (float64 scores, ties to the lower index) for both backends. Memory beyond the
    inputs is O(chunk_size × (k + margin + block)); no (Q, N) matrix is formed.
    """
    q = _as_matrix(queries, "queries")
    g = _as_matrix(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise AlignError(f"queries have dimension {q.shape[1]} but the gallery has {g.shape[1]}")
    if exclude_self and q.shape[0] != g.shape[0]:
        raise AlignError("exclude_self needs queries and gallery to be the same rows")
    n = g.shape[0]
    if not 1 <= k <= n - int(exclude_self):
        raise AlignError(f"k={k} neighbours requested but the gallery has {n - int(exclude_self)} candidates")
    if backend not in ("faiss", "torch"):
        raise AlignError(f"unknown k-NN backend {backend!r}; use 'faiss' or 'torch'")
    if backend == "faiss":
        g = g.cpu()
        q = q.cpu()
        index = _faiss_index(g)
    m = min(n, k + int(exclude_self) + margin)
    norms_q = q.norm(dim=1)
    max_norm_g = float(g.norm(dim=1).max())
    out_s = torch.empty(q.shape[0], k, dtype=torch.float32, device=q.device)
    out_i = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    for start in range(0, q.shape[0], chunk_size):
        qc = q[start:start + chunk_size]
        c = qc.shape[0]
        if backend == "faiss":
            s32_np, i_np = index.search(qc.numpy(), m)
            s32, cand = torch.from_numpy(s32_np), torch.from_numpy(i_np)
        else:
            s32, cand = _torch_candidates(qc, g, m)
        local = torch.arange(c, device=q.device)[:, None].expand(c, m)
        keep = torch.ones_like(cand, dtype=torch.bool)
        if exclude_self:
            keep = cand != (local + start)
        # k-th best non-self float32 score per row, and the lowest candidate score (bounds everything outside).
        kth = torch.where(keep, s32, torch.full_like(s32, -torch.inf)).topk(k, dim=1).values[:, -1]
        err = float32_error_bound(q.shape[1], 1.0) * norms_q[start:start + c] * max_norm_g + 1e-12
        unsure = (s32[:, -1] >= kth - 2 * err) if m < n else torch.zeros(c, dtype=torch.bool, device=q.device)
        rows, cols = local[keep & ~unsure[:, None]], cand[keep & ~unsure[:, None]]
        if bool(unsure.any()):
            extra_r, extra_c = _full_row_candidates(qc, g, unsure.nonzero().squeeze(1), kth - 2 * err,
                                                    start if exclude_self else None)
            rows, cols = torch.cat([rows, extra_r]), torch.cat([cols, extra_c])
        sc, ix = top_k_pairs(qc, g, rows, cols, k, c)
        out_s[start:start + c] = sc.float()
        out_i[start:start + c] = ix
    return out_s, out_i


def _full_row_candidates(qc: Tensor, g: Tensor, rows: Tensor, threshold: Tensor,
                         self_offset: int | None) -> tuple[Tensor, Tensor]:
    """All (row, col) with float32 score ≥ threshold[row], over the whole gallery, for the given local rows."""
    out_r, out_c = [], []
    qr = qc[rows]
    for start in range(0, g.shape[0], GALLERY_BLOCK):
        s = qr @ g[start:start + GALLERY_BLOCK].T
        r, c = (s >= threshold[rows][:, None]).nonzero(as_tuple=True)
        out_r.append(rows[r])
        out_c.append(c + start)
    r, c = torch.cat(out_r), torch.cat(out_c)
    if self_offset is not None:
        keep = c != r + self_offset
        r, c = r[keep], c[keep]
    return r, c


class ApproximateIndex:
    """A FAISS HNSW or IVF-Flat inner-product index; ``search`` returns (scores, indices) like ``knn_search``."""

    def __init__(self, index, kind: str, dim: int) -> None:
        self.index = index
        self.kind = kind
        self.dim = dim

    def search(self, queries: Tensor, k: int, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
        """Approximate top-k of (Q, D) queries → scores (Q, k) float32, indices (Q, k) int64 (-1 where missing)."""
        q = _as_matrix(queries, "queries").cpu()
        if q.shape[1] != self.dim:
            raise AlignError(f"queries have dimension {q.shape[1]} but the index has {self.dim}")
        out_s, out_i = [], []
        for start in range(0, q.shape[0], chunk_size):
            s, i = self.index.search(q[start:start + chunk_size].numpy(), k)
            out_s.append(torch.from_numpy(s))
            out_i.append(torch.from_numpy(i))
        return torch.cat(out_s), torch.cat(out_i)


def approximate_index(gallery: Tensor, kind: Literal["hnsw", "ivf"] = "hnsw", *, hnsw_m: int = 32,
                      ef_construction: int = 80, ef_search: int = 64, nlist: int | None = None,
                      nprobe: int | None = None, seed: int = 0) -> ApproximateIndex:
    """Build an approximate inner-product index over a (N, D) gallery.

    HNSW (graph; ``hnsw_m`` links, ``ef_search`` candidates per query), or IVF-Flat with ``nlist`` ≈ 4√N lists of
    which ``nprobe`` (default nlist/16, at least 16) are scanned per query. Check its recall with
    ``neighbour_recall`` against ``knn_search`` on a sample of queries.
    """
    import faiss  # heavy: loaded only when an approximate index is built

    g = _as_matrix(gallery, "gallery").cpu().numpy()
    n, d = g.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        index.add(g)
    elif kind == "ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * n ** 0.5)))  # FAISS wants ≥ 39 training points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(g)
        index.add(g)
        index.nprobe = min(nlist, nprobe if nprobe is not None else max(16, nlist // 16))
    else:
        raise AlignError(f"unknown approximate index {kind!r}; use 'hnsw' or 'ivf'")
    return ApproximateIndex(index, kind, d)


def neighbour_recall(approx_indices: Tensor, exact_indices: Tensor) -> float:
    """Share of the exact top-k (Q, k) neighbours that the approximate (Q, k) result also returns."""
    if approx_indices.shape != exact_indices.shape:
        raise AlignError("approximate and exact neighbour lists must have the same shape")
    hits = (approx_indices.unsqueeze(2) == exact_indices.unsqueeze(1)).any(dim=1)  # (Q, k) exact found?
    return float(hits.float().mean())
