"""Mahalanobis scoring: shrunk Gaussians of the training features, one for all vectors or one per
patch position (PaDiM), fitted and evaluated batched in float64."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from vitad.scoring.base import ScoringError, Scorer, bad_param, bool_param, choice_param, float_param, int_param

if TYPE_CHECKING:  # torch and scikit-learn take seconds to import: only the scorers that need them do
    import torch


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


def _fit_gaussians(samples: torch.Tensor, shrinkage: str, epsilon: float, ddof: int = 0) -> _Gaussians:
    """Shrunk Gaussians of ``samples`` [P, n, d] (float64, centred in place), batched over P;
    see :class:`_Gaussians`. ``ddof`` 1 (``fixed`` only): S divides by n - 1, not n."""
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
    if ddof:
        if n <= ddof:
            raise ScoringError(f"{n} training vector(s): an unbiased covariance (ddof = {ddof}) needs at least {ddof + 1}")
        scale = scale * (n / (n - ddof))
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


def _feature_subset(method: str, value) -> int | list[int] | None:
    """A number of dimensions to draw, distinct dimension indices, or None."""
    if isinstance(value, (list, tuple)):
        if not value or len(set(value)) != len(value) or not all(
            isinstance(index, (int, np.integer)) and not isinstance(index, bool) and index >= 0 for index in value
        ):
            raise bad_param(method, "feature_subset", "an integer >= 1, a list of distinct dimension indices or null", value)
        return [int(index) for index in value]
    return int_param(method, "feature_subset", value, 1, optional=True)


class MahalanobisScorer(Scorer):
    """Mahalanobis distance to a Gaussian of the training features, sqrt((x-m)ᵀ Σ⁻¹ (x-m)).

    Optional PCA to ``pca_dims`` dims (fitted on the training vectors), then a shrunk covariance
    Σ = (1 - s) S + s tr(S)/d I with s from Ledoit-Wolf or OAS (as scikit-learn), or
    Σ = S + ``epsilon`` I (``fixed``, PaDiM's regulariser); S is the maximum-likelihood covariance
    (divided by n), or with ``ddof`` 1 the unbiased one (n - 1, PaDiM and anomalib; ``fixed``
    only: Ledoit-Wolf and OAS shrink the maximum-likelihood covariance, as scikit-learn does).
    All covariance algebra runs in float64. Patch level: one Gaussian over all training patches,
    or with ``per_position`` one Gaussian per patch position (PaDiM), batched over positions.
    Image-level features always get one Gaussian.

    ``feature_subset`` n keeps n feature dimensions drawn at random (seeded by ``seed``) before
    anything else: PaDiM's reduction (100 of ResNet18's 448, 550 of WRN50's 1792 dims), which is
    what keeps one covariance per patch position in memory; a list keeps exactly those dimensions
    (e.g. the ones another implementation drew, to reproduce its model). Patch level only, like ``pca_dims``
    and ``per_position``: the image-embedding route gets them only through its own settings.
    """

    method = "mahalanobis"
    patch_only_params = ("aggregate", "per_position", "feature_subset", "pca_dims")

    def __init__(
        self,
        pca_dims: int | None = None,
        shrinkage: str = "ledoit_wolf",
        epsilon: float = 0.01,
        per_position: bool = False,
        feature_subset: int | list[int] | None = None,
        ddof: int = 0,
        aggregate: str = "max",
        few_shot: int | None = None,
        seed: int = 0,
    ):
        super().__init__(aggregate, few_shot, seed)
        self.ddof = choice_param(self.method, "ddof", ddof, (0, 1))
        if self.ddof and shrinkage != "fixed":
            raise bad_param(self.method, "ddof", "0 unless shrinkage is fixed (Ledoit-Wolf and OAS use the ML covariance)", ddof)
        self.feature_subset = _feature_subset(self.method, feature_subset)
        self.pca_dims = int_param(self.method, "pca_dims", pca_dims, 1, optional=True)
        self.shrinkage = choice_param(self.method, "shrinkage", shrinkage, SHRINKAGES)
        self.epsilon = float_param(self.method, "epsilon", epsilon, 0.0, float("inf"), low_inclusive=True)
        self.per_position = bool_param(self.method, "per_position", per_position)

    def _reduced(self, features: np.ndarray) -> np.ndarray:
        """[..., D] -> [..., d] by the feature subset and the fitted PCA (float64), or the features
        themselves."""
        if self.dimensions_ is not None:
            features = features[..., self.dimensions_]
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
        self.pca_ = self.dimensions_ = None
        if isinstance(self.feature_subset, list):
            if max(self.feature_subset) >= train.shape[-1]:
                raise ScoringError(
                    f"score.mahalanobis.feature_subset lists dimension {max(self.feature_subset)}, but the features "
                    f"have {train.shape[-1]}"
                )
            self.dimensions_ = np.array(self.feature_subset)
        elif self.feature_subset is not None:
            if self.feature_subset > train.shape[-1]:
                raise ScoringError(
                    f"score.mahalanobis.feature_subset = {self.feature_subset} exceeds the feature dimension "
                    f"{train.shape[-1]}"
                )
            # Sorted: the same dimensions in their original order, so a subset of all dims is a no-op.
            rng = np.random.default_rng(self.seed)
            self.dimensions_ = np.sort(rng.choice(train.shape[-1], size=self.feature_subset, replace=False))
        if self.pca_dims is not None:
            kept = train if self.dimensions_ is None else train[..., self.dimensions_]
            from sklearn.decomposition import PCA  # imported only when used: scikit-learn costs ~2 s to import

            n_vectors = int(np.prod(kept.shape[:-1]))
            if self.pca_dims > min(n_vectors, kept.shape[-1]):
                raise ScoringError(
                    f"score.mahalanobis.pca_dims = {self.pca_dims} exceeds min(training vectors {n_vectors}, "
                    f"feature dimension {kept.shape[-1]})"
                )
            self.pca_ = PCA(n_components=self.pca_dims, svd_solver="covariance_eigh")
            self.pca_.fit(kept.reshape(-1, kept.shape[-1]).astype(np.float64))
        samples = _float64_tensor(self._by_gaussian(self._reduced(train)))  # [P, n, d]
        self.gaussians_ = _fit_gaussians(samples, self.shrinkage, self.epsilon, self.ddof)

    def _state(self) -> dict[str, np.ndarray]:
        state = {
            f"gaussians.{field.name}": getattr(self.gaussians_, field.name).numpy()
            for field in dataclasses.fields(self.gaussians_)
            if getattr(self.gaussians_, field.name) is not None
        }
        if self.dimensions_ is not None:
            state["dimensions"] = self.dimensions_
        if self.pca_ is not None:
            state.update({"pca.components": self.pca_.components_, "pca.mean": self.pca_.mean_})
        return state

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        import torch
        self.dimensions_ = state.get("dimensions")
        self.pca_ = None
        if "pca.components" in state:
            from sklearn.decomposition import PCA
            # The attributes PCA.transform reads (no whitening), as fit leaves them.
            self.pca_ = PCA(n_components=self.pca_dims, svd_solver="covariance_eigh")
            self.pca_.components_, self.pca_.mean_ = state["pca.components"], state["pca.mean"]
            self.pca_.n_components_, self.pca_.n_features_in_ = state["pca.components"].shape
        self.gaussians_ = _Gaussians(**{
            field.name: torch.from_numpy(state[f"gaussians.{field.name}"]) if f"gaussians.{field.name}" in state else None
            for field in dataclasses.fields(_Gaussians)
        })

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


