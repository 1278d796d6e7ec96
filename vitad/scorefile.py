"""Score files: what the score stage writes per (backbone, method, category), read back checked.

``scores/<backbone>-<method>/<category>.safetensors`` holds ``image_scores`` [M],
``patch_scores`` [M, h, w] and ``embedding_scores`` [M] (float32) plus metadata: backbone, method,
category, the scorer params, the weights that produced the features, the patch grid, the model
input size and the test samples in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitad.data import Sample
from vitad.io import load_arrays


class ScoresError(ValueError):
    """A score file is missing, malformed, or disagrees with the dataset or with other score files."""


@dataclass(frozen=True)
class CategoryScores:
    """What the score stage wrote for one (backbone, method, category)."""

    path: Path
    backbone: str
    method: str
    category: str
    weights: dict
    image_scores: np.ndarray  # [M] float32
    patch_scores: np.ndarray  # [M, h, w] float32
    test_samples: list[Sample]

    @property
    def random_weights(self) -> bool:
        return weights_are_random(self.weights)

    @property
    def label(self) -> str:
        return f"{self.backbone} · {self.method}" + (" (random weights)" if self.random_weights else "")


def weights_are_random(weights: dict) -> bool:
    """True when a score file's ``weights`` metadata (the backbone's ``weights_info``, e.g.
    ``{"mode": "random", "seed": 0, ...}``) records random initialisation."""
    mode = weights.get("mode") if isinstance(weights, dict) else None
    if mode not in ("random", "pretrained"):
        raise ScoresError(f"'weights' metadata must be a dict with mode 'random' or 'pretrained', got {weights!r}")
    return mode == "random"


def read_category_scores(path: str | Path, expected_category: str | None = None) -> CategoryScores:
    """Load and check one score file (``scores/<backbone>-<method>/<category>.safetensors``)."""
    path = Path(path)
    arrays, metadata = load_arrays(path)
    missing = [key for key in ("image_scores", "patch_scores") if key not in arrays]
    missing += [key for key in ("backbone", "method", "category", "weights", "test_samples") if key not in metadata]
    if missing:
        raise ScoresError(f"{path}: missing {', '.join(missing)} (written by an older or different score stage?)")
    if expected_category is not None and metadata["category"] != expected_category:
        raise ScoresError(f"{path}: holds category {metadata['category']!r}, expected {expected_category!r}")
    image_scores = arrays["image_scores"].astype(np.float32, copy=False)
    patch_scores = arrays["patch_scores"].astype(np.float32, copy=False)
    test_samples = [Sample.from_dict(record) for record in metadata["test_samples"]]
    if patch_scores.ndim != 3:
        raise ScoresError(f"{path}: patch_scores must be [M, h, w], got shape {patch_scores.shape}")
    if image_scores.shape != (len(test_samples),) or patch_scores.shape[0] != len(test_samples):
        raise ScoresError(
            f"{path}: {len(test_samples)} test_samples but image_scores {image_scores.shape} and "
            f"patch_scores {patch_scores.shape}"
        )
    if not (np.isfinite(image_scores).all() and np.isfinite(patch_scores).all()):
        raise ScoresError(f"{path}: image_scores or patch_scores contain NaN or inf")
    try:
        weights_are_random(metadata["weights"])
    except ScoresError as error:
        raise ScoresError(f"{path}: {error}") from error
    return CategoryScores(
        path=path,
        backbone=metadata["backbone"],
        method=metadata["method"],
        category=metadata["category"],
        weights=metadata["weights"],
        image_scores=image_scores,
        patch_scores=patch_scores,
        test_samples=test_samples,
    )


