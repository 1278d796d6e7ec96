"""Nearest-neighbour scoring against a memory bank of training features (PatchCore, AnomalyDINO,
the seed's cosine kNN), with exact faiss search."""

from __future__ import annotations

import functools

import numpy as np

try:
    import faiss
except ImportError as error:  # faiss comes from an extra: the CPU or the GPU build
    raise ImportError(
        "vitad's kNN scoring needs faiss: pip install -e '.[cpu]' (faiss-cpu), or '.[gpu]' (faiss-gpu-cu12) on a "
        "CUDA machine"
    ) from error
from scipy.special import softmax

from vitad.scoring.base import ScoringError, Scorer, bad_param, choice_param, float_param, int_param
from vitad.scoring.coreset import device_type, greedy_coreset
from vitad.scoring.device import knn_backend

METRICS = ("cosine", "euclidean")


def l2_normalised(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy of ``vectors`` [n, D] with unit rows; all-zero rows stay zero (cosine 0 to
    everything, so distance 1: maximally unlike the bank, never NaN)."""
    normalised = np.array(vectors, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(normalised)
    return normalised


def channel_pooling_matrix(n_channels: int, n_pooled: int) -> np.ndarray:
    """[n_channels, n_pooled] float32 matrix of adaptive average pooling over the channel axis
    (``torch.nn.functional.adaptive_avg_pool1d``'s bins: output i averages channels
    floor(i C / d) .. ceil((i + 1) C / d) - 1). PatchCore's paper pools features to 1024 dims
    this way; here it is one pooling of the concatenated layers (the official code pools each
    layer to 1024 first, then their stack)."""
    pooling = np.zeros((n_channels, n_pooled), dtype=np.float32)
    for output in range(n_pooled):
        start = (output * n_channels) // n_pooled
        end = -((-(output + 1) * n_channels) // n_pooled)
        pooling[start:end, output] = 1.0 / (end - start)
    return pooling


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    return faiss.StandardGpuResources()


# Query x bank similarities held at once by the torch search (float32 elements: 1 GiB).
_TORCH_SEARCH_ELEMENTS = 1 << 28


def exact_search(queries: np.ndarray, bank: np.ndarray, k: int, metric: str, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of ``queries`` [n, D] among ``bank`` [N, D] (float32,
    C-contiguous): (inner products, best first, for ``cosine`` on unit rows | squared Euclidean
    distances, nearest first, for ``euclidean``) [n, k] float32 and bank indices [n, k] int64.

    On the CPU, faiss's brute-force search straight on the bank's memory (a flat index would
    hold a copy of it); on cuda, faiss's GPU search or torch (:func:`knn_backend`).
    """
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    backend = knn_backend(device_type(device), faiss.get_num_gpus())
    if backend == "faiss-cpu":
        return faiss.knn(queries, bank, k, metric=faiss_metric)
    if backend == "faiss-gpu":
        return faiss.knn_gpu(_gpu_resources(), queries, bank, k, metric=faiss_metric)
    return _torch_search(queries, bank, k, metric, device)


def _torch_search(queries: np.ndarray, bank: np.ndarray, k: int, metric: str, device) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_search` in torch on ``device``, the queries in chunks."""
    import torch

    bank_on_device = torch.from_numpy(bank).to(device)  # [N, D]
    bank_sq_norms = bank_on_device.square().sum(dim=1)  # [N]
    chunk = max(1, _TORCH_SEARCH_ELEMENTS // len(bank))
    values = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        query_chunk = torch.from_numpy(queries[start : start + chunk]).to(device)  # [c, D]
        products = query_chunk @ bank_on_device.T  # [c, N]
        if metric == "cosine":
            best, where = products.topk(k, dim=1)
        else:
            sq_distances = (query_chunk.square().sum(dim=1, keepdim=True) + bank_sq_norms).sub_(products.mul_(2.0))
            best, where = sq_distances.clamp_min_(0.0).topk(k, dim=1, largest=False)
        values[start : start + len(query_chunk)] = best.cpu().numpy()
        indices[start : start + len(query_chunk)] = where.cpu().numpy()
    return values, indices


class KNNScorer(Scorer):
    """Mean distance to the ``k`` nearest training vectors.

    ``metric``: ``cosine`` (1 - cos on L2-normalised vectors; the seed, AnomalyDINO) or
    ``euclidean`` (on the raw features; PatchCore). Exact search with a faiss flat index (GEMM
    speed, :func:`exact_search`), on the GPU when the scorer's ``device`` is cuda.

    Patch level only (image-level banks hold one vector per image and are always used whole):

    - ``channel_pooling``: average-pool each feature vector to that many dims first
      (:func:`channel_pooling_matrix`; PatchCore paper: 1024; None = off, as in anomalib);
    - ``coreset_ratio`` < 1 shrinks the memory bank to that fraction with PatchCore's greedy
      k-center coreset (:mod:`vitad.scoring.coreset`) in the metric's own space (normalised
      vectors for cosine, raw for euclidean), on a random projection to
      ``coreset_projection_dim`` dims seeded by ``seed``;
    - ``reweight_neighbors`` b > 1: PatchCore's image score (paper eq. 7, anomalib
      ``num_neighbors``): with m_test* the test patch of largest score s*, m* its nearest bank
      vector and N_b(m*) the b nearest bank vectors of m* (m* first), the image score is
      (1 - softmax(d(m_test*, N_b(m*)))[m*]) * s*. b = 1 uses ``aggregate``.
    """

    method = "knn"
    patch_only_params = ("aggregate", "coreset_ratio", "coreset_projection_dim", "reweight_neighbors", "channel_pooling")

    def __init__(
        self,
        k: int = 1,
        metric: str = "cosine",
        coreset_ratio: float = 1.0,
        coreset_projection_dim: int = 128,
        reweight_neighbors: int = 1,
        channel_pooling: int | None = None,
        aggregate: str = "max",
        few_shot: int | None = None,
        seed: int = 0,
    ):
        super().__init__(aggregate, few_shot, seed)
        self.k = int_param(self.method, "k", k, 1)
        self.metric = choice_param(self.method, "metric", metric, METRICS)
        self.coreset_ratio = float_param(self.method, "coreset_ratio", coreset_ratio, 0.0, 1.0, low_inclusive=False)
        self.coreset_projection_dim = int_param(self.method, "coreset_projection_dim", coreset_projection_dim, 1)
        self.reweight_neighbors = int_param(self.method, "reweight_neighbors", reweight_neighbors, 1)
        self.channel_pooling = int_param(self.method, "channel_pooling", channel_pooling, 1, optional=True)
        if self.reweight_neighbors > 1 and self.aggregate != "max":
            raise bad_param(
                self.method, "aggregate", f"max when reweight_neighbors = {self.reweight_neighbors} (PatchCore "
                "reweights the largest patch score)", self.aggregate,
            )

    def _vectors(self, features: np.ndarray) -> np.ndarray:
        """[..., D] -> [n, D'] float32 C-contiguous: channel-pooled (patch level) and, for cosine,
        L2-normalised. A float32 C-contiguous view of the features themselves when neither
        applies (no copy)."""
        vectors = features.reshape(-1, features.shape[-1])  # [n, D]
        if self.pooling_ is not None:
            vectors = vectors @ self.pooling_  # [n, channel_pooling]
        if self.metric == "cosine":
            return l2_normalised(vectors)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _fit(self, train: np.ndarray) -> None:
        patch_level = train.ndim == 4
        self.pooling_ = None
        if patch_level and self.channel_pooling is not None:
            if self.channel_pooling >= train.shape[-1]:
                raise ScoringError(
                    f"score.{self.method}.channel_pooling = {self.channel_pooling} must be below the feature "
                    f"dimension {train.shape[-1]}"
                )
            self.pooling_ = channel_pooling_matrix(train.shape[-1], self.channel_pooling)
        reduced = patch_level and self.coreset_ratio < 1.0
        if reduced:
            # The coreset is chosen on the raw (pooled) vectors, in the metric's own space
            # (unit_rows for cosine), so only the kept rows are ever normalised or copied.
            vectors = train.reshape(-1, train.shape[-1])  # [N * h * w, D]
            if self.pooling_ is not None:
                vectors = vectors @ self.pooling_
            kept = greedy_coreset(
                vectors, self.coreset_ratio, self.seed, self.coreset_projection_dim,
                unit_rows=self.metric == "cosine", device=self.device,
            )
            bank = np.ascontiguousarray(vectors[np.sort(kept)], dtype=np.float32)  # [coreset size, D']
            if self.metric == "cosine":
                faiss.normalize_L2(bank)
        else:
            bank = self._vectors(train)  # [N (* h * w), D']
        if len(bank) < self.k:
            raise ScoringError(
                f"{len(bank)} training vectors{' after the coreset' if reduced else ''} but score.knn.k = {self.k}: "
                "lower k" + (" or raise score.knn.coreset_ratio" if reduced else "")
            )
        self.memory_bank_ = bank  # [bank size, D'], what is searched (normalised for cosine)

    def _state(self) -> dict[str, np.ndarray]:
        pooling = {} if self.pooling_ is None else {"pooling": self.pooling_}
        return {"memory_bank": self.memory_bank_, **pooling}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        self.pooling_ = state.get("pooling")
        self.memory_bank_ = np.ascontiguousarray(state["memory_bank"], dtype=np.float32)

    def _search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances [n, k] in the metric, bank indices [n, k]) of the k nearest bank vectors."""
        similarities, neighbours = exact_search(vectors, self.memory_bank_, k, self.metric, self.device)
        if self.metric == "cosine":
            # Cosine distance is >= 0; clipping removes float rounding of 1 - cos(x, x).
            return np.maximum(1.0 - similarities, 0.0), neighbours
        return np.sqrt(np.maximum(similarities, 0.0)), neighbours  # squared Euclidean distances

    def _score(self, test: np.ndarray) -> np.ndarray:
        distances, _ = self._search(self._vectors(test), self.k)  # [M (* h * w), k]
        return distances.mean(axis=1).reshape(test.shape[:-1])

    def image_scores(self, test: np.ndarray, model_map=None) -> tuple[np.ndarray, np.ndarray]:
        if self.reweight_neighbors == 1:
            return super().image_scores(test, model_map)
        test = self._checked_test(test)
        if test.ndim != 4:
            raise ScoringError(f"image_scores needs patch grids [M, h, w, D], got features {list(test.shape)}")
        queries = self._vectors(test)  # [M * h * w, D']
        distances, neighbours = self._search(queries, self.k)  # [M * h * w, k]
        patch_scores = self._checked_scores(distances.mean(axis=1).reshape(test.shape[:-1]), test)  # [M, h, w]
        n_images, n_patches = len(test), test.shape[1] * test.shape[2]
        worst = patch_scores.reshape(n_images, n_patches).argmax(axis=1)  # m_test* per image [M]
        rows = np.arange(n_images) * n_patches + worst  # their rows in queries
        worst_scores = patch_scores.reshape(n_images, n_patches)[np.arange(n_images), worst]  # s* [M]
        nearest = self.memory_bank_[neighbours[rows, 0]]  # m* [M, D']
        _, support = self._search(nearest, min(self.reweight_neighbors, len(self.memory_bank_)))  # N_b(m*) [M, b]
        support_vectors = self.memory_bank_[support]  # [M, b, D']
        if self.metric == "cosine":
            support_distances = 1.0 - np.einsum("mbd,md->mb", support_vectors, queries[rows])
        else:
            support_distances = np.linalg.norm(support_vectors - queries[rows][:, None, :], axis=2)  # [M, b]
        weights = 1.0 - softmax(support_distances.astype(np.float64), axis=1)[:, 0]
        return self._checked_scores(weights * worst_scores, test), patch_scores
