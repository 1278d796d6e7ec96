"""The seed project's baseline: distance to the nearest k-means centroid of the training features."""

from __future__ import annotations

import numpy as np

from vitad.scoring.base import ScoringError, Scorer, int_param


class KMeansScorer(Scorer):
    """Euclidean distance to the nearest of ``n_clusters`` k-means centroids fitted on the
    training vectors (the seed project's ResNet50 + KMeans baseline); scikit-learn KMeans,
    k-means++ initialisation seeded by ``seed``, one run."""

    method = "kmeans"

    def __init__(self, n_clusters: int = 8, aggregate: str = "max", few_shot: int | None = None, seed: int = 0):
        super().__init__(aggregate, few_shot, seed)
        self.n_clusters = int_param(self.method, "n_clusters", n_clusters, 1)

    def _fit(self, train: np.ndarray) -> None:
        from sklearn.cluster import KMeans
        bank = train.reshape(-1, train.shape[-1])  # [N (* h * w), D]
        if len(bank) < self.n_clusters:
            raise ScoringError(f"{len(bank)} training vectors but score.kmeans.n_clusters = {self.n_clusters}")
        self.kmeans_ = KMeans(n_clusters=self.n_clusters, n_init=1, random_state=self.seed).fit(bank)

    def _state(self) -> dict[str, np.ndarray]:
        return {"cluster_centers": self.kmeans_.cluster_centers_}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        from sklearn.cluster import KMeans
        # The attributes KMeans.transform reads, as fit leaves them.
        self.kmeans_ = KMeans(n_clusters=self.n_clusters, n_init=1, random_state=self.seed)
        self.kmeans_.cluster_centers_ = state["cluster_centers"]
        self.kmeans_.n_features_in_ = state["cluster_centers"].shape[1]

    def _score(self, test: np.ndarray) -> np.ndarray:
        distances = self.kmeans_.transform(test.reshape(-1, test.shape[-1]))  # [M (* h * w), n_clusters]
        return distances.min(axis=1).reshape(test.shape[:-1])

