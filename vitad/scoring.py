"""Anomaly scorers: fit on the features of defect-free training images, score test features.

Every scorer is shaped like a scikit-learn estimator: the constructor takes the parameters of
``params.yaml``'s ``score.<method>`` section, ``fit(train)`` returns the fitted scorer and
``score(test)`` returns anomaly scores, higher = more anomalous. No test feature and no label is
ever used for fitting. One API serves both levels, chosen by the shape of what is fitted:

- image level: ``fit(train [N, D])``, ``score(test [M, D]) -> [M]``;
- patch level: ``fit(train [N, h, w, D])``, ``score(test [M, h', w', D]) -> [M, h', w']``
  (patch grids; the per-position Mahalanobis needs h' x w' == h x w).

Options shared by all scorers: ``aggregate`` (the rule :func:`aggregate_image_scores` uses to turn
a patch-score grid into the evaluated image score) and ``few_shot`` (fit on the first n training
images only, AnomalyDINO's few-shot setting; None = all).

Bad input never turns into a silent NaN score: empty or non-finite features, fewer training
vectors than k or clusters and a singular covariance raise :class:`ScoringError`; bad parameters
raise :class:`vitad.params.ParamsError` naming ``score.<method>.<key>``.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from vitad.cli import StageError
from vitad.coreset import greedy_coreset
from vitad.params import ParamsError

if TYPE_CHECKING:  # torch and scikit-learn take seconds to import: only the scorers that need them do
    import torch


class ScoringError(StageError):
    """Features cannot be scored: empty, non-finite, too few vectors, or a singular covariance."""


def _max_rule(flat_scores: np.ndarray) -> np.ndarray:
    return flat_scores.max(axis=1)


def _top1pct_mean_rule(flat_scores: np.ndarray) -> np.ndarray:
    # AnomalyDINO: mean of the floor(1 %) highest patch scores, at least one patch.
    n_top = max(1, int(0.01 * flat_scores.shape[1]))
    return np.partition(flat_scores, -n_top, axis=1)[:, -n_top:].mean(axis=1)


AGGREGATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"max": _max_rule, "top1pct_mean": _top1pct_mean_rule}


def aggregate_image_scores(patch_scores: np.ndarray, rule: str) -> np.ndarray:
    """Image scores [M] (float32) from patch-score grids [M, h, w].

    ``max``: the largest patch score of the image (PatchCore, the official MVTec AD practice).
    ``top1pct_mean``: the mean of the n = max(1, floor(0.01 * h * w)) largest patch scores of the
    image (AnomalyDINO); robust to one noisy patch.
    """
    if rule not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation rule {rule!r} (known: {', '.join(AGGREGATIONS)})")
    patch_scores = np.asarray(patch_scores)
    if patch_scores.ndim != 3 or patch_scores.shape[1] * patch_scores.shape[2] == 0:
        raise ValueError(f"patch_scores must be non-empty grids [M, h, w], got shape {patch_scores.shape}")
    flat_scores = patch_scores.reshape(len(patch_scores), -1)  # [M, h * w]
    return AGGREGATIONS[rule](flat_scores).astype(np.float32)


# --- parameter checks: every error names the params.yaml key --------------------------------------


def _bad_param(method: str, key: str, expected: str, value: Any) -> ParamsError:
    return ParamsError(f"params.yaml: score.{method}.{key} must be {expected}, got {value!r}")


def _int_param(method: str, key: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise _bad_param(method, key, f"an integer >= {minimum}" + (" or null" if optional else ""), value)
    return int(value)


def _float_param(method: str, key: str, value: Any, low: float, high: float, low_inclusive: bool) -> float:
    is_number = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    above_low = is_number and (value >= low if low_inclusive else value > low)
    if not (is_number and np.isfinite(value) and above_low and value <= high):
        bracket = "[" if low_inclusive else "("
        raise _bad_param(method, key, f"a number in {bracket}{low}, {high}]", value)
    return float(value)


def _choice_param(method: str, key: str, value: Any, choices) -> Any:
    if value not in choices:
        raise _bad_param(method, key, "one of " + ", ".join(map(str, choices)), value)
    return value


def _bool_param(method: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad_param(method, key, "true or false", value)
    return value


# --- features --------------------------------------------------------------------------------------


def _checked_features(features: np.ndarray, role: str) -> np.ndarray:
    """float32 features [N, D] or [N, h, w, D], non-empty and finite, else ScoringError."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim not in (2, 4):
        raise ScoringError(f"{role} features must be [N, D] or [N, h, w, D], got shape {list(features.shape)}")
    if features.size == 0:
        raise ScoringError(f"{role} features are empty (shape {list(features.shape)})")
    if not np.isfinite(features).all():
        count = int(np.count_nonzero(~np.isfinite(features)))
        raise ScoringError(f"{role} features contain {count} NaN/inf values")
    return features


def l2_normalised(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy of ``vectors`` [n, D] with unit rows; all-zero rows stay zero (cosine 0 to
    everything, so distance 1: maximally unlike the bank, never NaN)."""
    normalised = np.array(vectors, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(normalised)
    return normalised


class _Scorer:
    """Shared checks of all scorers; subclasses implement ``_fit`` and ``_score`` on checked
    float32 features and set ``method`` (their params.yaml section)."""

    method: ClassVar[str]

    def __init__(self, aggregate: str = "max", few_shot: int | None = None):
        self.aggregate = _choice_param(self.method, "aggregate", aggregate, tuple(AGGREGATIONS))
        self.few_shot = _int_param(self.method, "few_shot", few_shot, 1, optional=True)

    @classmethod
    def param_names(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self) -> dict:
        """The constructor parameters, as in scikit-learn (saved with the scores)."""
        return {name: getattr(self, name) for name in self.param_names()}

    def fit(self, train: np.ndarray) -> "_Scorer":
        """Fit on defect-free training features [N, D] or [N, h, w, D]; returns self."""
        train = _checked_features(train, "training")
        if self.few_shot is not None:
            if self.few_shot > len(train):
                raise ScoringError(
                    f"score.{self.method}.few_shot = {self.few_shot} but there are only {len(train)} training images"
                )
            train = train[: self.few_shot]
        self.train_shape_ = train.shape
        self._fit(train)
        return self

    def score(self, test: np.ndarray) -> np.ndarray:
        """Anomaly scores of test features: [M, D] -> [M]; [M, h, w, D] -> [M, h, w] (float32)."""
        if not hasattr(self, "train_shape_"):
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        test = _checked_features(test, "test")
        if test.ndim != len(self.train_shape_) or test.shape[-1] != self.train_shape_[-1]:
            raise ScoringError(
                f"test features {list(test.shape)} do not match the fitted training features "
                f"{list(self.train_shape_)} (same level and feature dimension needed)"
            )
        scores = self._score(test)
        if not np.isfinite(scores).all():
            raise ScoringError(
                f"{self.method} scores overflowed to NaN/inf (feature magnitudes up to "
                f"{float(np.abs(test).max()):.3g}); rescale the features"
            )
        return scores.astype(np.float32)


class KNNScorer(_Scorer):
    """Mean cosine distance (1 - cos) to the ``k`` nearest training vectors (PatchCore with
    cosine similarity, AnomalyDINO). Exact search: faiss ``IndexFlatIP`` on L2-normalised float32
    vectors (inner product = cosine, GEMM speed), moved to the GPU(s) when faiss sees any.

    ``coreset_ratio`` < 1 shrinks the PATCH memory bank to that fraction with PatchCore's greedy
    k-center coreset (seeded by ``seed``) on the normalised vectors; image-level banks hold one
    vector per image and are always kept whole.
    """

    method = "knn"

    def __init__(self, k: int = 1, coreset_ratio: float = 1.0, seed: int = 0, aggregate: str = "max", few_shot: int | None = None):
        super().__init__(aggregate, few_shot)
        self.k = _int_param(self.method, "k", k, 1)
        self.coreset_ratio = _float_param(self.method, "coreset_ratio", coreset_ratio, 0.0, 1.0, low_inclusive=False)
        self.seed = _int_param(self.method, "seed", seed, 0)

    def _fit(self, train: np.ndarray) -> None:
        bank = l2_normalised(train.reshape(-1, train.shape[-1]))  # [N (* h * w), D]
        reduced = train.ndim == 4 and self.coreset_ratio < 1.0
        if reduced:
            bank = bank[np.sort(greedy_coreset(bank, self.coreset_ratio, self.seed))]
        if len(bank) < self.k:
            raise ScoringError(
                f"{len(bank)} training vectors{' after the coreset' if reduced else ''} but score.knn.k = {self.k}: "
                "lower k" + (" or raise score.knn.coreset_ratio" if reduced else "")
            )
        index = faiss.IndexFlatIP(bank.shape[1])
        if faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(bank)
        self.index_ = index
        self.bank_size_ = len(bank)

    def _score(self, test: np.ndarray) -> np.ndarray:
        queries = l2_normalised(test.reshape(-1, test.shape[-1]))  # [M (* h * w), D]
        similarities, _ = self.index_.search(queries, self.k)  # [M (* h * w), k]
        # Cosine distance is >= 0; clipping removes float rounding of 1 - cos(x, x).
        distances = np.maximum(1.0 - similarities, 0.0).mean(axis=1)
        return distances.reshape(test.shape[:-1])


@dataclass(frozen=True)
class _Gaussians:
    """P Gaussians N(mean_p, a_p S_p + b_p I) in d dims, S_p the ML covariance of n samples.

    With n >= d, ``factor`` is the Cholesky factor of the d x d covariance and
    ``train_centered`` is None. With n < d (e.g. 200 images, 768 dims) the rank-n structure is
    used instead (Woodbury): ``factor`` is the Cholesky factor of K = n b I_n + a X Xᵀ for the
    centred samples X [n, d], and (x-m)ᵀ Σ⁻¹ (x-m) = (|x-m|² - a |L_K⁻¹ X (x-m)|²) / b. The fit then
    costs n² d instead of n d² + d³ per Gaussian (PaDiM, 256 positions x 768 dims from 200
    images: about 2.5 s instead of about 27 s, measured on 2 shared cores).
    """

    mean: torch.Tensor  # [P, d] float64
    factor: torch.Tensor  # [P, d, d] or [P, n, n] float64, lower triangular
    scale: torch.Tensor  # a [P]
    offset: torch.Tensor  # b [P]
    train_centered: torch.Tensor | None  # [P, n, d] float64 when n < d


SHRINKAGES = ("ledoit_wolf", "oas", "fixed")


def _shrinkage_coefficients(
    shrinkage: str, epsilon: float, n: int, d: int, trace: torch.Tensor, frobenius_sq: torch.Tensor, row_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) [P] with shrunk covariance a S + b I, from tr(S), |S|_F² and the squared norms of the
    centred samples [P, n] (batched over P; equal to scikit-learn's ledoit_wolf / oas)."""
    import torch
    if shrinkage == "fixed":
        return torch.ones_like(trace), torch.full_like(trace, epsilon)
    mu = trace / d  # target: mu I
    if d == 1:  # scikit-learn: no shrinkage in one dimension
        coefficient = torch.zeros_like(trace)
    elif shrinkage == "ledoit_wolf":
        beta = ((row_sq.square().sum(dim=1) / n - frobenius_sq) / (d * n)).clamp_min(0.0)
        delta = (frobenius_sq - 2.0 * mu * trace + d * mu.square()) / d  # |S - mu I|_F² / d
        coefficient = torch.where(delta > 0, torch.minimum(beta, delta) / delta.clamp_min(1e-300), torch.zeros_like(delta))
    else:  # oas
        alpha = frobenius_sq / d**2
        numerator = alpha + mu.square()
        denominator = (n + 1) * (alpha - mu.square() / d)
        coefficient = torch.where(
            denominator > 0, (numerator / denominator.clamp_min(1e-300)).clamp_max(1.0), torch.ones_like(denominator)
        )
    return 1.0 - coefficient, coefficient * mu


def _float64_tensor(array: np.ndarray) -> torch.Tensor:
    """A contiguous float64 torch copy of a (possibly transposed) numpy view, in one pass."""
    import torch
    return torch.empty(array.shape, dtype=torch.float64).copy_(torch.from_numpy(array))


def _batched_linalg_threads(n_matrices: int):
    """Context for batched factorisations and triangular solves: with many matrices, one
    BLAS/OpenMP thread per matrix, since threading each 200 x 200 Cholesky costs more in
    synchronisation than it saves (measured on 2 shared cores: 256 positions, Cholesky +
    triangular solve 5 s threaded, 0.6 s not); a single large matrix keeps all threads."""
    return threadpool_limits(limits=1) if n_matrices > 1 else contextlib.nullcontext()


def _fit_gaussians(samples: torch.Tensor, shrinkage: str, epsilon: float) -> _Gaussians:
    """Shrunk Gaussians of ``samples`` [P, n, d] (float64, centred in place), batched over P;
    see :class:`_Gaussians`."""
    import torch
    n_gaussians, n, d = samples.shape
    mean = samples.mean(dim=1)  # [P, d]
    centered = samples.sub_(mean[:, None, :])  # [P, n, d]
    low_rank = n < d
    if low_rank:
        second_moment = centered @ centered.mT  # Gram X Xᵀ [P, n, n]
        row_sq = second_moment.diagonal(dim1=1, dim2=2)  # |x_i|² [P, n]
    else:
        second_moment = centered.mT @ centered  # scatter Xᵀ X = n S [P, d, d]
        row_sq = torch.linalg.vector_norm(centered, dim=2).square()  # [P, n]
    trace = row_sq.sum(dim=1) / n  # tr(S); |X Xᵀ|_F = |Xᵀ X|_F, so |S|_F² = |second_moment|_F² / n²
    frobenius_sq = second_moment.square().sum(dim=(1, 2)) / n**2
    scale, offset = _shrinkage_coefficients(shrinkage, epsilon, n, d, trace, frobenius_sq, row_sq)
    if low_rank:
        system = scale[:, None, None] * second_moment
        system.diagonal(dim1=1, dim2=2).add_((n * offset)[:, None])  # K = n b I + a X Xᵀ
    else:
        system = (scale / n)[:, None, None] * second_moment
        system.diagonal(dim1=1, dim2=2).add_(offset[:, None])  # a S + b I
    with _batched_linalg_threads(n_gaussians):
        factor, info = torch.linalg.cholesky_ex(system)
    singular = (info > 0) | (offset <= 0) if low_rank else info > 0
    if bool(singular.any()):
        where = "the covariance" if n_gaussians == 1 else f"{int(singular.sum())} of {n_gaussians} patch positions"
        raise ScoringError(
            f"degenerate covariance at {where} ({n} training vectors in {d} dims): the features are (nearly) "
            "constant or fewer than their dimension without shrinkage; use score.mahalanobis.shrinkage "
            "ledoit_wolf or oas, or fixed with a larger score.mahalanobis.epsilon"
        )
    return _Gaussians(mean, factor, scale, offset, centered if low_rank else None)


# float64 elements held by one chunk of queries while scoring (64 MiB).
_SCORE_CHUNK_ELEMENTS = 1 << 23


def _mahalanobis_distances(gaussians: _Gaussians, queries: np.ndarray) -> np.ndarray:
    """Mahalanobis distances [P, m] (float64) of ``queries`` [P, m, d] to the P Gaussians."""
    import torch
    n_gaussians, n_queries, d = queries.shape
    width = d if gaussians.train_centered is None else max(d, gaussians.train_centered.shape[1])
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // (n_gaussians * width))
    distances = np.empty((n_gaussians, n_queries), dtype=np.float64)
    for start in range(0, n_queries, chunk):
        centered = _float64_tensor(queries[:, start : start + chunk]).sub_(gaussians.mean[:, None, :])  # [P, c, d]
        if gaussians.train_centered is None:
            with _batched_linalg_threads(n_gaussians):
                whitened = torch.linalg.solve_triangular(gaussians.factor, centered.mT, upper=False)  # [P, d, c]
            squared = whitened.square().sum(dim=1)
        else:
            projected = gaussians.train_centered @ centered.mT  # X (x - m) [P, n, c]
            with _batched_linalg_threads(n_gaussians):
                solved = torch.linalg.solve_triangular(gaussians.factor, projected, upper=False)  # [P, n, c]
            squared = centered.square().sum(dim=2) - gaussians.scale[:, None] * solved.square().sum(dim=1)
            squared = squared / gaussians.offset[:, None]
        distances[:, start : start + chunk] = squared.clamp_min(0.0).sqrt().numpy()
    return distances


class MahalanobisScorer(_Scorer):
    """Mahalanobis distance to a Gaussian of the training features, sqrt((x-m)ᵀ Σ⁻¹ (x-m)).

    Optional PCA to ``pca_dims`` dims (fitted on the training vectors), then a shrunk covariance
    Σ = (1 - s) S + s tr(S)/d I with s from Ledoit-Wolf or OAS (as scikit-learn), or
    Σ = S + ``epsilon`` I (``fixed``, PaDiM's regulariser); S is the maximum-likelihood covariance.
    All covariance algebra runs in float64. Patch level: one Gaussian over all training patches,
    or with ``per_position`` one Gaussian per patch position (PaDiM), batched over positions.
    Image-level features always get one Gaussian.
    """

    method = "mahalanobis"

    def __init__(
        self,
        pca_dims: int | None = None,
        shrinkage: str = "ledoit_wolf",
        epsilon: float = 0.01,
        per_position: bool = False,
        aggregate: str = "max",
        few_shot: int | None = None,
    ):
        super().__init__(aggregate, few_shot)
        self.pca_dims = _int_param(self.method, "pca_dims", pca_dims, 1, optional=True)
        self.shrinkage = _choice_param(self.method, "shrinkage", shrinkage, SHRINKAGES)
        self.epsilon = _float_param(self.method, "epsilon", epsilon, 0.0, float("inf"), low_inclusive=True)
        self.per_position = _bool_param(self.method, "per_position", per_position)

    def _reduced(self, features: np.ndarray) -> np.ndarray:
        """[..., D] -> [..., d] by the fitted PCA (float64), or the features themselves."""
        if self.pca_ is None:
            return features
        flat = self.pca_.transform(features.reshape(-1, features.shape[-1]).astype(np.float64))  # [n, d]
        return flat.reshape(*features.shape[:-1], flat.shape[-1])

    def _by_gaussian(self, features: np.ndarray) -> np.ndarray:
        """[N, D] or [N, h, w, d] -> [P, n, d]: per position P = h * w, n = N; else P = 1."""
        if features.ndim == 4 and self.per_position:
            n_images, height, width, dims = features.shape
            return features.reshape(n_images, height * width, dims).transpose(1, 0, 2)  # [h * w, N, d]
        return features.reshape(1, -1, features.shape[-1])  # [1, N (* h * w), d]

    def _fit(self, train: np.ndarray) -> None:
        self.pca_ = None
        if self.pca_dims is not None:
            from sklearn.decomposition import PCA  # imported only when used: scikit-learn costs ~2 s to import

            n_vectors = int(np.prod(train.shape[:-1]))
            if self.pca_dims > min(n_vectors, train.shape[-1]):
                raise ScoringError(
                    f"score.mahalanobis.pca_dims = {self.pca_dims} exceeds min(training vectors {n_vectors}, "
                    f"feature dimension {train.shape[-1]})"
                )
            self.pca_ = PCA(n_components=self.pca_dims, svd_solver="covariance_eigh")
            self.pca_.fit(train.reshape(-1, train.shape[-1]).astype(np.float64))
        samples = _float64_tensor(self._by_gaussian(self._reduced(train)))  # [P, n, d]
        self.gaussians_ = _fit_gaussians(samples, self.shrinkage, self.epsilon)

    def _score(self, test: np.ndarray) -> np.ndarray:
        if test.ndim == 4 and self.per_position and test.shape[1:3] != self.train_shape_[1:3]:
            raise ScoringError(
                f"per-position Gaussians were fitted on a {self.train_shape_[1]}x{self.train_shape_[2]} patch grid, "
                f"test grid is {test.shape[1]}x{test.shape[2]}"
            )
        distances = _mahalanobis_distances(self.gaussians_, self._by_gaussian(self._reduced(test)))  # [P, m]
        if test.ndim == 4 and self.per_position:
            return distances.T.reshape(test.shape[:-1])  # [h * w, M] -> [M, h, w]
        return distances.reshape(test.shape[:-1])


class KMeansScorer(_Scorer):
    """Euclidean distance to the nearest of ``n_clusters`` k-means centroids fitted on the
    training vectors (the seed project's ResNet50 + KMeans baseline); scikit-learn KMeans,
    k-means++ initialisation seeded by ``seed``, one run."""

    method = "kmeans"

    def __init__(self, n_clusters: int = 8, seed: int = 0, aggregate: str = "max", few_shot: int | None = None):
        super().__init__(aggregate, few_shot)
        self.n_clusters = _int_param(self.method, "n_clusters", n_clusters, 1)
        self.seed = _int_param(self.method, "seed", seed, 0)

    def _fit(self, train: np.ndarray) -> None:
        from sklearn.cluster import KMeans
        bank = train.reshape(-1, train.shape[-1])  # [N (* h * w), D]
        if len(bank) < self.n_clusters:
            raise ScoringError(f"{len(bank)} training vectors but score.kmeans.n_clusters = {self.n_clusters}")
        self.kmeans_ = KMeans(n_clusters=self.n_clusters, n_init=1, random_state=self.seed).fit(bank)

    def _score(self, test: np.ndarray) -> np.ndarray:
        distances = self.kmeans_.transform(test.reshape(-1, test.shape[-1]))  # [M (* h * w), n_clusters]
        return distances.min(axis=1).reshape(test.shape[:-1])


SCORERS: dict[str, type[_Scorer]] = {"knn": KNNScorer, "mahalanobis": MahalanobisScorer, "kmeans": KMeansScorer}


def make_scorer(method: str, params: dict | None) -> _Scorer:
    """The scorer of ``method`` built from its ``score.<method>`` section (missing keys take the
    constructor defaults; unknown keys and bad values raise ParamsError naming the key)."""
    if method not in SCORERS:
        raise ParamsError(f"unknown scoring method {method!r} (known: {', '.join(SCORERS)}); check pipeline.runs")
    section = {} if params is None else params
    if not isinstance(section, dict):
        raise ParamsError(f"params.yaml: score.{method} must be a mapping of parameters, got {section!r}")
    scorer_class = SCORERS[method]
    unknown = sorted(set(section) - set(scorer_class.param_names()))
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key score.{method}.{unknown[0]} (known: {', '.join(scorer_class.param_names())})"
        )
    return scorer_class(**section)


@dataclass(frozen=True)
class BankScores:
    """Scores of one feature bank's test images."""

    image_scores: np.ndarray  # [M] float32, aggregated from patch_scores: the evaluated score
    patch_scores: np.ndarray  # [M, h, w] float32
    embedding_scores: np.ndarray  # [M] float32, from the image embeddings (global route)
    params: dict  # the scorer parameters used, defaults filled in
    fit_seconds: float
    score_seconds: float


def score_bank(bank, method: str, params: dict | None, source: str) -> BankScores:
    """Fit ``method`` on ``bank``'s training features and score its test features, at patch level
    (train_patches -> test_patches) and at image level (train_embeddings -> test_embeddings).

    ``bank`` is a :class:`vitad.featurebank.FeatureBank`; ``source`` (its file) prefixes errors.
    """
    patch_scorer = make_scorer(method, params)
    embedding_scorer = make_scorer(method, params)
    fit_seconds = score_seconds = 0.0
    routes = (
        ("patch level", patch_scorer, bank.train_patches, bank.test_patches),
        ("image-embedding level", embedding_scorer, bank.train_embeddings, bank.test_embeddings),
    )
    results = []
    for level, scorer, train, test in routes:
        try:
            start = time.perf_counter()
            scorer.fit(train)
            fitted = time.perf_counter()
            results.append(scorer.score(test))
            score_seconds += time.perf_counter() - fitted
            fit_seconds += fitted - start
        except ScoringError as error:
            raise ScoringError(f"{source}: {level}: {error}") from error
    patch_scores, embedding_scores = results
    return BankScores(
        image_scores=aggregate_image_scores(patch_scores, patch_scorer.aggregate),
        patch_scores=patch_scores,
        embedding_scores=embedding_scores,
        params=patch_scorer.get_params(),
        fit_seconds=fit_seconds,
        score_seconds=score_seconds,
    )
