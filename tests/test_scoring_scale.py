"""Scorers at full-dataset scale, on tiny data: what a fit holds (no float64 or second copy of the
bank), chunked paths equal to one chunk, the CUDA code paths (torch) run on the CPU, and the
device selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitad.core.params import ParamsError
from vitad.scoring import KNNScorer, MahalanobisScorer, gaussian, make_scorer
from vitad.scoring import knn as knn_module
from vitad.scoring.coreset import _greedy_k_center_torch, _lazy_greedy_k_center, greedy_coreset, random_projection
from vitad.scoring.device import knn_backend, resolve_compute_device
from vitad.scoring.knn import _torch_search, exact_search, l2_normalised


def _features(shape, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1, *shape[1:]))
    return (base + 0.5 * rng.standard_normal(shape)).astype(np.float32)


# --- Mahalanobis ---------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"per_position": True, "feature_subset": 20, "shrinkage": "fixed", "ddof": 1},  # full rank: 30 images, 20 dims
    {"per_position": True, "shrinkage": "oas"},  # low rank: 30 images, 48 dims
    {"pca_dims": 8},
    {},
])
def test_gaussian_fit_keeps_float32_state_and_chunking_changes_nothing(settings, monkeypatch):
    train, test = _features((30, 3, 4, 48), seed=1), _features((3, 3, 4, 48), seed=2)
    whole = MahalanobisScorer(**settings).fit(train)
    state = whole.gaussians_
    assert state.factor.dtype == torch.float32
    assert state.train_centered is None or state.train_centered.dtype == torch.float32
    n_gaussians = 12 if settings.get("per_position") else 1
    assert len(state.mean) == n_gaussians
    expected = whole.score_samples(test)
    monkeypatch.setattr(gaussian, "_CHUNK_ELEMENTS", 97)  # many chunks of positions, vectors and queries
    chunked = MahalanobisScorer(**settings).fit(train).score_samples(test)
    np.testing.assert_allclose(chunked, expected, rtol=1e-5)


def test_low_rank_form_is_chosen_when_it_is_the_smaller():
    assert gaussian._low_rank(200, 768) and not gaussian._low_rank(400, 550) and not gaussian._low_rank(1000, 64)
    small = MahalanobisScorer(per_position=True, shrinkage="oas").fit(_features((10, 2, 2, 40)))
    assert small.gaussians_.factor.shape == (4, 10, 10) and small.gaussians_.train_centered.shape == (4, 10, 40)
    large = MahalanobisScorer(per_position=True, shrinkage="oas").fit(_features((30, 2, 2, 12)))
    assert large.gaussians_.factor.shape == (4, 12, 12) and large.gaussians_.train_centered is None


def test_pca_matches_scikit_learn_components():
    from sklearn.decomposition import PCA

    train = _features((40, 2, 2, 16), seed=3)
    fitted = MahalanobisScorer(pca_dims=5).fit(train).pca_
    reference = PCA(n_components=5, svd_solver="covariance_eigh").fit(train.reshape(-1, 16).astype(np.float64))
    # The scatter matrix sums float32 products of centred chunks (in float64): float32 rounding.
    np.testing.assert_allclose(fitted.components_, reference.components_, atol=1e-5)
    np.testing.assert_allclose(fitted.explained_variance_, reference.explained_variance_, rtol=1e-5)


# --- kNN -----------------------------------------------------------------------------------------


def test_euclidean_bank_is_the_training_features_themselves():
    train = _features((6, 2, 2, 8))
    scorer = KNNScorer(metric="euclidean").fit(train)
    assert np.shares_memory(scorer.memory_bank_, train) and scorer.memory_bank_.dtype == np.float32
    assert not hasattr(scorer, "index_")  # no faiss index holding a second copy


def test_cosine_coreset_selects_among_normalised_vectors_without_a_copy():
    train = _features((20, 3, 3, 16), seed=4) * np.linspace(0.5, 3, 20, dtype=np.float32)[:, None, None, None]
    vectors = train.reshape(-1, 16)
    on_normalised = greedy_coreset(l2_normalised(vectors), 0.2, seed=1, projection_dim=8)
    in_place = greedy_coreset(vectors, 0.2, seed=1, projection_dim=8, unit_rows=True)
    np.testing.assert_array_equal(in_place, on_normalised)
    scorer = KNNScorer(metric="cosine", coreset_ratio=0.2, coreset_projection_dim=8, seed=1).fit(train)
    np.testing.assert_allclose(scorer.memory_bank_, l2_normalised(vectors[np.sort(in_place)]), rtol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_torch_search_equals_faiss(metric):
    rng = np.random.default_rng(5)
    bank, queries = rng.standard_normal((300, 16), dtype=np.float32), rng.standard_normal((50, 16), dtype=np.float32)
    if metric == "cosine":
        bank, queries = l2_normalised(bank), l2_normalised(queries)
    expected_values, expected_indices = exact_search(queries, bank, 3, metric, "cpu")
    values, indices = _torch_search(queries, bank, 3, metric, "cpu")
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(values, expected_values, rtol=1e-4, atol=1e-4)


def test_torch_search_in_chunks(monkeypatch):
    monkeypatch.setattr(knn_module, "_TORCH_SEARCH_ELEMENTS", 300 * 7)  # 7 queries per chunk
    rng = np.random.default_rng(6)
    bank, queries = rng.standard_normal((300, 8), dtype=np.float32), rng.standard_normal((50, 8), dtype=np.float32)
    np.testing.assert_array_equal(_torch_search(queries, bank, 2, "euclidean", "cpu")[1],
                                  exact_search(queries, bank, 2, "euclidean")[1])


def test_greedy_on_torch_equals_the_cpu_loop():
    points = random_projection(_features((40, 4, 4, 32), seed=7).reshape(-1, 32), 16, seed=0)
    np.testing.assert_array_equal(_greedy_k_center_torch(points, 60, 5, "cpu"), _lazy_greedy_k_center(points, 60, 5))
    with pytest.raises(ValueError, match="start"):
        greedy_coreset(points, 0.1, seed=0, start=len(points))
    assert greedy_coreset(points, 0.1, seed=0, start=9)[0] == 9


# --- device selection ----------------------------------------------------------------------------


def test_knn_backend_follows_the_device_and_faiss_build():
    assert knn_backend("cpu", 0) == knn_backend("cpu", 2) == "faiss-cpu"
    assert knn_backend("cuda", 1) == "faiss-gpu"
    assert knn_backend("cuda", 0) == "torch"  # faiss-cpu on a GPU machine


def test_compute_device_resolution(monkeypatch):
    assert resolve_compute_device("cpu") == "cpu"
    with pytest.raises(ParamsError, match="extract.device"):
        resolve_compute_device("tpu")
    monkeypatch.setattr("glob.glob", lambda pattern: [])  # no NVIDIA device nodes: torch is not asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch asked without a GPU"))
    assert resolve_compute_device("auto") == "cpu"
    monkeypatch.setattr("glob.glob", lambda pattern: ["/dev/nvidia0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_compute_device("auto") == "cpu"
    with pytest.raises(ParamsError, match="no CUDA device"):
        resolve_compute_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_compute_device("auto") == resolve_compute_device("cuda") == "cuda"


def test_scorers_on_cuda_take_the_torch_paths(monkeypatch):
    """A scorer moved to cuda routes its search, coreset and Gaussians through the device code
    paths; here "cuda" tensors are CPU tensors, so the scores must equal the CPU scorer's."""
    calls = []
    real_search, real_greedy = knn_module._torch_search, _greedy_k_center_torch

    def search_on_cpu(queries, bank, k, metric, device):
        calls.append(("search", device))
        return real_search(queries, bank, k, metric, "cpu")

    def greedy_on_cpu(points, n_select, start, device):
        calls.append(("coreset", device))
        return real_greedy(points, n_select, start, "cpu")

    monkeypatch.setattr(knn_module, "_torch_search", search_on_cpu)
    monkeypatch.setattr("vitad.scoring.coreset._greedy_k_center_torch", greedy_on_cpu)
    monkeypatch.setattr(knn_module.faiss, "get_num_gpus", lambda: 0)
    train, test = _features((8, 3, 3, 16), seed=8), _features((2, 3, 3, 16), seed=9)
    settings = {"metric": "euclidean", "coreset_ratio": 0.3, "reweight_neighbors": 3}
    expected = make_scorer("knn", settings).fit(train).image_scores(test)
    on_cuda = make_scorer("knn", settings).to("cuda").fit(train).image_scores(test)
    assert ("coreset", "cuda") in calls and ("search", "cuda") in calls
    np.testing.assert_allclose(on_cuda[0], expected[0], rtol=1e-5)
    np.testing.assert_allclose(on_cuda[1], expected[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cpu or cuda"):
        KNNScorer().to("tpu")
