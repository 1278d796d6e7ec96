import numpy as np
import pytest

from vitad.scoring import coreset
from vitad.scoring.coreset import coreset_size, greedy_coreset, random_projection


def _assert_greedy_k_center(points: np.ndarray, selected: np.ndarray) -> None:
    """Every selected point after the first is a farthest point from those selected before it."""
    squared_norms = (points.astype(np.float64) ** 2).sum(axis=1)
    points64 = points.astype(np.float64)
    min_sq = squared_norms + squared_norms[selected[0]] - 2 * points64 @ points64[selected[0]]
    for step, index in enumerate(selected[1:], start=1):
        tolerance = 1e-4 * max(1.0, float(min_sq.max()))
        assert min_sq[index] >= min_sq.max() - tolerance, f"step {step} did not take a farthest point"
        min_sq = np.minimum(min_sq, squared_norms + squared_norms[index] - 2 * points64 @ points64[index])


def test_ratio_one_keeps_everything_in_order():
    vectors = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    np.testing.assert_array_equal(greedy_coreset(vectors, 1.0, seed=0), np.arange(50))


def test_size_uniqueness_and_determinism():
    vectors = np.random.default_rng(1).standard_normal((1000, 16)).astype(np.float32)
    first = greedy_coreset(vectors, 0.1, seed=3)
    assert first.dtype == np.int64 and len(first) == coreset_size(1000, 0.1) == 100
    assert len(np.unique(first)) == 100 and first.min() >= 0 and first.max() < 1000
    np.testing.assert_array_equal(first, greedy_coreset(vectors, 0.1, seed=3))
    assert not np.array_equal(first, greedy_coreset(vectors, 0.1, seed=4))


def test_matches_the_textbook_greedy_without_projection():
    # 16 dims <= projection_dim: distances are the original ones. 700 points span three blocks,
    # the last one padded, so the block-lazy bookkeeping is exercised.
    vectors = np.random.default_rng(2).standard_normal((700, 16)).astype(np.float32)
    selected = greedy_coreset(vectors, 0.2, seed=0)
    _assert_greedy_k_center(vectors, selected)


def test_greedy_runs_on_the_seeded_random_projection():
    vectors = np.random.default_rng(3).standard_normal((600, 256)).astype(np.float32)
    selected = greedy_coreset(vectors, 0.1, seed=5, projection_dim=32)
    projected = random_projection(vectors, 32, seed=5)
    assert projected.shape == (600, 32)
    _assert_greedy_k_center(projected, selected)


def test_one_point_per_well_separated_cluster():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((10, 64)) * 100
    labels = np.repeat(np.arange(10), 80)
    vectors = (centres[labels] + rng.standard_normal((800, 64))).astype(np.float32)
    selected = greedy_coreset(vectors, 10 / 800, seed=0)
    assert sorted(labels[selected]) == list(range(10))


def test_duplicates_never_selected_twice():
    vectors = np.ones((300, 4), dtype=np.float32)
    selected = greedy_coreset(vectors, 0.5, seed=0)
    assert len(np.unique(selected)) == len(selected) == 150


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        greedy_coreset(np.zeros((10, 3), dtype=np.float32), ratio, seed=0)


def test_bad_vectors():
    with pytest.raises(ValueError, match="NaN or inf"):
        greedy_coreset(np.array([[0.0, np.nan]], dtype=np.float32), 0.5, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        greedy_coreset(np.zeros((0, 3), dtype=np.float32), 0.5, seed=0)


def test_ball_tree_pruning_keeps_the_greedy_selection(monkeypatch):
    # Clustered points in several blocks, ordered and pruned as a large bank would be.
    rng = np.random.default_rng(6)
    centres = rng.standard_normal((12, 16)) * 5
    vectors = (centres[rng.integers(12, size=1500)] + rng.standard_normal((1500, 16))).astype(np.float32)
    plain = greedy_coreset(vectors, 0.1, seed=2)
    monkeypatch.setattr(coreset, "_PRUNE_MIN_BLOCKS", 1)
    pruned = greedy_coreset(vectors, 0.1, seed=2)
    _assert_greedy_k_center(vectors, pruned)
    np.testing.assert_array_equal(pruned, plain)
    order = coreset._ball_tree_order(vectors)
    np.testing.assert_array_equal(np.sort(order), np.arange(1500))
