"""What every scorer shares: parameter checks, feature checks, the few-shot draw, image-score rules.

Every scorer is shaped like a scikit-learn estimator: the constructor takes the parameters of
its run (a recipe section ``score.<recipe>`` of params.yaml plus the run's overrides, see
:mod:`vitad.runs`), ``fit(train)`` returns the fitted scorer, ``score_samples(test)`` returns
anomaly scores and ``get_params()`` the constructor parameters. Unlike scikit-learn's outlier
detectors, whose ``score_samples`` is higher for more normal samples, ours are anomaly scores:
higher = more anomalous. No test feature and no label is ever used for fitting. One API serves
both levels, chosen by the shape of what is fitted:

- image level: ``fit(train [N, D])``, ``score_samples(test [M, D]) -> [M]``;
- patch level: ``fit(train [N, h, w, D])``, ``score_samples(test [M, h', w', D]) -> [M, h', w']``
  and ``image_scores(test) -> ([M], [M, h', w'])``, the image score by the scorer's rule.

Bad input never turns into a silent NaN score: empty or non-finite features and too few vectors
raise :class:`ScoringError`; bad parameters raise :class:`vitad.core.params.ParamsError` naming
``score.<method>.<key>``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar

import numpy as np

from vitad.core.cli import StageError
from vitad.core.params import ParamsError


class ScoringError(StageError):
    """Features cannot be scored: empty, non-finite, too few vectors, or a singular covariance."""


def _max_rule(flat_scores: np.ndarray) -> np.ndarray:
    return flat_scores.max(axis=1)


def _top1pct_mean_rule(flat_scores: np.ndarray) -> np.ndarray:
    # AnomalyDINO: mean of the floor(1 %) highest patch scores, at least one patch.
    n_top = max(1, int(0.01 * flat_scores.shape[1]))
    return np.partition(flat_scores, -n_top, axis=1)[:, -n_top:].mean(axis=1)


AGGREGATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"max": _max_rule, "top1pct_mean": _top1pct_mean_rule}
MAP_MAX = "map_max"  # the rule that reads the anomaly map rather than the patch grid
RULES = (*AGGREGATIONS, MAP_MAX)
ModelMap = Callable[[np.ndarray], np.ndarray]  # patch grid [h, w] -> anomaly map at the model input


def aggregate_image_scores(patch_scores: np.ndarray, rule: str, model_map: ModelMap | None = None) -> np.ndarray:
    """Image scores [M] (float32) from patch-score grids [M, h, w].

    ``max``: the largest patch score of the image (PatchCore, the official MVTec AD practice).
    ``top1pct_mean``: the mean of the n = max(1, floor(0.01 * h * w)) largest patch scores of the
    image (AnomalyDINO); robust to one noisy patch.
    ``map_max``: the largest value of the image's anomaly map at the model input, upsampled and
    blurred (``model_map``, the run's map settings; anomalib's PaDiM).
    """
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r} (known: {', '.join(RULES)})")
    patch_scores = np.asarray(patch_scores)
    if patch_scores.ndim != 3 or patch_scores.shape[1] * patch_scores.shape[2] == 0:
        raise ValueError(f"patch_scores must be non-empty grids [M, h, w], got shape {patch_scores.shape}")
    if rule == MAP_MAX:
        if model_map is None:
            raise ValueError("the map_max rule needs the run's model_map (patch grid -> anomaly map)")
        return np.array([model_map(grid).max() for grid in patch_scores], dtype=np.float32)
    flat_scores = patch_scores.reshape(len(patch_scores), -1)  # [M, h * w]
    return AGGREGATIONS[rule](flat_scores).astype(np.float32)


# --- parameter checks: every error names the params.yaml key --------------------------------------


def bad_param(method: str, key: str, expected: str, value: Any) -> ParamsError:
    return ParamsError(f"params.yaml: score.{method}.{key} must be {expected}, got {value!r}")


def int_param(method: str, key: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise bad_param(method, key, f"an integer >= {minimum}" + (" or null" if optional else ""), value)
    return int(value)


def float_param(method: str, key: str, value: Any, low: float, high: float, low_inclusive: bool) -> float:
    is_number = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    above_low = is_number and (value >= low if low_inclusive else value > low)
    if not (is_number and np.isfinite(value) and above_low and value <= high):
        bracket = "[" if low_inclusive else "("
        raise bad_param(method, key, f"a number in {bracket}{low}, {high}]", value)
    return float(value)


def choice_param(method: str, key: str, value: Any, choices) -> Any:
    if value not in choices:
        raise bad_param(method, key, "one of " + ", ".join(map(str, choices)), value)
    return value


def bool_param(method: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad_param(method, key, "true or false", value)
    return value


# --- features --------------------------------------------------------------------------------------


def checked_features(features: np.ndarray, role: str) -> np.ndarray:
    """float32 features [N, D] or [N, h, w, D], non-empty and finite, else ScoringError."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim not in (2, 4):
        raise ScoringError(f"{role} features must be [N, D] or [N, h, w, D], got shape {list(features.shape)}")
    if features.size == 0:
        raise ScoringError(f"{role} features are empty (shape {list(features.shape)})")
    # Image by image: a finiteness mask of a whole bank would take a quarter of its memory.
    if not all(np.isfinite(features[start : start + 64]).all() for start in range(0, len(features), 64)):
        count = int(sum(np.count_nonzero(~np.isfinite(row)) for row in features))
        raise ScoringError(f"{role} features contain {count} NaN/inf values")
    return features


def few_shot_indices(n_train: int, few_shot: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the training images a few-shot scorer is fitted on: ``few_shot`` of the
    ``n_train`` drawn at random without replacement, seeded by ``seed`` (AnomalyDINO samples its
    reference images; the first n files of a folder are not a random sample); all when None."""
    if few_shot is None or few_shot >= n_train:
        return np.arange(n_train)
    return np.sort(np.random.default_rng(seed).choice(n_train, size=few_shot, replace=False))


class Scorer:
    """Shared checks of all scorers; subclasses implement ``_fit`` and ``_score`` on checked
    float32 features and set ``method`` (the scorer registry key).

    Options every scorer has: ``aggregate`` (the rule of :func:`aggregate_image_scores` that turns
    a patch-score grid into the image score), ``few_shot`` (fit on that many training images,
    drawn by :func:`few_shot_indices`; None = all) and ``seed`` (seeds the draw and any other
    randomness of the scorer).
    """

    method: ClassVar[str]
    # Parameters that only mean something for patch grids; the image-embedding route drops them.
    patch_only_params: ClassVar[tuple[str, ...]] = ("aggregate",)

    # Where fit and scoring compute (``cpu`` | ``cuda``); not a parameter of the run: the same
    # settings give the same scores on either, within float rounding. Set with :meth:`to`.
    device: str = "cpu"

    def __init__(self, aggregate: str = "max", few_shot: int | None = None, seed: int = 0):
        self.aggregate = choice_param(self.method, "aggregate", aggregate, RULES)
        self.few_shot = int_param(self.method, "few_shot", few_shot, 1, optional=True)
        self.seed = int_param(self.method, "seed", seed, 0)

    @classmethod
    def param_names(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self) -> dict:
        """The constructor parameters, as in scikit-learn (saved with the scores)."""
        return {name: getattr(self, name) for name in self.param_names()}

    def to(self, device: str) -> "Scorer":
        """Compute on ``device`` (``cpu`` | ``cuda``, e.g. from
        :func:`vitad.scoring.device.resolve_compute_device`); returns self."""
        if str(device).split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"scorer device must be cpu or cuda, got {device!r}")
        self.device = str(device)
        return self

    def fit(self, train: np.ndarray) -> "Scorer":
        """Fit on defect-free training features [N, D] or [N, h, w, D]; returns self."""
        train = checked_features(train, "training")
        if self.few_shot is not None and self.few_shot > len(train):
            raise ScoringError(
                f"score.{self.method}.few_shot = {self.few_shot} but there are only {len(train)} training images"
            )
        self.train_indices_ = few_shot_indices(len(train), self.few_shot, self.seed)
        if len(self.train_indices_) < len(train):  # all images: no copy of the bank
            train = train[self.train_indices_]
        self.train_shape_ = train.shape
        self._fit(train)
        return self

    def fitted_state(self) -> dict[str, np.ndarray]:
        """What the fitted scorer needs to score new features, as named arrays (a fitted model's
        file, :mod:`vitad.serving.model`): :meth:`restored` rebuilds a scorer that scores exactly as this one."""
        if not hasattr(self, "train_shape_"):
            raise RuntimeError(f"{type(self).__name__} used before fit")
        return {"train_shape": np.array(self.train_shape_, dtype=np.int64), **self._state()}

    @classmethod
    def restored(cls, params: dict, state: dict[str, np.ndarray]) -> "Scorer":
        """The fitted scorer of :meth:`fitted_state`, without the training features."""
        scorer = cls(**params)
        scorer.train_shape_ = tuple(int(size) for size in state["train_shape"])
        scorer._restore(state)
        return scorer

    def _checked_test(self, test: np.ndarray) -> np.ndarray:
        if not hasattr(self, "train_shape_"):
            raise RuntimeError(f"{type(self).__name__} used before fit")
        test = checked_features(test, "test")
        if test.ndim != len(self.train_shape_) or test.shape[-1] != self.train_shape_[-1]:
            raise ScoringError(
                f"test features {list(test.shape)} do not match the fitted training features "
                f"{list(self.train_shape_)} (same level and feature dimension needed)"
            )
        return test

    def _checked_scores(self, scores: np.ndarray, test: np.ndarray) -> np.ndarray:
        if not np.isfinite(scores).all():
            raise ScoringError(
                f"{self.method} scores overflowed to NaN/inf (feature magnitudes up to "
                f"{float(np.abs(test).max()):.3g}); rescale the features"
            )
        return scores.astype(np.float32)

    def score_samples(self, test: np.ndarray) -> np.ndarray:
        """Anomaly scores of test features: [M, D] -> [M]; [M, h, w, D] -> [M, h, w] (float32)."""
        test = self._checked_test(test)
        return self._checked_scores(self._score(test), test)

    def image_scores(self, test: np.ndarray, model_map: ModelMap | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Patch level: (image scores [M], patch scores [M, h, w]) of test grids [M, h, w, D],
        the image score by ``aggregate`` (``model_map``: the run's patch grid -> anomaly map, for
        ``map_max``; scorers with their own rule override this)."""
        patch_scores = self.score_samples(test)
        if patch_scores.ndim != 3:
            raise ScoringError(f"image_scores needs patch grids [M, h, w, D], got features {list(np.shape(test))}")
        return aggregate_image_scores(patch_scores, self.aggregate, model_map), patch_scores

    def _fit(self, train: np.ndarray) -> None:
        raise NotImplementedError

    def _score(self, test: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError
