"""Score files: what the score stage writes per (backbone, method, category), read back checked.

``scores/<run>/<category>.safetensors`` holds ``image_scores`` [M], ``patch_scores`` [M, h, w]
and ``embedding_scores`` [M] (float32) plus metadata: run, backbone, recipe, method, category,
the scorer params of both routes, the heatmap ``sigma`` (pixels at the model input) and
``map_upsample``, the weights
that produced the features, the patch grid, the model input size and the test samples in order.
Everything that turns these scores into anomaly maps (sigma, model size) travels with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitad.core.data import Sample
from vitad.core.errors import InputError
from vitad.heatmap import UPSAMPLING, anomaly_map
from vitad.core.io import load_arrays, save_arrays


METADATA_KEYS = (
    "run", "backbone", "recipe", "method", "category", "weights", "sigma", "map_upsample", "image_size", "test_samples",
)


class ScoresError(InputError):
    """A score file is missing, malformed, or disagrees with the dataset or with other score files."""


@dataclass(frozen=True)
class CategoryScores:
    """What the score stage wrote for one (backbone, method, category)."""

    path: Path
    run: str
    backbone: str
    recipe: str
    method: str
    category: str
    weights: dict
    sigma: float  # heatmap blur, pixels at the model input
    map_upsample: str  # bilinear | nearest: how patch grids become maps
    image_size: int  # model input side
    image_scores: np.ndarray  # [M] float32
    patch_scores: np.ndarray  # [M, h, w] float32
    embedding_scores: np.ndarray  # [M] float32
    test_samples: list[Sample]

    def anomaly_map(self, index: int, output_size: tuple[int, int]) -> np.ndarray:
        """Anomaly map [H, W] of test image ``index`` at ``output_size`` (:func:`vitad.heatmap.anomaly_map`
        with this run's sigma)."""
        return anomaly_map(self.patch_scores[index], output_size, self.sigma, self.image_size, self.map_upsample)

    def model_map(self, patch_scores: np.ndarray) -> np.ndarray:
        """This run's anomaly map of a patch grid [h, w] at the model input (for ``map_max``)."""
        return anomaly_map(patch_scores, (self.image_size, self.image_size), self.sigma, self.image_size, self.map_upsample)

    @property
    def random_weights(self) -> bool:
        return weights_are_random(self.weights)

    @property
    def label(self) -> str:
        return f"{self.run}" + (" (random weights)" if self.random_weights else " (pretrained)")


def weights_are_random(weights: dict) -> bool:
    """True when a score file's ``weights`` metadata (the backbone's ``weights_info``, e.g.
    ``{"mode": "random", "seed": 0, ...}``) records random initialisation."""
    mode = weights.get("mode") if isinstance(weights, dict) else None
    if mode not in ("random", "pretrained"):
        raise ScoresError(f"'weights' metadata must be a dict with mode 'random' or 'pretrained', got {weights!r}")
    return mode == "random"


def read_category_scores(path: str | Path, expected_category: str | None = None) -> CategoryScores:
    """Load and check one score file (``scores/<run>/<category>.safetensors``)."""
    path = Path(path)
    arrays, metadata = load_arrays(path)
    missing = [key for key in ("image_scores", "patch_scores", "embedding_scores") if key not in arrays]
    missing += [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ScoresError(f"{path}: missing {', '.join(missing)} (written by an older or different score stage?)")
    if expected_category is not None and metadata["category"] != expected_category:
        raise ScoresError(f"{path}: holds category {metadata['category']!r}, expected {expected_category!r}")
    sigma, image_size = metadata["sigma"], metadata["image_size"]
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
        raise ScoresError(f"{path}: sigma must be a number >= 0, got {sigma!r}")
    if metadata["map_upsample"] not in UPSAMPLING:
        raise ScoresError(f"{path}: map_upsample must be one of {', '.join(UPSAMPLING)}, got {metadata['map_upsample']!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ScoresError(f"{path}: image_size must be a positive integer, got {image_size!r}")
    image_scores = arrays["image_scores"].astype(np.float32, copy=False)
    embedding_scores = arrays["embedding_scores"].astype(np.float32, copy=False)
    patch_scores = arrays["patch_scores"].astype(np.float32, copy=False)
    test_samples = [Sample.from_dict(record) for record in metadata["test_samples"]]
    if patch_scores.ndim != 3:
        raise ScoresError(f"{path}: patch_scores must be [M, h, w], got shape {patch_scores.shape}")
    count = (len(test_samples),)
    if image_scores.shape != count or embedding_scores.shape != count or patch_scores.shape[0] != len(test_samples):
        raise ScoresError(
            f"{path}: {len(test_samples)} test_samples but image_scores {image_scores.shape}, embedding_scores "
            f"{embedding_scores.shape} and patch_scores {patch_scores.shape}"
        )
    if not all(np.isfinite(array).all() for array in (image_scores, patch_scores, embedding_scores)):
        raise ScoresError(f"{path}: image_scores, patch_scores or embedding_scores contain NaN or inf")
    try:
        weights_are_random(metadata["weights"])
    except ScoresError as error:
        raise ScoresError(f"{path}: {error}") from error
    return CategoryScores(
        path=path,
        run=metadata["run"],
        backbone=metadata["backbone"],
        recipe=metadata["recipe"],
        method=metadata["method"],
        category=metadata["category"],
        weights=metadata["weights"],
        sigma=float(sigma),
        map_upsample=metadata["map_upsample"],
        image_size=image_size,
        image_scores=image_scores,
        patch_scores=patch_scores,
        embedding_scores=embedding_scores,
        test_samples=test_samples,
    )




def write_category_scores(path: str | Path, spec, category: str, bank, scores) -> Path:
    """Write what the score stage computed for one category: ``spec`` a
    :class:`vitad.runs.RunSpec`, ``bank`` the :class:`vitad.featurebank.FeatureBank` scored,
    ``scores`` its :class:`vitad.scoring.BankScores`. Returns ``path``."""
    metadata = {
        "run": spec.name,
        "backbone": spec.backbone,
        "recipe": spec.recipe,
        "method": spec.method,
        "category": category,
        "params": scores.params,
        "embedding_params": scores.embedding_params,
        "sigma": spec.sigma,
        "map_upsample": spec.map_upsample,
        "weights": bank.info["weights_info"],
        "grid": list(bank.grid_size),
        "image_size": bank.info["image_size"],
        "test_samples": [sample.to_dict() for sample in bank.test_samples],
    }
    arrays = {
        "image_scores": scores.image_scores,
        "patch_scores": scores.patch_scores,
        "embedding_scores": scores.embedding_scores,
    }
    save_arrays(path, arrays, metadata)
    return Path(path)
