"""Decision thresholds calibrated on held-out TRAINING images only (no test image, no label).

The score stage calibrates each run's threshold per category when it writes the fitted model
(:mod:`vitad.serving.model`); ``vitad predict`` and the web demo read it from there.
"""

from __future__ import annotations

import numpy as np

from vitad.scoring import ScoringError, few_shot_indices, make_scorer
from vitad.scoring.base import ModelMap

# At most this many training images are held out, in this many folds.
MAX_CALIBRATION_IMAGES = 20
CALIBRATION_FOLDS = 5


def holdout_image_scores(
    method: str,
    scorer_params: dict,
    train_patches: np.ndarray,
    max_images: int = MAX_CALIBRATION_IMAGES,
    n_folds: int = CALIBRATION_FOLDS,
    model_map: ModelMap | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores of training images scored as if they were new: (indices [C], scores [C]).

    Only training features ``train_patches`` [N, h, w, D] are used (never test images or labels).
    C = min(N, ``max_images``) images, evenly spaced over the training set, are held out:

    - ``few_shot`` n < N: the scorer is fitted on n images drawn at random
      (:func:`vitad.scoring.few_shot_indices`), so the held-out images are taken from the N - n
      images it never sees, and one fit serves them all;
    - otherwise they are split into min(``n_folds``, C) folds; each fold is scored by a scorer
      fitted on all the other training images (the bank is then 1 fold smaller than the final
      one, so the scores lean slightly high: a conservative threshold).
    """
    n_train = len(train_patches)
    few_shot = scorer_params.get("few_shot")
    if few_shot is not None and few_shot < n_train:
        unseen = np.setdiff1d(np.arange(n_train), few_shot_indices(n_train, few_shot, scorer_params.get("seed", 0)))
        indices = unseen[np.unique(np.linspace(0, len(unseen) - 1, min(max_images, len(unseen))).round().astype(int))]
        scorer = make_scorer(method, scorer_params).fit(train_patches)
        return indices, scorer.image_scores(train_patches[indices], model_map)[0]
    if n_train < 2:
        raise ScoringError(
            f"{n_train} training image: at least 2 are needed to calibrate a threshold on held-out training images"
        )
    fold_params = {**scorer_params, "few_shot": None}  # few_shot == N means all images
    indices = np.unique(np.linspace(0, n_train - 1, min(max_images, n_train)).round().astype(int))
    image_scores = np.empty(len(indices), dtype=np.float32)
    position = 0
    for fold in np.array_split(indices, min(n_folds, len(indices))):
        kept = np.setdiff1d(np.arange(n_train), fold)
        scorer = make_scorer(method, fold_params).fit(train_patches[kept])
        image_scores[position : position + len(fold)] = scorer.image_scores(train_patches[fold], model_map)[0]
        position += len(fold)
    return indices, image_scores


def calibrated_threshold(holdout_scores: np.ndarray) -> float:
    """The highest held-out training score: every held-out normal image is classified normal
    (an image is anomalous when its score is strictly above the threshold)."""
    if len(holdout_scores) == 0:
        raise ValueError("no held-out training scores to calibrate a threshold on")
    return float(np.max(holdout_scores))
