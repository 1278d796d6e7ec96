"""Fitted models: what scoring a new image needs, per run and category, and nothing else.

The score stage writes ``models/<run>/<category>.safetensors`` next to its scores; ``vitad
predict`` and the web demo load it without the feature banks and without re-fitting. One
safetensors file: the fitted patch-level scorer's arrays (the memory bank after the coreset, or
the Gaussians' parameters; :meth:`vitad.scoring.Scorer.fitted_state`) prefixed ``scorer.``, plus
JSON metadata:

- ``run``, ``backbone``, ``recipe``, ``method``, ``category`` and the scorer's ``params`` (they
  hold the image-score rule: ``aggregate``, ``reweight_neighbors``);
- ``extractor``: the backbone's params entry, the weights switch, the weights that produced the
  features (``weights_info``, with the weights ``fingerprint``), model input size, patch grid
  and feature dimension, and the dtype the patch features were stored in (new features are
  rounded to it, as the training features were);
- ``sigma`` (pixels at the model input) and ``map_upsample``: patch grid -> anomaly map;
- ``colour_scale``: the (vmin, vmax) of the pipeline's heatmap figures for this run and category;
- ``threshold``: calibrated on held-out training images (:mod:`vitad.serving.calibration`), with the
  held-out images' scores and files; null when there are fewer than 2 training images;
- ``train_sizes``: the training images' (height, width), to flag new images of another size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitad.serving.calibration import calibrated_threshold, holdout_image_scores
from vitad.core.cli import StageError
from vitad.heatmap import UPSAMPLING, anomaly_map, colour_scale
from vitad.core.io import load_arrays, save_arrays
from vitad.scoring import SCORERS, Scorer, ScoringError, restore_scorer

MODEL_FORMAT = 1
_SCORER_PREFIX = "scorer."
METADATA_KEYS = (
    "format", "run", "backbone", "recipe", "method", "category", "params", "extractor", "sigma", "map_upsample",
    "colour_scale", "threshold", "holdout_scores", "holdout_files", "train_sizes",
)
EXTRACTOR_KEYS = ("config", "weights", "weights_info", "image_size", "grid_size", "patch_dim", "patch_dtype")


class ModelError(StageError):
    """A fitted model file is missing, malformed, or cannot serve with the weights available."""


def model_path(root: str | Path, run: str, category: str) -> Path:
    """``<root>/models/<run>/<category>.safetensors``, where the score stage writes it."""
    return Path(root) / "models" / run / f"{category}.safetensors"


@dataclass(frozen=True)
class FittedModel:
    """One run's fitted detector for one category (see the module docstring)."""

    run: str
    backbone: str
    recipe: str
    method: str
    category: str
    scorer: Scorer  # fitted, patch level
    extractor: dict  # EXTRACTOR_KEYS
    sigma: float
    map_upsample: str
    colour_scale: tuple[float, float]
    threshold: float | None
    holdout_scores: np.ndarray  # [C] float32
    holdout_files: tuple[str, ...]  # [C] the held-out training images
    train_sizes: tuple[tuple[int, int], ...]  # (height, width)

    @property
    def image_size(self) -> int:
        return self.extractor["image_size"]

    @property
    def weights_info(self) -> dict:
        return self.extractor["weights_info"]

    @property
    def random_weights(self) -> bool:
        return self.weights_info.get("mode") == "random"

    def anomaly_map(self, patch_scores: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
        """The run's anomaly map of one patch grid [h, w] at ``output_size`` (height, width)."""
        return anomaly_map(patch_scores, output_size, self.sigma, self.image_size, self.map_upsample)

    def model_map(self, patch_scores: np.ndarray) -> np.ndarray:
        """The anomaly map at the model input (for the ``map_max`` image-score rule)."""
        return self.anomaly_map(patch_scores, (self.image_size, self.image_size))

    def image_scores(self, patch_grids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image scores [M], patch scores [M, h, w]) of patch features [M, h, w, D] (float32)."""
        return self.scorer.image_scores(patch_grids, self.model_map)


def fit_model(spec, category: str, bank, scores) -> FittedModel:
    """The fitted model of ``spec`` (a :class:`vitad.runs.RunSpec`) for ``category``, from the
    :class:`vitad.featurebank.FeatureBank` it was scored on and its
    :class:`vitad.scoring.BankScores`: the fitted scorer as is, the threshold calibrated on
    held-out training images (fits of the scorer without them), the colour scale of the test
    scores' figures."""
    model_map = spec.model_map(bank.info["image_size"])
    if len(bank.train_patches) >= 2 or scores.params.get("few_shot") is not None:
        indices, holdout_scores = holdout_image_scores(spec.method, scores.params, bank.train_patches, model_map=model_map)
        threshold = calibrated_threshold(holdout_scores) if len(holdout_scores) else None
    else:
        indices, holdout_scores, threshold = np.arange(0), np.zeros(0, dtype=np.float32), None
    info = bank.info
    return FittedModel(
        run=spec.name,
        backbone=spec.backbone,
        recipe=spec.recipe,
        method=spec.method,
        category=category,
        scorer=scores.patch_scorer,
        extractor={
            "config": info["config"],
            "weights": info["weights"],
            "weights_info": info["weights_info"],
            "image_size": info["image_size"],
            "grid_size": list(info["grid_size"]),
            "patch_dim": int(bank.train_patches.shape[-1]),
            "patch_dtype": info["patch_dtype"],
        },
        sigma=spec.sigma,
        map_upsample=spec.map_upsample,
        colour_scale=colour_scale(scores.patch_scores),
        threshold=threshold,
        holdout_scores=np.asarray(holdout_scores, dtype=np.float32),
        holdout_files=tuple(bank.train_samples[index].image_path for index in indices),
        train_sizes=tuple(sorted({tuple(sample.original_size) for sample in bank.train_samples})),
    )


def write_model(path: str | Path, model: FittedModel) -> Path:
    """Write ``model`` atomically to ``path`` (safetensors); returns ``path``."""
    arrays = {f"{_SCORER_PREFIX}{name}": array for name, array in model.scorer.fitted_state().items()}
    metadata = {
        "format": MODEL_FORMAT,
        "run": model.run,
        "backbone": model.backbone,
        "recipe": model.recipe,
        "method": model.method,
        "category": model.category,
        "params": model.scorer.get_params(),
        "extractor": model.extractor,
        "sigma": model.sigma,
        "map_upsample": model.map_upsample,
        "colour_scale": list(model.colour_scale),
        "threshold": model.threshold,
        "holdout_scores": [float(score) for score in model.holdout_scores],
        "holdout_files": list(model.holdout_files),
        "train_sizes": [list(size) for size in model.train_sizes],
    }
    save_arrays(path, arrays, metadata)
    return Path(path)


def read_model(path: str | Path) -> FittedModel:
    """Load a model written by :func:`write_model`; errors name the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"{path}: no fitted model there (the score stage writes models/<run>/<category>.safetensors; "
            "run the pipeline: dvc repro)"
        )
    arrays, metadata = load_arrays(path)
    missing = [key for key in METADATA_KEYS if key not in metadata]
    missing += [f"extractor.{key}" for key in EXTRACTOR_KEYS if key not in metadata.get("extractor", {})]
    if missing or metadata.get("format") != MODEL_FORMAT:
        raise ModelError(
            f"{path}: not a vitad model of format {MODEL_FORMAT} (lacks {', '.join(missing) or 'nothing'}, format "
            f"{metadata.get('format')!r}); re-run the score stage (dvc repro)"
        )
    if metadata["method"] not in SCORERS or metadata["map_upsample"] not in UPSAMPLING:
        raise ModelError(f"{path}: unknown method {metadata['method']!r} or map_upsample {metadata['map_upsample']!r}")
    state = {name[len(_SCORER_PREFIX):]: array for name, array in arrays.items() if name.startswith(_SCORER_PREFIX)}
    try:
        scorer = restore_scorer(metadata["method"], metadata["params"], state)
    except (ScoringError, KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{path}: the fitted scorer cannot be restored ({error!r}); re-run the score stage") from error
    return FittedModel(
        run=metadata["run"],
        backbone=metadata["backbone"],
        recipe=metadata["recipe"],
        method=metadata["method"],
        category=metadata["category"],
        scorer=scorer,
        extractor=metadata["extractor"],
        sigma=float(metadata["sigma"]),
        map_upsample=metadata["map_upsample"],
        colour_scale=tuple(metadata["colour_scale"]),
        threshold=metadata["threshold"],
        holdout_scores=np.asarray(metadata["holdout_scores"], dtype=np.float32),
        holdout_files=tuple(metadata["holdout_files"]),
        train_sizes=tuple(tuple(size) for size in metadata["train_sizes"]),
    )
