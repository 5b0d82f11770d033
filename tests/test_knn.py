"""Exact k-NN search against a numpy brute force (float64 scores, ties to the lower index)."""
import numpy as np
import pytest
import torch

from align.common.errors import AlignError
from align.metrics.knn import approximate_index, knn_search, neighbour_recall


def brute_knn(q, g, k, exclude_self=False):
    """Reference: full float64 score matrix, lexicographic order (score desc, index asc)."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    idx = np.arange(g.shape[0])
    order = np.array([np.lexsort((idx, -row)) for row in s])[:, :k]
    return np.take_along_axis(s, order, 1), order


def tied_data(rng, n, d, dup_from=None):
    """Vectors of ±1 in exactly 3 coordinates (equal norms, many exact ties), some rows duplicated."""
    x = np.zeros((n, d), dtype=np.float32)
    for i in range(n):
        cols = rng.choice(d, 3, replace=False)
        x[i, cols] = rng.choice([-1.0, 1.0], 3)
    if dup_from is not None:
        x[dup_from[1]] = x[dup_from[0]]
    return x


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_random_data_matches_brute_force(backend, chunk):
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((53, 12)).astype(np.float32), rng.standard_normal((97, 12)).astype(np.float32)
    s_ref, i_ref = brute_knn(q, g, 9)
    s, i = knn_search(torch.from_numpy(q), torch.from_numpy(g), 9, backend=backend, chunk_size=chunk)
    assert np.array_equal(i.numpy(), i_ref)
    assert np.allclose(s.numpy(), s_ref, atol=1e-6)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_ties_go_to_the_lower_index(backend, k):
    rng = np.random.default_rng(1)
    g = tied_data(rng, 120, 6, dup_from=(slice(0, 40), slice(60, 100)))
    q = tied_data(rng, 45, 6)
    _, i_ref = brute_knn(q, g, k)
    _, i = knn_search(torch.from_numpy(q), torch.from_numpy(g), k, backend=backend, chunk_size=16, margin=2)
    assert np.array_equal(i.numpy(), i_ref)


def test_hand_made_tie():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    q = torch.tensor([[1.0, 0.0]])
    for backend in ("faiss", "torch"):
        s, i = knn_search(q, g, 3, backend=backend)
        assert i.tolist() == [[0, 2, 3]]
        assert torch.allclose(s, torch.tensor([[1.0, 1.0, 0.6]]))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exclude_self_with_duplicates(backend):
    rng = np.random.default_rng(2)
    x = tied_data(rng, 80, 5, dup_from=(slice(0, 20), slice(40, 60)))
    _, i_ref = brute_knn(x, x, 6, exclude_self=True)
    _, i = knn_search(torch.from_numpy(x), torch.from_numpy(x), 6, backend=backend, exclude_self=True, chunk_size=9)
    assert np.array_equal(i.numpy(), i_ref)
    assert not (i.numpy() == np.arange(80)[:, None]).any()


def test_backends_identical_across_gallery_blocks(monkeypatch):
    # Force several gallery blocks in the torch path so the block merge is exercised.
    import align.metrics.knn as knn

    monkeypatch.setattr(knn, "GALLERY_BLOCK", 13)
    rng = np.random.default_rng(3)
    g = np.round(rng.standard_normal((150, 8)) * 2).astype(np.float32) / 2
    g[75:] = g[:75]
    q = g[::3].copy()
    _, i_ref = brute_knn(q, g, 11)
    _, i_t = knn_search(torch.from_numpy(q), torch.from_numpy(g), 11, backend="torch", chunk_size=10)
    _, i_f = knn_search(torch.from_numpy(q), torch.from_numpy(g), 11, backend="faiss", chunk_size=10)
    assert np.array_equal(i_t.numpy(), i_ref) and np.array_equal(i_f.numpy(), i_ref)


def test_bad_inputs_are_user_errors():
    x = torch.randn(5, 3)
    with pytest.raises(AlignError):
        knn_search(x, x, 5, exclude_self=True)
    with pytest.raises(AlignError):
        knn_search(x, torch.randn(5, 4), 2)
    bad = x.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(AlignError, match="NaN"):
        knn_search(bad, x, 2)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall(kind):
    rng = np.random.default_rng(4)
    g = rng.standard_normal((2000, 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[:200] + 0.1 * rng.standard_normal((200, 16)).astype(np.float32)
    _, exact = knn_search(torch.from_numpy(q), torch.from_numpy(g), 10, backend="torch")
    index = approximate_index(torch.from_numpy(g), kind, nprobe=64, ef_search=128)
    _, approx = index.search(torch.from_numpy(q), 10)
    recall = neighbour_recall(approx, exact)
    # Reference recall: set overlap by plain Python.
    ref = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())])
    assert abs(recall - ref) < 1e-12
    assert recall > 0.9


@pytest.mark.gpu
def test_cuda_torch_backend_matches_brute_force():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(5)
    g = tied_data(rng, 120, 6, dup_from=(slice(0, 40), slice(60, 100)))
    q = tied_data(rng, 45, 6)
    _, i_ref = brute_knn(q, g, 7)
    _, i = knn_search(torch.from_numpy(q).cuda(), torch.from_numpy(g).cuda(), 7, backend="torch", margin=2)
    assert np.array_equal(i.cpu().numpy(), i_ref)
