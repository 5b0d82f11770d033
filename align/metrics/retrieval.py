"""Image↔text retrieval recall and ranks with several captions per image (CLIP_benchmark convention).

Similarity is cosine: inputs are L2-normalised here (float32), they need not be. image→text: an image's rank
is the best rank of any of its captions (any-hit) and R@k is the share of images with rank ≤ k; text→image: a
caption's rank is its own image's rank and R@k is the share of captions with rank ≤ k. Ranks are 1-based.

Ties follow ``align.knn``: similarities are compared as float64 inner products of the normalised float32
vectors, and equal similarities are ordered by LOWER gallery index first; so a correct item tied with wrong
ones is counted ahead of those with higher indices and behind those with lower ones (neither optimistic nor
pessimistic, and the same for both backends).

Memory stays bounded: no (N_img, N_cap) matrix is formed. ``backend="torch"`` makes one pass over
(chunk × block) similarity tiles, counting for every image and caption the items strictly ahead of its
correct one (float32 tiles decide all but the items within the float32 error bound of the correct score,
which are re-scored in float64), so it yields recall and ranks at once, on CPU or GPU. ``backend="faiss"``
takes recall from exact FAISS top-k search (``align.knn.knn_search``, ``IndexFlatIP`` in query chunks) in each
direction and, when ``ranks`` is set, adds the counting pass for the mean/median ranks.

For galleries too large for exact search, ``index="hnsw"|"ivf"`` takes R@k from approximate FAISS indexes and
reports each index's neighbour recall against exact search on a sample of queries (no ranks then).
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from align.common.errors import AlignError
from align.metrics.knn import (approximate_index, check_finite, float32_error_bound, knn_search, neighbour_recall,
                               pair_scores)

TILE_COLS = 8192  # caption columns per tile: tile memory = chunk_size × TILE_COLS × 4 bytes


def _prepare(image_emb: Tensor, text_emb: Tensor, caption_to_image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate shapes and values; return normalised float32 images, captions and the int64 index on one device."""
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise AlignError("retrieval needs 2-D image and text embeddings")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise AlignError(f"image features have dimension {image_emb.shape[1]} but text features have "
                         f"{text_emb.shape[1]}: evaluate in the joint space (after the heads)")
    c2i = caption_to_image.detach().to(device=image_emb.device, dtype=torch.long)
    n_img = image_emb.shape[0]
    if c2i.shape != (text_emb.shape[0],):
        raise AlignError("caption_to_image must have one entry per caption")
    if n_img == 0 or c2i.numel() == 0:
        raise AlignError("retrieval needs at least one image and one caption")
    if int(c2i.min()) < 0 or int(c2i.max()) >= n_img:
        raise AlignError("caption_to_image points outside the image embeddings")
    if bool((torch.bincount(c2i, minlength=n_img) == 0).any()):
        raise AlignError("some images have no caption: image→text recall is undefined for them")
    check_finite(image_emb, "image embeddings")
    check_finite(text_emb, "text embeddings")
    img = F.normalize(image_emb.detach().float(), dim=-1).contiguous()
    txt = F.normalize(text_emb.detach().float().to(img.device), dim=-1).contiguous()
    return img, txt, c2i


def _best_caption(scores: Tensor, c2i: Tensor, n_img: int) -> tuple[Tensor, Tensor]:
    """Per image, the float64 score and index of its best caption (ties → lowest caption index)."""
    best = torch.full((n_img,), -torch.inf, dtype=torch.float64, device=scores.device)
    best.scatter_reduce_(0, c2i, scores, reduce="amax")
    n_cap = c2i.shape[0]
    is_best = scores == best[c2i]
    idx = torch.where(is_best, torch.arange(n_cap, device=c2i.device), torch.full_like(c2i, n_cap))
    best_idx = torch.full((n_img,), n_cap, dtype=torch.long, device=c2i.device)
    best_idx.scatter_reduce_(0, c2i, idx, reduce="amin")
    return best, best_idx


def _tile_counts(tile: Tensor, lo: Tensor, hi: Tensor, queries_on_rows: bool) -> tuple[Tensor, Tensor, Tensor]:
    """For one direction of a (rows, cols) float32 tile: per query, the entries surely ahead (> hi), and the
    (query, gallery) local positions of the entries inside the error band [lo, hi] (its own item included)."""
    if tile.device.type == "cpu":  # numpy's compares, uint8 sums and flatnonzero are ~5× faster than torch's here
        a = tile.numpy()
        lo_n, hi_n = lo.numpy(), hi.numpy()
        lo_n, hi_n = (lo_n[:, None], hi_n[:, None]) if queries_on_rows else (lo_n[None, :], hi_n[None, :])
        above = a > hi_n
        band = np.flatnonzero((a >= lo_n) ^ above)  # above ⊂ (a ≥ lo), so xor = the band
        sure = torch.from_numpy(above.view(np.uint8).sum(axis=1 if queries_on_rows else 0, dtype=np.int64))
        band = torch.from_numpy(band)
    else:
        lo_t, hi_t = (lo[:, None], hi[:, None]) if queries_on_rows else (lo[None, :], hi[None, :])
        above = tile > hi_t
        sure = above.sum(dim=1 if queries_on_rows else 0)
        band = ((tile >= lo_t) & ~above).flatten().nonzero().squeeze(1)
    r, c = band // tile.shape[1], band % tile.shape[1]
    return (sure, r, c) if queries_on_rows else (sure, c, r)


def _rank_pass(img: Tensor, txt: Tensor, c2i: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """1-based i2t ranks (N_img,) and t2i ranks (N_cap,) from one pass over the similarity tiles.

    Per query, rank = 1 + #items ahead of its correct one; entries farther than the float32 error bound from
    the correct score are decided by the float32 tile, the few inside the band by ``pair_scores`` (float64).
    """
    n_img, n_cap, dim = img.shape[0], txt.shape[0], img.shape[1]
    dev = img.device
    gt = pair_scores(img, txt, c2i, torch.arange(n_cap, device=dev))  # each caption with its own image
    best, best_cap = _best_caption(gt, c2i, n_img)
    err = 2.0 * float32_error_bound(dim)  # unit vectors; 2×: slack for the float32 rounding of the thresholds
    i_lo, i_hi = (best - err).float(), (best + err).float()
    t_lo, t_hi = (gt - err).float(), (gt + err).float()
    ahead_i = torch.zeros(n_img, dtype=torch.long, device=dev)
    ahead_t = torch.zeros(n_cap, dtype=torch.long, device=dev)
    for r0 in range(0, n_img, chunk_size):
        r1 = min(n_img, r0 + chunk_size)
        for c0 in range(0, n_cap, TILE_COLS):
            c1 = min(n_cap, c0 + TILE_COLS)
            tile = img[r0:r1] @ txt[c0:c1].T  # (chunk, block) float32
            # image → text: each image row against its best caption's score.
            sure, q, g = _tile_counts(tile, i_lo[r0:r1], i_hi[r0:r1], queries_on_rows=True)
            ahead_i[r0:r1] += sure.to(dev)
            q, g = q.to(dev) + r0, g.to(dev) + c0
            _resolve(q, g, pair_scores(img, txt, q, g), best, best_cap, ahead_i)
            # text → image: each caption column against its own image's score.
            sure, q, g = _tile_counts(tile, t_lo[c0:c1], t_hi[c0:c1], queries_on_rows=False)
            ahead_t[c0:c1] += sure.to(dev)
            q, g = q.to(dev) + c0, g.to(dev) + r0
            _resolve(q, g, pair_scores(img, txt, g, q), gt, c2i, ahead_t)
    return ahead_i + 1, ahead_t + 1


def _resolve(q: Tensor, g: Tensor, s64: Tensor, target: Tensor, target_idx: Tensor, ahead: Tensor) -> None:
    """Count band entries (query q, gallery g, float64 score s64) ahead of the query's correct item: a higher
    score, or an equal score with a lower gallery index. The correct item itself is never ahead of itself."""
    t, ti = target[q], target_idx[q]
    wins = ((s64 > t) | ((s64 == t) & (g < ti))) & (g != ti)
    ahead.index_add_(0, q[wins], torch.ones_like(q[wins]))


def _summary(i2t_rank: Tensor, t2i_rank: Tensor, ks: Sequence[int], ranks: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t_rank <= k).double().mean())
    for k in ks:
        out[f"t2i_R@{k}"] = float((t2i_rank <= k).double().mean())
    if ranks:
        for name, r in (("i2t", i2t_rank), ("t2i", t2i_rank)):
            out[f"{name}_mean_rank"] = float(r.double().mean())
            # Lower median of an even count (torch.median's convention), an integer rank.
            out[f"{name}_median_rank"] = float(r.double().median())
    return out


def _ranks_from_lists(hit: Tensor, kmax: int) -> Tensor:
    """1-based rank of the first hit in each (Q, kmax) row of a hit mask; kmax + 1 when there is none."""
    first = hit.float().argmax(1) + 1
    return torch.where(hit.any(1), first, torch.full_like(first, kmax + 1))


def _topk_ranks(img: Tensor, txt: Tensor, c2i: Tensor, kmax: int, search_i2t, search_t2i) -> tuple[Tensor, Tensor]:
    """Ranks capped at kmax + 1 (anything beyond the top kmax) from top-kmax lists in both directions."""
    cap_idx = search_i2t(img, kmax)  # (N_img, kmax) caption indices, -1 where an index returned fewer
    own = torch.arange(img.shape[0])[:, None]
    i2t = _ranks_from_lists((cap_idx >= 0) & (c2i[cap_idx.clamp(min=0)] == own), kmax)
    img_idx = search_t2i(txt, kmax)
    t2i = _ranks_from_lists(img_idx == c2i[:, None], kmax)
    return i2t, t2i


def approximate_retrieval_recall(image_emb: Tensor, text_emb: Tensor, caption_to_image: Tensor,
                                 ks: Sequence[int] = (1, 5, 10), kind: Literal["hnsw", "ivf"] = "hnsw",
                                 check_queries: int = 1000, seed: int = 0, chunk_size: int = 1024) -> dict[str, float]:
    """R@k from approximate FAISS indexes both ways (for galleries too large for exact search; no ranks), plus
    each index's neighbour recall@kmax against exact search on ``check_queries`` random queries per direction
    (keys ``i2t_index_recall@K`` / ``t2i_index_recall@K``). Inputs as ``retrieval_recall``'s."""
    _check_ks(ks)
    if kind not in ("hnsw", "ivf"):
        raise AlignError(f"unknown approximate index {kind!r}; use 'hnsw' or 'ivf'")
    img, txt, c2i = (t.cpu() for t in _prepare(image_emb, text_emb, caption_to_image))
    kmax = max(ks)
    cap_index, img_index = approximate_index(txt, kind, seed=seed), approximate_index(img, kind, seed=seed)
    i2t, t2i = _topk_ranks(img, txt, c2i, kmax, lambda q, k: cap_index.search(q, k)[1],
                           lambda q, k: img_index.search(q, k)[1])
    out = _summary(i2t, t2i, ks, ranks=False)
    gen = torch.Generator().manual_seed(seed)
    for name, queries, gallery, index in (("i2t", img, txt, cap_index), ("t2i", txt, img, img_index)):
        pick = torch.randperm(queries.shape[0], generator=gen)[:check_queries]
        k = min(kmax, gallery.shape[0])
        _, exact = knn_search(queries[pick], gallery, k, backend="faiss", chunk_size=chunk_size)
        out[f"{name}_index_recall@{k}"] = neighbour_recall(index.search(queries[pick], k)[1], exact)
    return out


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or min(ks) < 1:
        raise AlignError(f"recall cut-offs must be positive integers, got {list(ks)}")


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, caption_to_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                     backend: Literal["faiss", "torch"] = "torch", chunk_size: int = 1024,
                     ranks: bool = True) -> dict[str, float]:
    """(N_img, D) images, (N_cap, D) captions, (N_cap,) caption→image → {i2t_R@k, t2i_R@k, *_mean_rank, *_median_rank}.

    Exact search. Recalls are fractions in [0, 1]; ranks are 1-based. Both backends give identical numbers (see
    module doc); ``torch`` does it all in one pass on the inputs' device, ``faiss`` runs on the CPU. For galleries
    too large for exact search: ``approximate_retrieval_recall``.
    """
    _check_ks(ks)
    if backend not in ("faiss", "torch"):
        raise AlignError(f"unknown retrieval backend {backend!r}; use 'faiss' or 'torch'")
    img, txt, c2i = _prepare(image_emb, text_emb, caption_to_image)
    if backend == "torch":
        i2t, t2i = _rank_pass(img, txt, c2i, chunk_size)
        return _summary(i2t, t2i, ks, ranks)
    img, txt, c2i = img.cpu(), txt.cpu(), c2i.cpu()

    def exact(gallery: Tensor):
        return lambda q, k: knn_search(q, gallery, min(k, gallery.shape[0]), backend="faiss", chunk_size=chunk_size)[1]

    i2t, t2i = _topk_ranks(img, txt, c2i, max(ks), exact(txt), exact(img))
    out = _summary(i2t, t2i, ks, ranks=False)
    if ranks:  # mean/median ranks need every item's position: the counting pass
        i2t_full, t2i_full = _rank_pass(img, txt, c2i, chunk_size)
        out.update({k: v for k, v in _summary(i2t_full, t2i_full, ks, True).items() if "rank" in k})
    return out
