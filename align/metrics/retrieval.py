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
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from align.errors import AlignError
from align.knn import check_finite, float32_error_bound, knn_search, pair_scores

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


def _count(mask_src: Tensor, thr: Tensor, dim: int, strict: bool) -> Tensor:
    """Per row (dim=1) or column (dim=0), how many tile entries are > thr (strict) or ≥ thr; int64."""
    if mask_src.device.type == "cpu":  # numpy's compare + uint8 sum is ~5× faster than torch's bool sum on CPU
        a, t = mask_src.numpy(), thr.numpy()
        t = t[:, None] if dim == 1 else t[None, :]
        m = (a > t) if strict else (a >= t)
        return torch.from_numpy(m.view(np.uint8).sum(axis=dim, dtype=np.int64))
    t = thr[:, None] if dim == 1 else thr[None, :]
    m = (mask_src > t) if strict else (mask_src >= t)
    return m.sum(dim=dim)


def _rank_pass(img: Tensor, txt: Tensor, c2i: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """1-based i2t ranks (N_img,) and t2i ranks (N_cap,) from one pass over the similarity tiles."""
    n_img, n_cap, dim = img.shape[0], txt.shape[0], img.shape[1]
    dev = img.device
    caps = torch.arange(n_cap, device=dev)
    gt = pair_scores(img, txt, c2i, caps)  # float64 score of each caption with its own image
    best, best_cap = _best_caption(gt, c2i, n_img)
    err = float32_error_bound(dim)  # vectors are unit norm
    # Thresholds in float32 tile units: entries above hi are surely ahead, below lo surely behind.
    i_lo, i_hi = (best - 2 * err).float(), (best + 2 * err).float()
    t_lo, t_hi = (gt - 2 * err).float(), (gt + 2 * err).float()
    ahead_i = torch.zeros(n_img, dtype=torch.long, device=dev)
    ahead_t = torch.zeros(n_cap, dtype=torch.long, device=dev)
    for r0 in range(0, n_img, chunk_size):
        rows = slice(r0, min(n_img, r0 + chunk_size))
        for c0 in range(0, n_cap, TILE_COLS):
            cols = slice(c0, min(n_cap, c0 + TILE_COLS))
            tile = img[rows] @ txt[cols].T  # (chunk, block) float32
            # image → text: rows against each image's best caption score.
            sure = _count(tile, i_hi[rows], 1, strict=True)
            band = _count(tile, i_lo[rows], 1, strict=False) - sure
            own = ((best_cap[rows] >= c0) & (best_cap[rows] < cols.stop)).long()
            ahead_i[rows] += sure
            _resolve(tile, band > own, i_lo[rows], i_hi[rows], r0, c0, True, img, txt,
                     best[rows], best_cap[rows], ahead_i)
            # text → image: columns against each caption's own image score.
            sure = _count(tile, t_hi[cols], 0, strict=True)
            band = _count(tile, t_lo[cols], 0, strict=False) - sure
            own = ((c2i[cols] >= r0) & (c2i[cols] < rows.stop)).long()
            ahead_t[cols] += sure
            _resolve(tile.T, band > own, t_lo[cols], t_hi[cols], c0, r0, False, img, txt,
                     gt[cols], c2i[cols], ahead_t)
    return ahead_i + 1, ahead_t + 1


def _resolve(tile: Tensor, need: Tensor, lo: Tensor, hi: Tensor, q0: int, g0: int, image_queries: bool,
             img: Tensor, txt: Tensor, target: Tensor, target_idx: Tensor, ahead: Tensor) -> None:
    """Decide the tile entries within the float32 error band of their query's correct score, in float64.

    ``tile`` is (queries, gallery) for this direction; ``need`` marks the queries with band entries other than
    their correct item. An entry counts as ahead if its float64 score is higher, or equal with a lower index.
    """
    if not bool(need.any()):
        return
    q_local = need.nonzero().squeeze(1)
    sub = tile[q_local]
    r, c = ((sub >= lo[q_local][:, None]) & (sub <= hi[q_local][:, None])).nonzero(as_tuple=True)
    q_loc, g_idx = q_local[r], c + g0
    not_target = g_idx != target_idx[q_loc]
    q_loc, g_idx = q_loc[not_target], g_idx[not_target]
    q_idx = q_loc + q0
    s64 = pair_scores(img, txt, q_idx, g_idx) if image_queries else pair_scores(img, txt, g_idx, q_idx)
    wins = (s64 > target[q_loc]) | ((s64 == target[q_loc]) & (g_idx < target_idx[q_loc]))
    ahead.index_add_(0, q_idx[wins], torch.ones_like(q_idx[wins]))


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


def _topk_ranks(img: Tensor, txt: Tensor, c2i: Tensor, kmax: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Ranks capped at kmax + 1 (anything beyond the top kmax) from exact FAISS top-k search both ways."""
    _, cap_idx = knn_search(img, txt, min(kmax, txt.shape[0]), backend="faiss", chunk_size=chunk_size)
    hit = c2i[cap_idx] == torch.arange(img.shape[0], device=cap_idx.device)[:, None]  # (N_img, kmax)
    i2t = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], kmax + 1, dtype=torch.long))
    _, img_idx = knn_search(txt, img, min(kmax, img.shape[0]), backend="faiss", chunk_size=chunk_size)
    hit = img_idx == c2i.to(img_idx.device)[:, None]
    t2i = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], kmax + 1, dtype=torch.long))
    return i2t, t2i


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, caption_to_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                     backend: Literal["faiss", "torch"] = "torch", chunk_size: int = 1024,
                     ranks: bool = True) -> dict[str, float]:
    """(N_img, D) images, (N_cap, D) captions, (N_cap,) caption→image → {i2t_R@k, t2i_R@k, *_mean_rank, *_median_rank}.

    Recalls are fractions in [0, 1]; ranks are 1-based. Both backends give identical numbers (see module doc);
    ``torch`` does it all in one pass and runs on the inputs' device, ``faiss`` runs on the CPU.
    """
    if not ks or min(ks) < 1:
        raise AlignError(f"recall cut-offs must be positive integers, got {list(ks)}")
    img, txt, c2i = _prepare(image_emb, text_emb, caption_to_image)
    if backend == "torch":
        i2t, t2i = _rank_pass(img, txt, c2i, chunk_size)
        return _summary(i2t, t2i, ks, ranks)
    if backend != "faiss":
        raise AlignError(f"unknown retrieval backend {backend!r}; use 'faiss' or 'torch'")
    img, txt, c2i = img.cpu(), txt.cpu(), c2i.cpu()
    i2t, t2i = _topk_ranks(img, txt, c2i, max(ks), chunk_size)
    out = _summary(i2t, t2i, ks, ranks=False)
    if ranks:
        i2t_full, t2i_full = _rank_pass(img, txt, c2i, chunk_size)
        out.update({k: v for k, v in _summary(i2t_full, t2i_full, ks, True).items() if "rank" in k})
    return out
