"""Scoring performance at full MVTec scale, on random features (prints figures, asserts nothing).

Defaults: one category as DINOv2-B/14 at 224 px gives it, a bank of 200 training images x 16 x 16
patches x 768 dims and 100 test images. Prints

- patch kNN (k=1) time of vitad's KNNScorer (fit + score) against a plain faiss IndexFlatIP call
  and scikit-learn's brute-force cosine NearestNeighbors, as ratios from this one run;
- the same scorer with a 10 % coreset (selection included and excluded) and its speed-up;
- greedy coreset selection time for 40,960 x 768 vectors -> 10 %;
- the per-position (PaDiM) Mahalanobis fit: 256 positions x 768-d Gaussians from 200 images;
- peak resident memory of this process after each part.

    .venv/bin/python benchmarks/score.py
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad.scoring.coreset import greedy_coreset  # noqa: E402
from vitad.scoring import KNNScorer, MahalanobisScorer  # noqa: E402


def peak_memory() -> str:
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB"


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def plain_faiss_knn(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    bank = np.ascontiguousarray(train.reshape(-1, train.shape[-1]))
    queries = np.ascontiguousarray(test.reshape(-1, test.shape[-1]))
    faiss.normalize_L2(bank)
    faiss.normalize_L2(queries)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    similarities, _ = index.search(queries, 1)
    return 1.0 - similarities[:, 0]


def sklearn_knn(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    neighbours = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute")
    neighbours.fit(train.reshape(-1, train.shape[-1]))
    distances, _ = neighbours.kneighbors(test.reshape(-1, test.shape[-1]))
    return distances[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--coreset-vectors", type=int, default=40 * 32 * 32)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    train = rng.standard_normal((args.train_images, args.grid, args.grid, args.dim), dtype=np.float32)
    test = rng.standard_normal((args.test_images, args.grid, args.grid, args.dim), dtype=np.float32)
    n_bank, n_queries = train.size // args.dim, test.size // args.dim
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; bank {n_bank} x {args.dim}, {n_queries} queries")

    faiss_scores, faiss_seconds = timed(lambda: plain_faiss_knn(train, test))
    ours_scores, ours_seconds = timed(lambda: KNNScorer().fit(train).score_samples(test))
    sklearn_scores, sklearn_seconds = timed(lambda: sklearn_knn(train, test))
    print(f"patch kNN  plain faiss {faiss_seconds:6.2f} s")
    print(f"patch kNN  vitad       {ours_seconds:6.2f} s  = {ours_seconds / faiss_seconds:.2f}x plain faiss")
    print(f"patch kNN  sklearn     {sklearn_seconds:6.2f} s  = {sklearn_seconds / ours_seconds:.2f}x vitad")
    print(
        f"  max |difference| vitad vs faiss {np.abs(ours_scores.ravel() - faiss_scores).max():.1e}, "
        f"vs sklearn {np.abs(ours_scores.ravel() - sklearn_scores).max():.1e}; {peak_memory()}"
    )

    coreset_scorer = KNNScorer(coreset_ratio=0.1)
    _, coreset_fit_seconds = timed(lambda: coreset_scorer.fit(train))
    _, coreset_score_seconds = timed(lambda: coreset_scorer.score_samples(test))
    full_scorer = KNNScorer().fit(train)
    _, full_score_seconds = timed(lambda: full_scorer.score_samples(test))
    print(
        f"10 % coreset ({coreset_scorer.bank_size_} vectors): fit incl. selection {coreset_fit_seconds:.2f} s, "
        f"score {coreset_score_seconds:.2f} s vs {full_score_seconds:.2f} s without: "
        f"{full_score_seconds / coreset_score_seconds:.1f}x faster scoring, "
        f"{ours_seconds / (coreset_fit_seconds + coreset_score_seconds):.1f}x faster fit + score; {peak_memory()}"
    )

    vectors = rng.standard_normal((args.coreset_vectors, args.dim), dtype=np.float32)
    selected, selection_seconds = timed(lambda: greedy_coreset(vectors, 0.1, seed=0))
    print(f"coreset selection {args.coreset_vectors} x {args.dim} -> {len(selected)}: {selection_seconds:.2f} s; {peak_memory()}")

    padim = MahalanobisScorer(per_position=True)
    _, padim_fit_seconds = timed(lambda: padim.fit(train))
    _, padim_score_seconds = timed(lambda: padim.score_samples(test))
    print(
        f"per-position Mahalanobis (Ledoit-Wolf): {args.grid * args.grid} positions x {args.dim} d from "
        f"{args.train_images} images: fit {padim_fit_seconds:.2f} s, score {args.test_images} images "
        f"{padim_score_seconds:.2f} s; {peak_memory()}"
    )


if __name__ == "__main__":
    main()
