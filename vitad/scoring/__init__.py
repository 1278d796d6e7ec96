"""Anomaly scorers (one registry) and scoring of a feature bank at patch and image level.

- :mod:`vitad.scoring.base`: what all scorers share (scikit-learn shape, checks, few-shot draw,
  image-score rules);
- :mod:`vitad.scoring.knn`: nearest-neighbour distance (PatchCore, AnomalyDINO, the seed's kNN);
- :mod:`vitad.scoring.coreset`: PatchCore's greedy k-center coreset;
- :mod:`vitad.scoring.gaussian`: Mahalanobis distance (PaDiM, the seed's PCA + shrinkage);
- :mod:`vitad.scoring.kmeans`: the seed's KMeans baseline;
- :mod:`vitad.scoring.device`: where scorers compute (CPU, or the GPU extraction ran on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vitad.core.params import ParamsError
from vitad.scoring.base import AGGREGATIONS, ModelMap, Scorer, ScoringError, aggregate_image_scores, few_shot_indices
from vitad.scoring.gaussian import MahalanobisScorer
from vitad.scoring.kmeans import KMeansScorer
from vitad.scoring.knn import KNNScorer

__all__ = [
    "AGGREGATIONS", "SCORERS", "BankScores", "KMeansScorer", "KNNScorer", "MahalanobisScorer", "Scorer",
    "ScoringError", "aggregate_image_scores", "few_shot_indices", "make_scorer", "restore_scorer", "score_bank",
]

SCORERS: dict[str, type[Scorer]] = {"knn": KNNScorer, "mahalanobis": MahalanobisScorer, "kmeans": KMeansScorer}


def make_scorer(method: str, params: dict | None, where: str | None = None) -> Scorer:
    """The scorer of ``method`` built from ``params`` (missing keys take the constructor
    defaults; unknown keys and bad values raise ParamsError naming the key, prefixed by
    ``where`` — the params.yaml entries the settings came from — when given)."""
    if method not in SCORERS:
        raise ParamsError(f"{where or 'params.yaml'}: unknown scoring method {method!r} (known: {', '.join(SCORERS)})")
    section = {} if params is None else params
    if not isinstance(section, dict):
        raise ParamsError(f"{where or f'params.yaml: score.{method}'} must be a mapping of parameters, got {section!r}")
    scorer_class = SCORERS[method]
    unknown = sorted(set(section) - set(scorer_class.param_names()))
    try:
        if unknown:
            raise ParamsError(
                f"params.yaml: unknown key score.{method}.{unknown[0]} (known: {', '.join(scorer_class.param_names())})"
            )
        return scorer_class(**section)
    except ParamsError as error:
        if where is None:
            raise
        raise ParamsError(f"{where}: {error}") from error


def restore_scorer(method: str, params: dict, state: dict[str, np.ndarray]) -> Scorer:
    """The fitted scorer of ``method`` that :meth:`Scorer.fitted_state` saved as ``state``, built
    with its saved ``params`` (:meth:`Scorer.get_params`)."""
    if method not in SCORERS:
        raise ScoringError(f"unknown scoring method {method!r} (known: {', '.join(SCORERS)})")
    return SCORERS[method].restored(params, state)


def embedding_route_params(method: str, patch_params: dict, overrides: dict | None) -> dict:
    """Settings of the image-embedding route: the patch route's settings without those that only
    mean something for patch grids (:attr:`Scorer.patch_only_params`), then ``overrides``."""
    patch_only = SCORERS[method].patch_only_params if method in SCORERS else ()
    return {**{key: value for key, value in patch_params.items() if key not in patch_only}, **(overrides or {})}


@dataclass(frozen=True)
class BankScores:
    """Scores of one feature bank's test images."""

    image_scores: np.ndarray  # [M] float32, the scorer's image score (patch route): the evaluated score
    patch_scores: np.ndarray  # [M, h, w] float32
    embedding_scores: np.ndarray  # [M] float32, from the image embeddings (global route)
    params: dict  # the patch route's scorer parameters, defaults filled in
    embedding_params: dict  # the image-embedding route's, defaults filled in
    patch_scorer: Scorer  # the fitted patch-route scorer (what a fitted model saves)
    fit_seconds: float
    score_seconds: float


def score_bank(
    bank,
    method: str,
    patch_params: dict,
    embedding_params: dict,
    source: str,
    model_map: ModelMap | None = None,
    device: str = "cpu",
) -> BankScores:
    """Fit ``method`` on ``bank``'s training features and score its test features, at patch level
    (train_patches -> test_patches, with ``patch_params``) and at image level (train_embeddings
    -> test_embeddings, with ``embedding_params``). ``model_map``: the run's patch grid ->
    anomaly map at the model input, for the ``map_max`` image-score rule. ``device``: where the
    scorers compute (``cpu`` | ``cuda``).

    ``bank`` is a :class:`vitad.featurebank.FeatureBank`; ``source`` (its file) prefixes errors.
    """
    patch_scorer = make_scorer(method, patch_params).to(device)
    embedding_scorer = make_scorer(method, embedding_params).to(device)
    fit_seconds = score_seconds = 0.0
    results = []
    for level, scorer, train, test in (
        ("patch level", patch_scorer, bank.train_patches, bank.test_patches),
        ("image-embedding level", embedding_scorer, bank.train_embeddings, bank.test_embeddings),
    ):
        try:
            start = time.perf_counter()
            scorer.fit(train)
            fitted = time.perf_counter()
            results.append(scorer.image_scores(test, model_map) if test.ndim == 4 else scorer.score_samples(test))
            score_seconds += time.perf_counter() - fitted
            fit_seconds += fitted - start
        except ScoringError as error:
            raise ScoringError(f"{source}: {level}: {error}") from error
    (image_scores, patch_scores), embedding_scores = results
    return BankScores(
        image_scores=image_scores,
        patch_scores=patch_scores,
        embedding_scores=embedding_scores,
        params=patch_scorer.get_params(),
        embedding_params=embedding_scorer.get_params(),
        patch_scorer=patch_scorer,
        fit_seconds=fit_seconds,
        score_seconds=score_seconds,
    )
