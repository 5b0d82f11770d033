"""Image↔text retrieval recall and ranks with several captions per image (CLIP_benchmark convention).

Similarity is cosine (inputs are L2-normalised here, they need not be). image→text: an image's rank is the
best rank of any of its captions (any-hit); R@k = share of images with rank ≤ k. text→image: a caption's rank
is its image's rank; R@k = share of captions with rank ≤ k. Ranks are 1-based. Ties follow align.knn: equal
similarities (float64 of the normalised float32 vectors) are ordered by lower gallery index first, so a
correct item tied with a wrong one ranks ahead only if its index is lower. Memory stays bounded: similarities
are computed in (chunk × block) tiles, never as an (N_img, N_cap) matrix.
"""
from __future__ import annotations

from typing import Literal, Sequence

from torch import Tensor


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, caption_to_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                     backend: Literal["faiss", "torch"] = "faiss", chunk_size: int = 1024,
                     ranks: bool = True) -> dict[str, float]:
    """(N_img, D) images, (N_cap, D) captions, (N_cap,) caption→image → {i2t_R@k, t2i_R@k, *_mean_rank, *_median_rank}.

    Recalls are fractions in [0, 1]. ``ranks=False`` skips the mean/median ranks (faster with FAISS).
    """
    raise NotImplementedError
