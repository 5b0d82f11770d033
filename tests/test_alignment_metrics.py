"""Alignment metrics equal direct transcriptions of their definitions (numpy, N × N matrices)."""
import numpy as np
import pytest
import torch

from align.common.errors import AlignError
from align.metrics.alignment import cka, cknna, cycle_knn, mutual_knn, svcca, unbiased_cka


def data(n, da, db, seed, noise=1.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, da))
    b = a @ rng.standard_normal((da, db)) / np.sqrt(da) + noise * rng.standard_normal((n, db))
    return a.astype(np.float32), b.astype(np.float32)


def normalise(x):
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn_sets(x, k):
    """Each row's k nearest other rows by inner product (N × N matrix, self excluded)."""
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return [set(np.argsort(-row, kind="stable")[:k]) for row in s]


def ref_mutual_knn(a, b, k):
    na, nb = knn_sets(normalise(a), k), knn_sets(normalise(b), k)
    return np.mean([len(x & y) / k for x, y in zip(na, nb)])


def ref_cycle_knn(a, b, k):
    na, nb = knn_sets(normalise(a), k), knn_sets(normalise(b), k)
    return np.mean([any(i in na[j] for j in nb[i]) for i in range(len(na))])


def hsic_biased(k, l):
    """tr(K H L H), H = I − 11ᵀ/n; K H is K minus its row means, and tr(XY) = Σ X ∘ Yᵀ."""
    kh = k - k.mean(1, keepdims=True)
    lh = l - l.mean(1, keepdims=True)
    return (kh * lh.T).sum()


def hsic_unbiased(k, l):
    """Song et al. (2012) eq. 5, transcribed (L transposed in the first term as in platonic-rep)."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    value = (kt * lt.T).sum() + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 * (kt @ lt).sum() / (n - 2)
    return value / (n * (n - 3))


def kernel(x, kind, sigma):
    if kind == "linear":
        return x @ x.T
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma ** 2))


def ref_cka(a, b, kind="linear", sigma=1.0, unbiased=False):
    k, l = kernel(normalise(a), kind, sigma), kernel(normalise(b), kind, sigma)
    f = hsic_unbiased if unbiased else hsic_biased
    return f(k, l) / (np.sqrt(f(k, k) * f(l, l)) + 1e-6)


def ref_cknna(a, b, topk):
    k, l = normalise(a) @ normalise(a).T, normalise(b) @ normalise(b).T
    n = k.shape[0]

    def mask(m):
        m = m.copy()
        np.fill_diagonal(m, -np.inf)
        out = np.zeros((n, n))
        for i, row in enumerate(m):
            out[i, np.argsort(-row, kind="stable")[:topk]] = 1
        return out

    def sim(x, y):
        m = mask(x) * mask(y)
        return hsic_unbiased(m * x, m * y)

    return sim(k, l) / (np.sqrt(sim(k, k) * sim(l, l)) + 1e-6)


def svd_basis(x, dim):
    """SVCCA's first stage: the top-``dim`` left singular vectors of the normalised, standardised rows."""
    x = normalise(x)
    x = x - x.mean(0)
    x = x / (x.std(0, ddof=1) + 1e-8)
    return np.linalg.svd(x, full_matrices=False)[0][:, :dim]


def ref_svcca(a, b, dim):
    u1, u2 = svd_basis(a, dim), svd_basis(b, dim)
    # Canonical correlations from covariance matrices: singular values of Sxx^-1/2 Sxy Syy^-1/2.
    x, y = u1 - u1.mean(0), u2 - u2.mean(0)
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y

    def inv_sqrt(m):
        w, v = np.linalg.eigh(m)
        return v @ np.diag(w ** -0.5) @ v.T

    return np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), compute_uv=False).mean()


T = torch.from_numpy


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_mutual_and_cycle_knn(k, backend):
    a, b = data(120, 16, 12, seed=k)
    assert mutual_knn(T(a), T(b), k, backend=backend) == pytest.approx(ref_mutual_knn(a, b, k), abs=1e-12)
    assert cycle_knn(T(a), T(b), k, backend=backend) == pytest.approx(ref_cycle_knn(a, b, k), abs=1e-12)


def test_knn_metrics_identical_features_score_one():
    a, _ = data(50, 8, 8, seed=0)
    assert mutual_knn(T(a), T(a * 3.0), 5) == 1.0
    assert cycle_knn(T(a), T(a), 5) == 1.0


@pytest.mark.parametrize("kind", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka(kind, unbiased):
    a, b = data(90, 10, 7, seed=3)
    fn = unbiased_cka if unbiased else cka
    got = fn(T(a), T(b), kernel=kind, sigma=0.8, chunk_size=32)
    assert got == pytest.approx(ref_cka(a, b, kind, 0.8, unbiased), abs=1e-6)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_cknna(k):
    a, b = data(80, 12, 9, seed=k, noise=0.5)
    assert cknna(T(a), T(b), k) == pytest.approx(ref_cknna(a, b, k), abs=1e-6)


@pytest.mark.parametrize("dim", [1, 4, 8])
def test_svcca(dim):
    a, b = data(150, 12, 10, seed=dim, noise=0.7)
    assert svcca(T(a), T(b), dim=dim) == pytest.approx(ref_svcca(a, b, dim), abs=1e-6)


def test_svcca_matches_sklearn_cca_as_platonic_rep_uses_it():
    cross_decomposition = pytest.importorskip("sklearn.cross_decomposition")
    a, b = data(200, 12, 10, seed=9, noise=0.7)
    dim = 4

    u1, u2 = svd_basis(a, dim), svd_basis(b, dim)
    model = cross_decomposition.CCA(n_components=dim, max_iter=5000, tol=1e-12).fit(u1, u2)
    xs, ys = model.transform(u1, u2)
    ref = np.mean([np.corrcoef(xs[:, i], ys[:, i])[0, 1] for i in range(dim)])
    assert svcca(T(a), T(b), dim=dim) == pytest.approx(ref, abs=1e-4)  # NIPALS is iterative


def test_scalable_paths_above_chunk_sizes():
    # N above knn_search's query chunk (1024) and many RBF row blocks; direct N × N references.
    a, b = data(1030, 8, 6, seed=11, noise=0.8)
    assert mutual_knn(T(a), T(b), 4) == pytest.approx(ref_mutual_knn(a, b, 4), abs=1e-12)
    assert cycle_knn(T(a), T(b), 4) == pytest.approx(ref_cycle_knn(a, b, 4), abs=1e-12)
    assert cka(T(a), T(b)) == pytest.approx(ref_cka(a, b), abs=1e-6)
    assert unbiased_cka(T(a), T(b)) == pytest.approx(ref_cka(a, b, unbiased=True), abs=1e-6)
    assert cka(T(a), T(b), kernel="rbf", sigma=1.0, chunk_size=100) == pytest.approx(
        ref_cka(a, b, "rbf", 1.0), abs=1e-6)
    assert cknna(T(a), T(b), 4) == pytest.approx(ref_cknna(a, b, 4), abs=1e-6)


def test_hsic_biased_reference_is_the_trace_formula():
    rng = np.random.default_rng(0)
    k, l = rng.standard_normal((7, 7)), rng.standard_normal((7, 7))
    k, l = k + k.T, l + l.T
    h = np.eye(7) - np.ones((7, 7)) / 7
    assert hsic_biased(k, l) == pytest.approx(np.trace(k @ h @ l @ h), abs=1e-12)


def test_normalize_false_uses_raw_features():
    a, b = data(60, 6, 5, seed=4)
    a = a * np.linspace(0.1, 5, 60, dtype=np.float32)[:, None]
    k, l = a.astype(np.float64) @ a.T.astype(np.float64), b.astype(np.float64) @ b.T.astype(np.float64)
    ref = hsic_biased(k, l) / (np.sqrt(hsic_biased(k, k) * hsic_biased(l, l)) + 1e-6)
    assert cka(T(a), T(b), normalize=False) == pytest.approx(ref, abs=1e-6)


def test_user_errors():
    a, b = torch.randn(10, 4), torch.randn(9, 4)
    with pytest.raises(AlignError, match="paired"):
        mutual_knn(a, b, 2)
    with pytest.raises(AlignError, match="k="):
        mutual_knn(a, a, 10)
    with pytest.raises(AlignError, match="k="):
        cknna(a, a, 1)
    with pytest.raises(AlignError, match="dim"):
        svcca(a, a, dim=5)
