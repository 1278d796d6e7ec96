import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.covariance import OAS, LedoitWolf
from sklearn.decomposition import PCA

from vitad.scoring.coreset import coreset_size
from vitad.core.data import Sample
from vitad.featurebank import read_bank, write_bank
from vitad.heatmap import anomaly_map
from vitad.core.io import load_arrays
from vitad.serving.model import read_model
from vitad.core.params import ParamsError
from vitad.scoring import (
    SCORERS,
    KMeansScorer,
    KNNScorer,
    MahalanobisScorer,
    ScoringError,
    aggregate_image_scores,
    few_shot_indices,
    make_scorer,
    score_bank,
)

REPO = Path(__file__).resolve().parents[1]


def _gaussian(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _cosine_knn_brute_force(train, test, k):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    distances = 1.0 - test.astype(np.float64) @ train.T.astype(np.float64)  # [M, N]
    return np.sort(distances, axis=1)[:, :k].mean(axis=1)


# --- aggregation -------------------------------------------------------------------------------


def test_aggregation_rules():
    patch_scores = np.arange(2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16)
    np.testing.assert_array_equal(aggregate_image_scores(patch_scores, "max"), [255, 511])
    # 256 patches: floor(2.56) = 2 highest patches
    np.testing.assert_allclose(aggregate_image_scores(patch_scores, "top1pct_mean"), [254.5, 510.5])
    small = np.array([[[1.0, 5.0], [3.0, 2.0]]], dtype=np.float32)  # 4 patches: at least one
    np.testing.assert_array_equal(aggregate_image_scores(small, "top1pct_mean"), [5.0])
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_image_scores(small, "median")
    with pytest.raises(ValueError, match=r"\[M, h, w\]"):
        aggregate_image_scores(np.zeros((3, 4)), "max")


# --- kNN -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_knn_equals_cosine_brute_force_at_both_levels(k):
    train, test = _gaussian((40, 12), seed=1), _gaussian((9, 12), seed=2)
    scores = KNNScorer(k=k).fit(train).score_samples(test)
    assert scores.shape == (9,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, _cosine_knn_brute_force(train, test, k), atol=1e-5)

    train_patches, test_patches = _gaussian((5, 3, 4, 12), seed=3), _gaussian((2, 3, 4, 12), seed=4)
    patch_scores = KNNScorer(k=k).fit(train_patches).score_samples(test_patches)
    assert patch_scores.shape == (2, 3, 4)
    expected = _cosine_knn_brute_force(train_patches.reshape(-1, 12), test_patches.reshape(-1, 12), k)
    np.testing.assert_allclose(patch_scores.reshape(-1), expected, atol=1e-5)


def _clustered(shape, direction, seed):
    """Vectors near one direction: small noise around ``direction``."""
    return (direction + 0.1 * _gaussian(shape, seed)).astype(np.float32)


@pytest.mark.parametrize(
    "scorer",
    [
        KNNScorer(k=2),
        KNNScorer(coreset_ratio=0.25),
        MahalanobisScorer(),
        MahalanobisScorer(per_position=True),
        MahalanobisScorer(pca_dims=4, shrinkage="oas"),
        KMeansScorer(n_clusters=3),
    ],
    ids=["knn", "knn-coreset", "mahalanobis", "padim", "mahalanobis-pca", "kmeans"],
)
def test_planted_outlier_ranked_first(scorer):
    direction = np.zeros(16, dtype=np.float32)
    direction[0] = 1.0
    train = _clustered((20, 4, 4, 16), direction, seed=5)
    test = _clustered((6, 4, 4, 16), direction, seed=6)
    test[4, 2, 1] = -direction + 0.1 * _gaussian(16, seed=7)  # opposite direction, far in every metric
    patch_scores = scorer.fit(train).score_samples(test)
    assert np.unravel_index(np.argmax(patch_scores), patch_scores.shape) == (4, 2, 1)
    for rule in ("max", "top1pct_mean"):
        assert np.argmax(aggregate_image_scores(patch_scores, rule)) == 4

    image_train = _clustered((30, 16), direction, seed=8)
    image_test = _clustered((5, 16), direction, seed=9)
    image_test[2] = -direction
    assert np.argmax(scorer.fit(image_train).score_samples(image_test)) == 2


def test_knn_zero_vector_scores_distance_one():
    train = _gaussian((10, 6), seed=10)
    scores = KNNScorer().fit(train).score_samples(np.zeros((1, 6), dtype=np.float32))
    np.testing.assert_allclose(scores, [1.0])


def test_euclidean_knn_and_channel_pooling_equal_brute_force_and_torch():
    import torch

    train, test = _gaussian((30, 2, 2, 12), seed=3), _gaussian((4, 2, 2, 12), seed=4)
    scores = KNNScorer(metric="euclidean", k=2).fit(train).score_samples(test)
    distances = np.linalg.norm(test.reshape(-1, 1, 12) - train.reshape(1, -1, 12), axis=2)  # [16, 120]
    np.testing.assert_allclose(scores.ravel(), np.sort(distances, axis=1)[:, :2].mean(axis=1), rtol=1e-5)
    pooling = KNNScorer(metric="euclidean", channel_pooling=5).fit(train)
    expected = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(train.reshape(-1, 1, 12)), 5).numpy()[:, 0]
    np.testing.assert_allclose(pooling.memory_bank_, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ScoringError, match="channel_pooling = 12 must be below the feature dimension 12"):
        KNNScorer(channel_pooling=12).fit(train)


def test_patchcore_image_score_is_anomalibs_reweighting():
    """Paper eq. 7 as anomalib computes it: s* of the worst patch, times 1 - softmax of its
    distances to the b nearest bank vectors of its own nearest bank vector, at that vector."""
    train, test = _gaussian((12, 3, 3, 6), seed=20), _gaussian((3, 3, 3, 6), seed=21)
    scorer = KNNScorer(metric="euclidean", reweight_neighbors=4).fit(train)
    image_scores, patch_scores = scorer.image_scores(test)
    bank = train.reshape(-1, 6).astype(np.float64)
    expected = []
    for image in test.reshape(3, 9, 6).astype(np.float64):
        distances = np.linalg.norm(image[:, None] - bank[None], axis=2)
        worst = distances.min(axis=1).argmax()
        nearest = bank[distances[worst].argmin()]
        support = np.argsort(np.linalg.norm(bank - nearest, axis=1))[:4]
        support_distances = np.linalg.norm(bank[support] - image[worst], axis=1)
        expected.append((1 - np.exp(support_distances[0]) / np.exp(support_distances).sum()) * distances.min(axis=1).max())
    np.testing.assert_allclose(image_scores, expected, rtol=1e-5)
    plain = KNNScorer(metric="euclidean").fit(train).image_scores(test)[0]
    np.testing.assert_allclose(plain, patch_scores.reshape(3, -1).max(axis=1))
    assert (image_scores < plain).all()  # the weight is below 1
    with pytest.raises(ParamsError, match=r"score\.knn\.aggregate must be max when reweight_neighbors = 4"):
        KNNScorer(reweight_neighbors=4, aggregate="top1pct_mean")


def test_map_max_rule_reads_the_blurred_map():
    patch_scores = _gaussian((2, 4, 4), seed=22)
    model_map = lambda grid: anomaly_map(grid, (32, 32), 4, 32)  # noqa: E731
    expected = [anomaly_map(grid, (32, 32), 4, 32).max() for grid in patch_scores]
    np.testing.assert_allclose(aggregate_image_scores(patch_scores, "map_max", model_map), expected)
    assert (aggregate_image_scores(patch_scores, "map_max", model_map) < patch_scores.reshape(2, -1).max(axis=1)).all()  # blurred
    with pytest.raises(ValueError, match="needs the run's model_map"):
        aggregate_image_scores(patch_scores, "map_max")


def test_knn_needs_k_training_vectors():
    with pytest.raises(ScoringError, match=r"3 training vectors but score\.knn\.k = 5"):
        KNNScorer(k=5).fit(_gaussian((3, 4)))
    with pytest.raises(ScoringError, match="after the coreset.*coreset_ratio"):
        KNNScorer(k=5, coreset_ratio=0.1).fit(_gaussian((2, 2, 2, 4)))


def test_padim_unbiased_covariance_and_feature_subset():
    """PaDiM (anomalib): per position, a random subset of dims, covariance / (n - 1) + 0.01 I."""
    train, test = _gaussian((9, 2, 2, 10), seed=23), _gaussian((2, 2, 2, 10), seed=24)
    scorer = MahalanobisScorer(shrinkage="fixed", epsilon=0.01, ddof=1, per_position=True, feature_subset=4, seed=3)
    scores = scorer.fit(train).score_samples(test)
    dims = scorer.dimensions_
    assert len(dims) == 4 and len(set(dims)) == 4
    for row in range(2):
        for column in range(2):
            samples = train[:, row, column, dims].astype(np.float64)
            inverse = np.linalg.inv(np.cov(samples, rowvar=False) + 0.01 * np.eye(4))
            delta = test[:, row, column, dims] - samples.mean(axis=0)
            expected = np.sqrt(np.einsum("md,de,me->m", delta, inverse, delta))
            np.testing.assert_allclose(scores[:, row, column], expected, rtol=1e-5)
    with pytest.raises(ParamsError, match=r"score\.mahalanobis\.ddof must be 0 unless shrinkage is fixed"):
        MahalanobisScorer(ddof=1)
    listed = MahalanobisScorer(shrinkage="fixed", ddof=1, per_position=True, feature_subset=[int(d) for d in dims[::-1]])
    np.testing.assert_allclose(listed.fit(train).score_samples(test), scores, rtol=1e-6)  # the dims given, any order
    with pytest.raises(ParamsError, match=r"feature_subset must be an integer >= 1, a list of distinct"):
        MahalanobisScorer(feature_subset=[1, 1])
    with pytest.raises(ScoringError, match="lists dimension 10, but the features have 10"):
        MahalanobisScorer(feature_subset=[0, 10]).fit(train)


def test_knn_coreset_shrinks_bank_and_only_raises_distances():
    train, test = _gaussian((10, 4, 4, 8), seed=11), _gaussian((3, 4, 4, 8), seed=12)
    full = KNNScorer().fit(train)
    reduced = KNNScorer(coreset_ratio=0.25).fit(train)
    assert len(full.memory_bank_) == 160 and len(reduced.memory_bank_) == coreset_size(160, 0.25) == 40
    # The coreset is a subset of the bank: the nearest neighbour can only be farther away.
    assert np.all(reduced.score_samples(test) >= full.score_samples(test) - 1e-6)
    np.testing.assert_array_equal(reduced.score_samples(test), KNNScorer(coreset_ratio=0.25).fit(train).score_samples(test))
    # Image-level banks are kept whole.
    assert len(KNNScorer(coreset_ratio=0.25).fit(train[:, 0, 0]).memory_bank_) == 10


def test_few_shot_draws_seeded_random_training_images():
    """AnomalyDINO samples its reference images: a seeded draw, not the first n files."""
    train, test = _gaussian((8, 2, 2, 6), seed=13), _gaussian((3, 2, 2, 6), seed=14)
    drawn = few_shot_indices(8, 2, seed=5)
    assert len(drawn) == 2 and len(set(drawn)) == 2 and list(drawn) == sorted(drawn)
    assert list(drawn) == list(few_shot_indices(8, 2, seed=5))
    assert {tuple(few_shot_indices(8, 2, seed)) for seed in range(10)} != {(0, 1)}  # not the first files
    scorer = KNNScorer(few_shot=2, seed=5).fit(train)
    np.testing.assert_array_equal(scorer.train_indices_, drawn)
    np.testing.assert_array_equal(scorer.score_samples(test), KNNScorer().fit(train[drawn]).score_samples(test))
    np.testing.assert_array_equal(few_shot_indices(8, None, seed=5), np.arange(8))
    with pytest.raises(ScoringError, match=r"score\.knn\.few_shot = 9 but there are only 8"):
        KNNScorer(few_shot=9).fit(train)


# --- Mahalanobis ---------------------------------------------------------------------------------


def _mahalanobis_numpy(train, test, epsilon):
    """Direct definition: sqrt((x - m)ᵀ (S + eps I)⁻¹ (x - m)), S the ML covariance."""
    mean = train.astype(np.float64).mean(axis=0)
    covariance = np.cov(train.astype(np.float64), rowvar=False, bias=True) + epsilon * np.eye(train.shape[1])
    centered = test.astype(np.float64) - mean
    return np.sqrt(np.einsum("md,de,me->m", centered, np.linalg.inv(covariance), centered))


@pytest.mark.parametrize("n_train", [60, 12], ids=["n>d (covariance)", "n<d (Woodbury)"])
def test_mahalanobis_fixed_epsilon_equals_numpy(n_train):
    train, test = _gaussian((n_train, 20), seed=15, scale=2.0), _gaussian((7, 20), seed=16, scale=2.0)
    scores = MahalanobisScorer(shrinkage="fixed", epsilon=0.05).fit(train).score_samples(test)
    np.testing.assert_allclose(scores, _mahalanobis_numpy(train, test, 0.05), rtol=1e-5)


@pytest.mark.parametrize("n_train", [60, 12], ids=["n>d", "n<d"])
@pytest.mark.parametrize("shrinkage,estimator", [("ledoit_wolf", LedoitWolf), ("oas", OAS)])
def test_mahalanobis_shrinkage_equals_scikit_learn(n_train, shrinkage, estimator):
    train, test = _gaussian((n_train, 20), seed=17), _gaussian((7, 20), seed=18)
    train[:, 3] *= 10  # anisotropic, so the shrinkage coefficient matters
    reference = np.sqrt(estimator().fit(train.astype(np.float64)).mahalanobis(test.astype(np.float64)))
    scores = MahalanobisScorer(shrinkage=shrinkage).fit(train).score_samples(test)
    np.testing.assert_allclose(scores, reference, rtol=1e-5)


@pytest.mark.parametrize("n_train", [30, 8], ids=["n>d", "n<d"])
def test_per_position_equals_one_ledoit_wolf_per_position(n_train):
    train, test = _gaussian((n_train, 2, 3, 10), seed=19), _gaussian((4, 2, 3, 10), seed=20)
    train[:, 1, 2] *= 5  # positions differ
    scores = MahalanobisScorer(per_position=True).fit(train).score_samples(test)
    assert scores.shape == (4, 2, 3)
    for row in range(2):
        for column in range(3):
            fitted = LedoitWolf().fit(train[:, row, column].astype(np.float64))
            expected = np.sqrt(fitted.mahalanobis(test[:, row, column].astype(np.float64)))
            np.testing.assert_allclose(scores[:, row, column], expected, rtol=1e-5)


def test_shared_patch_gaussian_and_pca_equal_scikit_learn():
    train, test = _gaussian((10, 3, 3, 16), seed=21), _gaussian((2, 3, 3, 16), seed=22)
    train_flat = train.reshape(-1, 16).astype(np.float64)
    pca = PCA(n_components=5).fit(train_flat)
    fitted = LedoitWolf().fit(pca.transform(train_flat))
    expected = np.sqrt(fitted.mahalanobis(pca.transform(test.reshape(-1, 16).astype(np.float64)))).reshape(2, 3, 3)
    scores = MahalanobisScorer(pca_dims=5).fit(train).score_samples(test)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    with pytest.raises(ScoringError, match=r"score\.mahalanobis\.pca_dims = 17"):
        MahalanobisScorer(pca_dims=17).fit(train)


def test_degenerate_covariance_is_an_error_or_the_documented_epsilon():
    constant = np.ones((20, 8), dtype=np.float32)
    test = _gaussian((3, 8), seed=23)
    for scorer in (MahalanobisScorer(), MahalanobisScorer(shrinkage="oas"), MahalanobisScorer(per_position=True)):
        with pytest.raises(ScoringError, match="degenerate covariance"):
            scorer.fit(constant if scorer.per_position is False else constant.reshape(5, 2, 2, 8))
    # fixed epsilon regularises: Σ = ε I, distance |x - m| / sqrt(ε)
    scores = MahalanobisScorer(shrinkage="fixed", epsilon=0.25).fit(constant).score_samples(test)
    np.testing.assert_allclose(scores, np.linalg.norm(test - 1.0, axis=1) / 0.5, rtol=1e-5)
    # no shrinkage with fewer vectors than dimensions: singular
    with pytest.raises(ScoringError, match="degenerate covariance"):
        MahalanobisScorer(shrinkage="fixed", epsilon=0.0).fit(_gaussian((5, 8)))


def test_per_position_needs_the_fitted_grid():
    scorer = MahalanobisScorer(per_position=True).fit(_gaussian((12, 2, 2, 4)))
    with pytest.raises(ScoringError, match="2x2 patch grid, test grid is 3x2"):
        scorer.score_samples(_gaussian((1, 3, 2, 4)))


# --- KMeans --------------------------------------------------------------------------------------


def test_kmeans_is_distance_to_nearest_centroid():
    train, test = _gaussian((50, 6), seed=24), _gaussian((5, 6), seed=25)
    scorer = KMeansScorer(n_clusters=4, seed=1).fit(train)
    centroids = scorer.kmeans_.cluster_centers_
    expected = np.linalg.norm(test[:, None, :] - centroids[None], axis=2).min(axis=1)
    np.testing.assert_allclose(scorer.score_samples(test), expected, rtol=1e-5)
    np.testing.assert_array_equal(scorer.score_samples(test), KMeansScorer(n_clusters=4, seed=1).fit(train).score_samples(test))
    with pytest.raises(ScoringError, match=r"3 training vectors but score\.kmeans\.n_clusters = 4"):
        KMeansScorer(n_clusters=4).fit(train[:3])


# --- bad input and parameters ----------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_non_finite_and_empty_features_are_errors(method):
    train = _gaussian((20, 8))
    bad = train.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ScoringError, match="training features contain 1 NaN/inf"):
        make_scorer(method, {}).fit(bad)
    scorer = make_scorer(method, {}).fit(train)
    with pytest.raises(ScoringError, match="test features contain 2 NaN/inf"):
        scorer.score_samples(np.where(np.arange(8) == 0, np.inf, train[:2]))
    with pytest.raises(ScoringError, match="training features are empty"):
        make_scorer(method, {}).fit(np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(ScoringError, match="do not match"):
        scorer.score_samples(_gaussian((1, 2, 2, 8)))
    with pytest.raises(ScoringError, match="do not match"):
        scorer.score_samples(_gaussian((1, 7)))


@pytest.mark.parametrize(
    "method,params,key",
    [
        ("knn", {"k": 0}, "score.knn.k"),
        ("knn", {"k": True}, "score.knn.k"),
        ("knn", {"coreset_ratio": 0.0}, "score.knn.coreset_ratio"),
        ("knn", {"coreset_ratio": 1.5}, "score.knn.coreset_ratio"),
        ("knn", {"few_shot": 0}, "score.knn.few_shot"),
        ("knn", {"aggregate": "median"}, "score.knn.aggregate"),
        ("knn", {"neighbours": 3}, "score.knn.neighbours"),
        ("mahalanobis", {"shrinkage": "graphical_lasso"}, "score.mahalanobis.shrinkage"),
        ("mahalanobis", {"epsilon": -1.0}, "score.mahalanobis.epsilon"),
        ("mahalanobis", {"pca_dims": 0}, "score.mahalanobis.pca_dims"),
        ("mahalanobis", {"per_position": "yes"}, "score.mahalanobis.per_position"),
        ("kmeans", {"n_clusters": 2.5}, "score.kmeans.n_clusters"),
    ],
)
def test_bad_params_name_their_key(method, params, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        make_scorer(method, params)


def test_unknown_method_and_defaults():
    with pytest.raises(ParamsError, match="unknown scoring method 'lof'"):
        make_scorer("lof", {})
    assert make_scorer("knn", None).get_params() == {
        "k": 1, "metric": "cosine", "coreset_ratio": 1.0, "coreset_projection_dim": 128, "reweight_neighbors": 1,
        "channel_pooling": None, "seed": 0, "aggregate": "max", "few_shot": None,
    }


# --- bank scoring and the stage --------------------------------------------------------------------


def _write_bank(path: Path, category: str, seed: int, poison: bool = False) -> None:
    direction = np.zeros(16, dtype=np.float32)
    direction[0] = 1.0
    train_patches = _clustered((6, 3, 3, 16), direction, seed)
    test_patches = _clustered((3, 3, 3, 16), direction, seed + 1)
    test_patches[1, 0, 2] = -direction
    if poison:
        train_patches[0, 0, 0, 0] = np.inf
    train = [Sample(category, "train", "good", f"{category}/train/good/{i:03d}.png", None, (32, 32)) for i in range(6)]
    test = [
        Sample(category, "test", "good", f"{category}/test/good/000.png", None, (32, 32)),
        Sample(category, "test", "crack", f"{category}/test/crack/000.png", f"{category}/ground_truth/crack/000_mask.png", (32, 32)),
        Sample(category, "test", "good", f"{category}/test/good/001.png", None, (32, 32)),
    ]
    write_bank(
        path,
        train_embeddings=train_patches.mean(axis=(1, 2)),
        train_patches=train_patches,
        test_embeddings=test_patches.mean(axis=(1, 2)),
        test_patches=test_patches,
        train_samples=train,
        test_samples=test,
        info={
            "backbone": "tiny", "category": category, "config": {}, "weights": "random",
            "weights_info": {"mode": "random", "seed": 0}, "grid_size": [3, 3], "image_size": 42,
            "patch_dtype": "float32",
        },
    )


def test_score_bank_both_routes(tmp_path):
    _write_bank(tmp_path / "weave.safetensors", "weave", seed=30)
    bank = read_bank(tmp_path / "weave.safetensors")
    scores = score_bank(bank, "knn", {"k": 2, "aggregate": "top1pct_mean"}, {"k": 2}, source="weave.safetensors")
    assert scores.patch_scores.shape == (3, 3, 3) and scores.embedding_scores.shape == (3,)
    np.testing.assert_array_equal(scores.image_scores, aggregate_image_scores(scores.patch_scores, "top1pct_mean"))
    assert np.argmax(scores.image_scores) == 1
    np.testing.assert_allclose(
        scores.embedding_scores, _cosine_knn_brute_force(bank.train_embeddings, bank.test_embeddings, 2), atol=1e-5
    )
    assert scores.params["k"] == 2 and scores.params["coreset_ratio"] == 1.0


def _run_stage(tmp_path, section, categories=("weave", "mesh"), method="knn"):
    spec = importlib.util.spec_from_file_location("score_stage", REPO / "stages" / "score.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    params_path = tmp_path / "params.yaml"
    params = {
        "data": {"categories": list(categories)},
        "pipeline": {"backbones": ["tiny"], "runs": {f"tiny-{method}": {"backbone": "tiny", "recipe": method}}},
        "score": {method: {"method": method, **section}},
        "heatmap": {"sigma": 4},
    }
    params_path.write_text(yaml.safe_dump(params))
    stage.main([
        "--run", f"tiny-{method}", "--featurebanks", str(tmp_path / "banks"),
        "--out", str(tmp_path / "scores"), "--models", str(tmp_path / "models"), "--params", str(params_path),
    ])


def test_score_stage_writes_scores_with_metadata(tmp_path, capsys):
    _write_bank(tmp_path / "banks" / "weave.safetensors", "weave", seed=31)
    _write_bank(tmp_path / "banks" / "mesh.safetensors", "mesh", seed=32)
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "dropped.safetensors").write_bytes(b"stale")
    _run_stage(tmp_path, {"k": 1, "aggregate": "max", "coreset_ratio": 0.5, "few_shot": None})
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["mesh.safetensors", "weave.safetensors"]
    arrays, metadata = load_arrays(tmp_path / "scores" / "weave.safetensors")
    assert {name: (a.shape, a.dtype) for name, a in arrays.items()} == {
        "image_scores": ((3,), np.float32), "patch_scores": ((3, 3, 3), np.float32), "embedding_scores": ((3,), np.float32),
    }
    assert np.argmax(arrays["image_scores"]) == 1
    assert metadata["run"] == "tiny-knn" and metadata["recipe"] == "knn" and metadata["sigma"] == 4
    assert metadata["backbone"] == "tiny" and metadata["method"] == "knn" and metadata["category"] == "weave"
    assert metadata["params"] == {
        "k": 1, "metric": "cosine", "aggregate": "max", "coreset_ratio": 0.5, "coreset_projection_dim": 128,
        "reweight_neighbors": 1, "channel_pooling": None, "few_shot": None, "seed": 0,
    }
    assert metadata["embedding_params"]["k"] == 1 and metadata["embedding_params"]["coreset_ratio"] == 1.0  # patch-only: default
    assert metadata["weights"] == {"mode": "random", "seed": 0} and metadata["grid"] == [3, 3]
    assert [Sample.from_dict(s).defect for s in metadata["test_samples"]] == ["good", "crack", "good"]
    assert "weave: fit" in capsys.readouterr().out
    model = read_model(tmp_path / "models" / "weave.safetensors")
    assert (model.run, model.category, model.scorer.get_params()) == ("tiny-knn", "weave", metadata["params"])
    assert model.extractor["weights_info"] == metadata["weights"] and model.extractor["patch_dim"] == 16
    assert model.threshold == float(model.holdout_scores.max()) and len(model.holdout_scores) == 6
    _, expected_patch_scores = model.image_scores(read_bank(tmp_path / "banks" / "weave.safetensors").test_patches)
    np.testing.assert_array_equal(expected_patch_scores, arrays["patch_scores"])
    first = [(tmp_path / folder / "weave.safetensors").read_bytes() for folder in ("scores", "models")]
    _run_stage(tmp_path, {"k": 1, "aggregate": "max", "coreset_ratio": 0.5, "few_shot": None})
    assert [(tmp_path / folder / "weave.safetensors").read_bytes() for folder in ("scores", "models")] == first  # deterministic


def test_score_stage_errors_name_the_bank_or_key(tmp_path):
    _write_bank(tmp_path / "banks" / "weave.safetensors", "weave", seed=33)
    with pytest.raises(ParamsError, match=r"score\.knn\.k"):
        _run_stage(tmp_path, {"k": -1}, categories=("weave",))
    with pytest.raises(ScoringError, match=r"weave\.safetensors: patch level: 54 training vectors but score\.knn\.k = 60"):
        _run_stage(tmp_path, {"k": 60}, categories=("weave",))
    with pytest.raises(FileNotFoundError, match="mesh.safetensors"):
        _run_stage(tmp_path, {}, categories=("weave", "mesh"))
