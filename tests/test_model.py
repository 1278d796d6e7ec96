"""Fitted models: scorer state saved and restored exactly, the model file, the weights fingerprint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vitad.backbones.base import weights_fingerprint
from vitad.heatmap import anomaly_map
from vitad.core.io import save_arrays
from vitad.serving.model import FittedModel, ModelError, read_model, write_model
from vitad.scoring import make_scorer, restore_scorer

SCORERS = [
    ("knn", {"metric": "cosine", "k": 2, "coreset_ratio": 0.5, "channel_pooling": 6, "few_shot": 5, "seed": 1}),
    ("knn", {"metric": "euclidean", "coreset_ratio": 0.3, "coreset_projection_dim": 4, "reweight_neighbors": 3}),
    ("knn", {"metric": "cosine", "aggregate": "top1pct_mean"}),
    ("mahalanobis", {"per_position": True, "feature_subset": 5, "shrinkage": "fixed", "ddof": 1, "aggregate": "map_max"}),
    ("mahalanobis", {"pca_dims": 4, "shrinkage": "oas"}),
    ("mahalanobis", {"per_position": True, "shrinkage": "ledoit_wolf"}),  # 6 images < 8 dims: the low-rank form
    ("kmeans", {"n_clusters": 3, "seed": 2}),
]


def _map(grid: np.ndarray) -> np.ndarray:
    return anomaly_map(grid, (16, 16), 2.0, 16)


@pytest.mark.parametrize("method, params", SCORERS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(SCORERS)])
def test_a_restored_scorer_scores_exactly_as_the_fitted_one(method, params):
    rng = np.random.default_rng(0)
    train = rng.standard_normal((6, 3, 4, 8)).astype(np.float32)
    test = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
    fitted = make_scorer(method, params).fit(train)
    state = fitted.fitted_state()
    assert all(isinstance(array, np.ndarray) for array in state.values())
    restored = restore_scorer(method, fitted.get_params(), {name: array.copy() for name, array in state.items()})
    for got, expected in zip(restored.image_scores(test, _map), fitted.image_scores(test, _map)):
        np.testing.assert_array_equal(got, expected)


def test_an_unfitted_scorer_has_no_state():
    with pytest.raises(RuntimeError, match="used before fit"):
        make_scorer("knn", {}).fitted_state()


def _model(scorer) -> FittedModel:
    return FittedModel(
        run="r-knn", backbone="r", recipe="knn", method="knn", category="weave", scorer=scorer,
        extractor={"config": {"family": "dinov2"}, "weights": "random", "weights_info": {"mode": "random", "seed": 0,
                   "fingerprint": "sha256:ab"}, "image_size": 16, "grid_size": [3, 4], "patch_dim": 8,
                   "patch_dtype": "float16"},
        sigma=2.0, map_upsample="nearest", colour_scale=(0.1, 0.9), threshold=0.5,
        holdout_scores=np.array([0.25, 0.5], dtype=np.float32), holdout_files=("a.png", "b.png"),
        train_sizes=((64, 64), (64, 80)),
    )


def test_a_model_file_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    scorer = make_scorer("knn", {"coreset_ratio": 0.5}).fit(rng.standard_normal((4, 3, 4, 8)).astype(np.float32))
    model = _model(scorer)
    loaded = read_model(write_model(tmp_path / "m.safetensors", model))
    fields = [field.name for field in dataclasses.fields(FittedModel) if field.name not in ("scorer", "holdout_scores")]
    assert {name: getattr(loaded, name) for name in fields} == {name: getattr(model, name) for name in fields}
    np.testing.assert_array_equal(loaded.holdout_scores, model.holdout_scores)
    test = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    for got, expected in zip(loaded.image_scores(test), model.image_scores(test)):
        np.testing.assert_array_equal(got, expected)


def test_bad_model_files_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="no fitted model there .*dvc repro"):
        read_model(tmp_path / "missing.safetensors")
    save_arrays(tmp_path / "scores.safetensors", {"image_scores": np.zeros(2, np.float32)}, {"run": "r-knn"})
    with pytest.raises(ModelError, match="not a vitad model of format 1 .lacks format, backbone"):
        read_model(tmp_path / "scores.safetensors")


def test_weights_fingerprint_is_the_weights_bit_for_bit_whatever_the_layout():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    fingerprint = weights_fingerprint(model)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64
    assert weights_fingerprint(model.to(memory_format=torch.channels_last)) == fingerprint
    same = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    same.load_state_dict(model.state_dict())
    assert weights_fingerprint(same) == fingerprint
    with torch.no_grad():
        same[0].weight[0, 0, 0, 0] = torch.nextafter(same[0].weight[0, 0, 0, 0], torch.tensor(1.0))
    assert weights_fingerprint(same) != fingerprint
