"""Retrieval recall and ranks against brute-force Python loops, a hand-computed case, and ties."""
import numpy as np
import pytest
import torch

from align.common.errors import AlignError
from align.metrics.retrieval import approximate_retrieval_recall, retrieval_recall


def brute_force(img, txt, c2i, ks):
    """Reference: full cosine matrix in float64, every ranking by sorted() on (−score, index).

    Cosines are rounded to 12 decimals so that mathematically equal ones are equal here whatever the
    summation order (a BLAS matmul with FMA can split exact ties by 1e-17).
    """
    img = img.astype(np.float64) / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt.astype(np.float64) / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = np.round((img[:, None, :] * txt[None, :, :]).sum(-1), 12)
    n_img, n_cap = sim.shape
    i2t, t2i = [], []
    for i in range(n_img):
        order = sorted(range(n_cap), key=lambda j: (-sim[i, j], j))
        i2t.append(min(order.index(j) for j in range(n_cap) if c2i[j] == i) + 1)
    for j in range(n_cap):
        order = sorted(range(n_img), key=lambda i: (-sim[i, j], i))
        t2i.append(order.index(c2i[j]) + 1)
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = sum(x <= k for x in r) / len(r)
        out[f"{name}_mean_rank"] = sum(r) / len(r)
        out[f"{name}_median_rank"] = float(sorted(r)[(len(r) - 1) // 2])  # lower median
    return out


def signed_sparse(rng, n, d, nnz=3):
    """±1 in exactly nnz coordinates: equal norms, so equal dot products are exactly equal cosines (ties)."""
    x = np.zeros((n, d), dtype=np.float32)
    for i in range(n):
        x[i, rng.choice(d, nnz, replace=False)] = rng.choice([-1.0, 1.0], nnz)
    return x


def multi_caption_index(rng, n_img, extra):
    return np.concatenate([np.arange(n_img), rng.integers(0, n_img, extra)]).astype(np.int64)


def check(got, ref):
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_hand_computed_case(backend):
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    c2i = torch.tensor([0, 0, 1, 2, 2])
    got = retrieval_recall(img, txt, c2i, ks=(1, 2, 3), backend=backend)
    # i2t ranks (1, 2, 1): image 1's only caption (1,1) comes after caption (0,1) (cosine 1 > 0.707).
    # t2i ranks (1, 2, 2, 1, 2): caption (0,1) of image 0 prefers image 1; caption (1,1) ties images 0 and 1
    # → image 0 first, so its image 1 is second; caption (0,-1) ties images 0 and 2 → image 2 second.
    check(got, {"i2t_R@1": 2 / 3, "i2t_R@2": 1.0, "i2t_R@3": 1.0, "t2i_R@1": 0.4, "t2i_R@2": 1.0,
                "t2i_R@3": 1.0, "i2t_mean_rank": 4 / 3, "i2t_median_rank": 1.0, "t2i_mean_rank": 1.6,
                "t2i_median_rank": 2.0})


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_all_identical_embeddings(backend):
    # Every similarity ties: a caption's rank is its image's index + 1, an image's is its first caption's + 1.
    c2i = torch.tensor([2, 0, 1, 0, 2, 1, 3])
    got = retrieval_recall(torch.ones(4, 3), torch.ones(7, 3) * 5.0, c2i, ks=(1, 2), backend=backend)
    t2i = [3, 1, 2, 1, 3, 2, 4]
    i2t = [2, 3, 1, 7]
    check(got, {"i2t_R@1": 1 / 4, "i2t_R@2": 2 / 4, "t2i_R@1": 2 / 7, "t2i_R@2": 4 / 7,
                "i2t_mean_rank": np.mean(i2t), "i2t_median_rank": 2.0, "t2i_mean_rank": np.mean(t2i),
                "t2i_median_rank": 2.0})


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_random_multi_caption_matches_brute_force(seed, backend):
    rng = np.random.default_rng(seed)
    c2i = multi_caption_index(rng, 30, 50)
    img = rng.standard_normal((30, 8)).astype(np.float32) * rng.uniform(0.5, 3, (30, 1)).astype(np.float32)
    txt = img[c2i] + 1.5 * rng.standard_normal((80, 8)).astype(np.float32)
    got = retrieval_recall(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(c2i), ks=(1, 5, 10),
                           backend=backend, chunk_size=7)
    check(got, brute_force(img, txt, c2i, (1, 5, 10)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ties_and_duplicates_match_brute_force_on_both_backends(seed, monkeypatch):
    import align.metrics.retrieval as retrieval

    monkeypatch.setattr(retrieval, "TILE_COLS", 16)  # several tiles in both directions
    rng = np.random.default_rng(seed)
    c2i = multi_caption_index(rng, 40, 70)
    img = signed_sparse(rng, 40, 6)
    txt = signed_sparse(rng, 110, 6)
    img[20:30] = img[0:10]  # duplicated images
    txt[50:70] = txt[0:20]  # duplicated captions
    txt[70:80] = img[c2i[70:80]]  # captions equal to their image
    ref = brute_force(img, txt, c2i, (1, 3, 10))
    args = (torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(c2i))
    got_t = retrieval_recall(*args, ks=(1, 3, 10), backend="torch", chunk_size=9)
    got_f = retrieval_recall(*args, ks=(1, 3, 10), backend="faiss", chunk_size=9)
    check(got_t, ref)
    check(got_f, ref)
    assert got_t == got_f


def test_recall_without_ranks_and_scale_invariance():
    rng = np.random.default_rng(5)
    c2i = torch.from_numpy(multi_caption_index(rng, 20, 20))
    img, txt = torch.randn(20, 4), torch.randn(40, 4)
    plain = retrieval_recall(img, txt, c2i, ks=(1, 5), ranks=False, backend="faiss")
    assert set(plain) == {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"}
    scaled = retrieval_recall(img * 7.0, txt * 0.01, c2i, ks=(1, 5), ranks=False, backend="torch")
    assert plain == scaled


def test_user_errors():
    img, txt = torch.randn(3, 4), torch.randn(4, 4)
    with pytest.raises(AlignError, match="no caption"):
        retrieval_recall(img, txt, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(AlignError, match="dimension"):
        retrieval_recall(img, torch.randn(4, 5), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(AlignError, match="outside"):
        retrieval_recall(img, txt, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(AlignError, match="NaN"):
        retrieval_recall(img * float("nan"), txt, torch.tensor([0, 1, 2, 2]))


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_option_reports_its_recall(kind):
    rng = np.random.default_rng(6)
    c2i = multi_caption_index(rng, 400, 400)
    img = rng.standard_normal((400, 16)).astype(np.float32)
    txt = img[c2i] + 0.3 * rng.standard_normal((800, 16)).astype(np.float32)
    args = (torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(c2i))
    exact = retrieval_recall(*args, ks=(1, 5))
    approx = approximate_retrieval_recall(*args, ks=(1, 5), kind=kind, check_queries=200)
    assert set(approx) == {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "i2t_index_recall@5", "t2i_index_recall@5"}
    assert approx["i2t_index_recall@5"] > 0.8 and approx["t2i_index_recall@5"] > 0.8
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"):
        assert abs(approx[key] - exact[key]) < 0.05


@pytest.mark.gpu
def test_cuda_torch_path_matches_brute_force():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(7)
    c2i = multi_caption_index(rng, 40, 70)
    img, txt = signed_sparse(rng, 40, 6), signed_sparse(rng, 110, 6)
    img[20:30] = img[0:10]
    args = (torch.from_numpy(img).cuda(), torch.from_numpy(txt).cuda(), torch.from_numpy(c2i).cuda())
    check(retrieval_recall(*args, ks=(1, 3, 10), backend="torch", chunk_size=9), brute_force(img, txt, c2i, (1, 3, 10)))
