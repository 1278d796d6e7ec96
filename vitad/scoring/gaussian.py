"""Mahalanobis scoring: shrunk Gaussians of the training features, one for all vectors or one per
patch position (PaDiM).

Memory at full MVTec AD scale (400 images, WRN50 at 224 px: 313,600 vectors of 1,536 dims) is
what shapes this module: the bank is never copied to float64. One Gaussian for all vectors
accumulates its mean and scatter matrix over chunks of vectors (float32 products of centred
chunks, summed in float64); per-position Gaussians are fitted a chunk of positions at a time in
float64 and kept in float32 (factors, centred samples), and scoring converts them back to
float64 a chunk at a time. All covariance algebra (shrinkage, Cholesky, triangular solves) runs in
float64.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from vitad.scoring.base import ScoringError, Scorer, bad_param, bool_param, choice_param, float_param, int_param

if TYPE_CHECKING:  # torch and scikit-learn take seconds to import: only the scorers that need them do
    import torch


@dataclass(frozen=True)
class _Gaussians:
    """P Gaussians N(mean_p, a_p S_p + b_p I) in d dims, S_p the ML covariance of n samples.

    Full rank (n (n + d) >= d², the smaller of the two forms): ``factor`` is the Cholesky factor
    of the d x d covariance and ``train_centered`` is None. Otherwise (e.g. 200 images, 768 dims)
    the rank-n structure is used instead (Woodbury): ``factor`` is the Cholesky factor of
    K = n b I_n + a X Xᵀ for the centred samples X [n, d], and
    (x-m)ᵀ Σ⁻¹ (x-m) = (|x-m|² - a |L_K⁻¹ X (x-m)|²) / b. The fit then costs n² d instead of
    n d² + d³ per Gaussian (PaDiM, 256 positions x 768 dims from 200 images: about 2.5 s instead
    of about 27 s, measured on 2 shared cores), and the smaller form is also the smaller to keep.
    Factors and centred samples are stored in float32 (computed in float64).
    """

    mean: torch.Tensor  # [P, d] float64
    factor: torch.Tensor  # [P, d, d] or [P, n, n] float32, lower triangular
    scale: torch.Tensor  # a [P] float64
    offset: torch.Tensor  # b [P] float64
    train_centered: torch.Tensor | None  # [P, n, d] float32 when low rank


def _low_rank(n: int, d: int) -> bool:
    """Whether the rank-n (Woodbury) form of :class:`_Gaussians` is the smaller one."""
    return n * (n + d) < d * d


SHRINKAGES = ("ledoit_wolf", "oas", "fixed")


def _shrinkage_coefficients(
    shrinkage: str, epsilon: float, n: int, d: int, trace: torch.Tensor, frobenius_sq: torch.Tensor,
    row_sq_sq_sum: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) [P] with shrunk covariance a S + b I, from tr(S), |S|_F² and the sum over the centred
    samples of |x_i - m|⁴ [P] (batched over P; equal to scikit-learn's ledoit_wolf / oas)."""
    import torch
    if shrinkage == "fixed":
        return torch.ones_like(trace), torch.full_like(trace, epsilon)
    mu = trace / d  # target: mu I
    if d == 1:  # scikit-learn: no shrinkage in one dimension
        coefficient = torch.zeros_like(trace)
    elif shrinkage == "ledoit_wolf":
        beta = ((row_sq_sq_sum / n - frobenius_sq) / (d * n)).clamp_min(0.0)
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


def _float64_tensor(array: np.ndarray, device="cpu") -> torch.Tensor:
    """A contiguous float64 torch copy of a (possibly transposed) numpy view, on ``device``."""
    import torch
    tensor = torch.empty(array.shape, dtype=torch.float64).copy_(torch.from_numpy(np.asarray(array)))
    return tensor.to(device)


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
    _, n, d = samples.shape
    mean = samples.mean(dim=1)  # [P, d]
    centered = samples.sub_(mean[:, None, :])  # [P, n, d]
    if _low_rank(n, d):
        second_moment = centered @ centered.mT  # Gram X Xᵀ [P, n, n]
        row_sq = second_moment.diagonal(dim1=1, dim2=2)  # |x_i|² [P, n]
    else:
        second_moment = centered.mT @ centered  # scatter Xᵀ X = n S [P, d, d]
        row_sq = torch.linalg.vector_norm(centered, dim=2).square()  # [P, n]
    return _shrunk_gaussians(
        mean, second_moment, row_sq.sum(dim=1), row_sq.square().sum(dim=1), n, d, shrinkage, epsilon, ddof,
        centered if _low_rank(n, d) else None,
    )


def _shrunk_gaussians(
    mean: torch.Tensor,
    second_moment: torch.Tensor,
    row_sq_sum: torch.Tensor,
    row_sq_sq_sum: torch.Tensor,
    n: int,
    d: int,
    shrinkage: str,
    epsilon: float,
    ddof: int,
    centered: torch.Tensor | None,
) -> _Gaussians:
    """:class:`_Gaussians` from the statistics of n samples (float64, batched over P): the mean
    [P, d], the scatter Xᵀ X [P, d, d] (full rank) or the Gram X Xᵀ [P, n, n] of the centred
    samples ``centered`` [P, n, d] (low rank), and the sums of |x_i - m|² and |x_i - m|⁴ [P]."""
    import torch
    n_gaussians = len(mean)
    low_rank = centered is not None
    trace = row_sq_sum / n  # tr(S); |X Xᵀ|_F = |Xᵀ X|_F, so |S|_F² = |second_moment|_F² / n²
    frobenius_sq = second_moment.square().sum(dim=(1, 2)) / n**2
    scale, offset = _shrinkage_coefficients(shrinkage, epsilon, n, d, trace, frobenius_sq, row_sq_sq_sum)
    if ddof:
        if n <= ddof:
            raise ScoringError(f"{n} training vector(s): an unbiased covariance (ddof = {ddof}) needs at least {ddof + 1}")
        scale = scale * (n / (n - ddof))
    if low_rank:
        system = scale[:, None, None] * second_moment
        system.diagonal(dim1=1, dim2=2).add_((n * offset)[:, None])  # K = n b I + a X Xᵀ
    else:
        system = second_moment.mul_((scale / n)[:, None, None])
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
    return _Gaussians(
        mean.cpu(), factor.float().cpu(), scale.cpu(), offset.cpu(), None if centered is None else centered.float().cpu()
    )


# Elements of one chunk of float64 work (64 MiB): queries while scoring, samples of a chunk of
# positions while fitting, vectors while accumulating a scatter matrix.
_CHUNK_ELEMENTS = 1 << 23


def _scatter_statistics(chunks: Callable[[], Iterator[np.ndarray]], device) -> tuple:
    """(n, mean [1, d], scatter Xᵀ X [1, d, d], sum |x_i - m|² [1], sum |x_i - m|⁴ [1]) of the
    vectors ``chunks()`` yields ([c, d] each; called twice: mean, then the centred sums), all
    float64; the products run on float32 centred chunks, summed in float64."""
    import torch
    total, n = None, 0
    for chunk in chunks():
        chunk_sum = _float64_tensor(chunk, device).sum(dim=0)
        total = chunk_sum if total is None else total + chunk_sum
        n += len(chunk)
    mean = total / n
    scatter = torch.zeros((len(mean), len(mean)), dtype=torch.float64, device=device)
    row_sq_sum = row_sq_sq_sum = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in chunks():
        centered = _float64_tensor(chunk, device).sub_(mean)  # [c, d]
        row_sq = centered.square().sum(dim=1)
        row_sq_sum, row_sq_sq_sum = row_sq_sum + row_sq.sum(), row_sq_sq_sum + row_sq.square().sum()
        centered32 = centered.float()
        scatter += (centered32.T @ centered32).double()
    return n, mean[None], scatter[None], row_sq_sum[None], row_sq_sq_sum[None]


def _mahalanobis_distances(gaussians: _Gaussians, queries: np.ndarray, device="cpu") -> np.ndarray:
    """Mahalanobis distances [P, m] (float64) of ``queries`` [P, m, d] to the P Gaussians, a
    chunk of Gaussians and queries at a time (factors back in float64 on ``device``)."""
    import torch
    n_gaussians, n_queries, d = queries.shape
    width = d if gaussians.train_centered is None else max(d, gaussians.train_centered.shape[1])
    matrix_elements = gaussians.factor[0].numel() + (0 if gaussians.train_centered is None else gaussians.train_centered[0].numel())
    position_chunk = max(1, min(n_gaussians, _CHUNK_ELEMENTS // max(matrix_elements, n_queries * width)))
    query_chunk = max(1, _CHUNK_ELEMENTS // (position_chunk * width))
    distances = np.empty((n_gaussians, n_queries), dtype=np.float64)
    for first in range(0, n_gaussians, position_chunk):
        positions = slice(first, first + position_chunk)
        mean = gaussians.mean[positions].to(device)
        factor = gaussians.factor[positions].to(device, torch.float64)
        scale, offset = gaussians.scale[positions].to(device), gaussians.offset[positions].to(device)
        train_centered = None if gaussians.train_centered is None else gaussians.train_centered[positions].to(device, torch.float64)
        for start in range(0, n_queries, query_chunk):
            centered = _float64_tensor(queries[positions, start : start + query_chunk], device).sub_(mean[:, None, :])  # [p, c, d]
            if train_centered is None:
                with _batched_linalg_threads(len(mean)):
                    whitened = torch.linalg.solve_triangular(factor, centered.mT, upper=False)  # [p, d, c]
                squared = whitened.square().sum(dim=1)
            else:
                projected = train_centered @ centered.mT  # X (x - m) [p, n, c]
                with _batched_linalg_threads(len(mean)):
                    solved = torch.linalg.solve_triangular(factor, projected, upper=False)  # [p, n, c]
                squared = centered.square().sum(dim=2) - scale[:, None] * solved.square().sum(dim=1)
                squared = squared / offset[:, None]
            distances[positions, start : start + query_chunk] = squared.clamp_min(0.0).sqrt().cpu().numpy()
    return distances


@dataclass(frozen=True)
class _PCA:
    """A principal component projection, fitted from the covariance of the training vectors
    (scikit-learn's ``PCA(svd_solver="covariance_eigh")`` without its float64 copy of them; the
    same attributes and signs)."""

    mean_: np.ndarray  # [D] float64
    components_: np.ndarray  # [k, D] float64, by decreasing variance
    explained_variance_: np.ndarray  # [k] float64

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """[n, D] -> [n, k] float64."""
        return (np.asarray(vectors, dtype=np.float64) - self.mean_) @ self.components_.T


def _pca_from_scatter(mean: np.ndarray, scatter: np.ndarray, n: int, n_components: int) -> _PCA:
    eigenvalues, eigenvectors = np.linalg.eigh(scatter / max(n - 1, 1))
    top = np.argsort(eigenvalues)[::-1][:n_components]
    components = eigenvectors[:, top].T  # [k, D]
    # scikit-learn's sign convention (svd_flip on the components): largest |entry| positive.
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    return _PCA(mean, components * signs[:, None], np.maximum(eigenvalues[top], 0.0))


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
        flat = self.pca_.transform(features.reshape(-1, features.shape[-1]))  # [n, d]
        return flat.reshape(*features.shape[:-1], flat.shape[-1])

    def _reduced_chunks(self, vectors: np.ndarray) -> Callable[[], Iterator[np.ndarray]]:
        """A re-iterable of the reduced vectors of ``vectors`` [n, D], a chunk at a time."""
        step = max(1, _CHUNK_ELEMENTS // vectors.shape[-1])

        def chunks() -> Iterator[np.ndarray]:
            for start in range(0, len(vectors), step):
                yield self._reduced(vectors[start : start + step])

        return chunks

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
        vectors = train.reshape(-1, train.shape[-1])  # [N (* h * w), D], a view
        kept_dims = train.shape[-1] if self.dimensions_ is None else len(self.dimensions_)
        if self.pca_dims is not None:
            if self.pca_dims > min(len(vectors), kept_dims):
                raise ScoringError(
                    f"score.mahalanobis.pca_dims = {self.pca_dims} exceeds min(training vectors {len(vectors)}, "
                    f"feature dimension {kept_dims})"
                )
            n, mean, scatter, _, _ = _scatter_statistics(self._reduced_chunks(vectors), self.device)
            self.pca_ = _pca_from_scatter(mean[0].cpu().numpy(), scatter[0].cpu().numpy(), n, self.pca_dims)
        dims = kept_dims if self.pca_ is None else self.pca_dims
        if train.ndim == 4 and self.per_position:
            self.gaussians_ = self._fit_per_position(train, dims)
        elif _low_rank(len(vectors), dims):  # few vectors (image embeddings): one small float64 copy
            samples = _float64_tensor(self._reduced(vectors)[None], self.device)  # [1, n, d]
            self.gaussians_ = _fit_gaussians(samples, self.shrinkage, self.epsilon, self.ddof)
        else:
            n, mean, scatter, row_sq_sum, row_sq_sq_sum = _scatter_statistics(self._reduced_chunks(vectors), self.device)
            self.gaussians_ = _shrunk_gaussians(
                mean, scatter, row_sq_sum, row_sq_sq_sum, n, dims, self.shrinkage, self.epsilon, self.ddof, None
            )

    def _fit_per_position(self, train: np.ndarray, dims: int) -> _Gaussians:
        """One Gaussian per patch position of ``train`` [N, h, w, D], fitted a chunk of positions
        at a time (float64) into float32 storage."""
        import torch
        n_images, height, width, _ = train.shape
        n_positions = height * width
        by_position = train.reshape(n_images, n_positions, train.shape[-1])  # [N, P, D], a view
        low_rank = _low_rank(n_images, dims)
        side = n_images if low_rank else dims
        mean = torch.empty((n_positions, dims), dtype=torch.float64)
        factor = torch.empty((n_positions, side, side), dtype=torch.float32)
        scale, offset = torch.empty(n_positions, dtype=torch.float64), torch.empty(n_positions, dtype=torch.float64)
        centered = torch.empty((n_positions, n_images, dims), dtype=torch.float32) if low_rank else None
        chunk = max(1, _CHUNK_ELEMENTS // (max(side, n_images) * dims))
        for first in range(0, n_positions, chunk):
            positions = slice(first, first + chunk)
            samples = _float64_tensor(self._reduced(by_position[:, positions]).transpose(1, 0, 2), self.device)  # [p, N, d]
            part = _fit_gaussians(samples, self.shrinkage, self.epsilon, self.ddof)
            mean[positions], factor[positions] = part.mean, part.factor
            scale[positions], offset[positions] = part.scale, part.offset
            if centered is not None:
                centered[positions] = part.train_centered
        return _Gaussians(mean, factor, scale, offset, centered)

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
        if test.ndim == 4 and self.per_position:
            if test.shape[1:3] != self.train_shape_[1:3]:
                raise ScoringError(
                    f"per-position Gaussians were fitted on a {self.train_shape_[1]}x{self.train_shape_[2]} patch "
                    f"grid, test grid is {test.shape[1]}x{test.shape[2]}"
                )
            n_images, height, width, dims = test.shape
            by_position = test.reshape(n_images, height * width, dims)  # [M, h * w, D], a view
            gaussians = self.gaussians_
            distances = np.empty((height * width, n_images), dtype=np.float64)  # [h * w, M]
            # A chunk of positions at a time: the reduced test features are never held whole.
            chunk = max(1, _CHUNK_ELEMENTS // (n_images * dims))
            for first in range(0, height * width, chunk):
                positions = slice(first, first + chunk)
                part = _Gaussians(
                    gaussians.mean[positions], gaussians.factor[positions], gaussians.scale[positions],
                    gaussians.offset[positions],
                    None if gaussians.train_centered is None else gaussians.train_centered[positions],
                )
                queries = self._reduced(by_position[:, positions]).transpose(1, 0, 2)  # [p, M, d]
                distances[positions] = _mahalanobis_distances(part, queries, self.device)
            return distances.T.reshape(test.shape[:-1])
        vectors = test.reshape(-1, test.shape[-1])  # [M (* h * w), D]
        distances = np.concatenate([
            _mahalanobis_distances(self.gaussians_, chunk[None], self.device)[0] for chunk in self._reduced_chunks(vectors)()
        ])
        return distances.reshape(test.shape[:-1])
