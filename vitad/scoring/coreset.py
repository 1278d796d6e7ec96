"""PatchCore's greedy k-center coreset: shrink a memory bank while keeping its coverage.

Greedy k-center (Gonzalez 1985; PatchCore, Roth et al. 2022) starts from one point and then
repeatedly adds the point farthest from everything selected so far, so the selected subset covers
the bank with a radius within a factor 2 of the best possible. PatchCore runs it on a random
projection of the features (Johnson-Lindenstrauss: distances are nearly preserved) to make each
step cheap.

The textbook loop (anomalib's ``KCenterGreedy``) is one matrix-vector product per selected point
over the whole bank: memory bound, since the projected bank does not stay in cache (313,600 x 128
float32 = 160 MB for a full MVTec AD category). On the CPU this module gives the same selection
with cache-sized matrix products that skip what cannot matter:

- the bank is cut into blocks of ``_BLOCK_SIZE`` rows; a large bank is first reordered so that
  consecutive rows are close to each other (the leaves of a ball tree: recursive median splits
  along each group's principal direction), and each block gets its centroid and radius;
- every block remembers how many of the selected centres its min-distances already include and
  an upper bound of its largest min-distance (min-distances only shrink when centres are added,
  so a stale maximum stays a valid upper bound);
- to find the next farthest point, the block with the largest bound is brought up to date
  against the centres it has not seen yet ("lazy" evaluation); once the block with the largest
  bound is up to date, its farthest point is the global farthest point;
- in a large bank, bringing a block up to date skips every centre farther from the block's
  centroid than its radius plus the block's bound (triangle inequality: such a centre is farther from each point
  of the block than that point's current min-distance), so late in the selection, when the
  covering radius is small, a block is compared only with the few centres next to it, in one
  matrix product.

Every (point, centre) distance that can change a min-distance is computed once, as in the
textbook loop. On a CUDA device the textbook loop itself runs on the GPU (torch), where the whole
projected bank sits in fast memory.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

# Rows per block: 256 x (128 + 1) float32 = 132 KB stays in L2 cache while a block is updated.
_BLOCK_SIZE = 256
# Blocks from which the ball-tree order and the triangle-inequality test pay for themselves: in a
# small bank few centres are far enough from a block to be skipped, and the test is pure overhead
# (benchmarks/scale.py times a full category; a bank of the default dataset is below this).
_PRUNE_MIN_BLOCKS = 256


def coreset_size(n_vectors: int, ratio: float) -> int:
    """Number of vectors a coreset of ``ratio`` keeps: round(ratio * n), at least 1."""
    return max(1, min(n_vectors, int(round(ratio * n_vectors))))


# Rows of the bank projected per chunk (bounds the temporaries of the projection).
_PROJECTION_CHUNK = 1 << 15


def random_projection(vectors: np.ndarray, projection_dim: int, seed: int, unit_rows: bool = False) -> np.ndarray:
    """[N, D] -> [N, projection_dim] float32 by a seeded Gaussian matrix scaled by
    1/sqrt(projection_dim) (Johnson-Lindenstrauss), or a float32 copy of the vectors when
    D <= projection_dim, where projecting would only cost time and add distortion.

    ``unit_rows``: project the L2-normalised rows (all-zero rows stay zero) without a normalised
    copy of the bank: the projection is linear, so each projected row is divided by its norm.
    The bank is read in chunks, so a float16 or memory-mapped bank is never converted whole.
    """
    n_vectors, n_features = vectors.shape
    projection = None
    if n_features > projection_dim:
        rng = np.random.default_rng(seed)
        projection = rng.standard_normal((n_features, projection_dim), dtype=np.float32)
        projection /= np.float32(np.sqrt(projection_dim))
    projected = np.empty((n_vectors, min(n_features, projection_dim)), dtype=np.float32)
    for start in range(0, n_vectors, _PROJECTION_CHUNK):
        chunk = np.asarray(vectors[start : start + _PROJECTION_CHUNK], dtype=np.float32)  # [c, D]
        out = projected[start : start + len(chunk)]
        if projection is None:
            out[:] = chunk
        else:
            np.matmul(chunk, projection, out=out)
        if unit_rows:
            norms = np.linalg.norm(chunk, axis=1)
            out /= np.where(norms > 0, norms, 1.0)[:, None]
    return projected


def greedy_coreset(
    vectors: np.ndarray,
    ratio: float,
    seed: int,
    projection_dim: int = 128,
    unit_rows: bool = False,
    device: str = "cpu",
    start: int | None = None,
) -> np.ndarray:
    """Indices (int64, in selection order) of PatchCore's greedy k-center coreset of ``vectors``.

    ``vectors`` [N, D] (finite; any float dtype, memory-mapped is fine); ``ratio`` in (0, 1] is
    the fraction kept (:func:`coreset_size`); 1.0 returns all indices in order (coreset off). The
    first centre is drawn from ``seed``, which also seeds the random projection to
    ``projection_dim`` dims, so the result is deterministic for a seed. Each later index is the
    vector with the largest Euclidean distance (in the projection) to its nearest
    already-selected vector. The prefix of the returned order is itself a greedy coreset of that
    size. ``unit_rows``: select among the L2-normalised vectors (the cosine metric's space)
    without copying the bank. ``device``: ``cuda`` runs the selection on the GPU (torch).
    ``start``: the first centre instead of the seeded draw (to compare with another
    implementation's draw).
    """
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"greedy_coreset needs a non-empty 2-D array [N, D], got shape {vectors.shape}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
    n_vectors = vectors.shape[0]
    projected = random_projection(vectors, projection_dim, seed, unit_rows)
    if not np.isfinite(projected).all():
        raise ValueError("greedy_coreset: vectors contain NaN or inf")
    if ratio == 1.0:
        return np.arange(n_vectors, dtype=np.int64)
    n_select = coreset_size(n_vectors, ratio)
    if start is None:
        start = int(np.random.default_rng(seed).integers(n_vectors))
    elif not 0 <= start < n_vectors:
        raise ValueError(f"coreset start {start} is not an index of the {n_vectors} vectors")
    if device_type(device) == "cuda":
        return _greedy_k_center_torch(projected, n_select, start, device)
    # The loop multiplies cache-sized blocks: one BLAS thread per product is about 3x faster
    # than the default pool, whose start-up per small product dominates (measured on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        if n_vectors < _PRUNE_MIN_BLOCKS * _BLOCK_SIZE:
            return _lazy_greedy_k_center(projected, n_select, start, prune=False)
        order = _ball_tree_order(projected)
        position = np.empty(n_vectors, dtype=np.int64)
        position[order] = np.arange(n_vectors)
        return order[_lazy_greedy_k_center(projected[order], n_select, int(position[start]), prune=True)]


def device_type(device) -> str:
    """``cpu`` or ``cuda`` from a device name or torch.device (``cuda:1`` -> ``cuda``)."""
    return str(device).split(":")[0]


def _greedy_k_center_torch(points: np.ndarray, n_select: int, start: int, device) -> np.ndarray:
    """The textbook greedy loop on ``device`` (torch): one pass over ``points`` [N, p] per centre."""
    import torch

    on_device = torch.from_numpy(points).to(device)
    squared_norms = on_device.square().sum(dim=1)  # [N]
    min_sq_distances = torch.full_like(squared_norms, float("inf"))
    selected = torch.empty(n_select, dtype=torch.int64, device=on_device.device)
    index = torch.tensor(start, device=on_device.device)
    for step in range(n_select):
        selected[step] = index
        centre = on_device[index]  # [p]
        sq_distances = squared_norms + squared_norms[index] - 2.0 * (on_device @ centre)
        torch.minimum(min_sq_distances, sq_distances, out=min_sq_distances)
        min_sq_distances[index] = -float("inf")  # selected points are never selected again
        index = torch.argmax(min_sq_distances)
    return selected.cpu().numpy()


def _ball_tree_order(points: np.ndarray) -> np.ndarray:
    """A permutation of the rows of ``points`` [N, p] whose consecutive runs of ``_BLOCK_SIZE``
    rows are spatially compact: the leaves of a ball tree, split at the median along each
    group's principal direction (two power iterations from its farthest point), so that every
    left part holds whole blocks."""
    order = np.arange(len(points))
    pending = [(0, len(points))]
    while pending:
        low, high = pending.pop()
        n_blocks = -(-(high - low) // _BLOCK_SIZE)
        if n_blocks <= 1:
            continue
        centred = points[order[low:high]]
        centred -= centred.mean(axis=0)  # [g, p]
        direction = centred[int(np.argmax(np.einsum("ij,ij->i", centred, centred)))]
        for _ in range(2):
            direction = centred.T @ (centred @ direction)
            direction /= max(float(np.linalg.norm(direction)), np.finfo(np.float32).tiny)
        split = (n_blocks // 2) * _BLOCK_SIZE
        order[low:high] = order[low:high][np.argpartition(centred @ direction, split - 1)]
        pending += [(low, low + split), (low + split, high)]
    return order


def _lazy_greedy_k_center(points: np.ndarray, n_select: int, start: int, prune: bool = True) -> np.ndarray:
    """Greedy k-center on float32 ``points`` [N, p] from ``start``, block-lazy; with ``prune``
    (``points`` in ball-tree order) centres too far from a block are skipped (see module doc)."""
    n_points, dim = points.shape
    n_blocks = -(-n_points // _BLOCK_SIZE)
    # ||x - c||^2 = ||x||^2 + (||c||^2 - 2 x.c); the bracket is one product of the augmented
    # rows [x, 1] with the augmented centres [-2 c, ||c||^2], and ||x||^2 is added after the min.
    augmented = np.zeros((n_blocks * _BLOCK_SIZE, dim + 1), dtype=np.float32)
    augmented[:n_points, :dim] = points
    augmented[:, dim] = 1.0
    blocks = augmented.reshape(n_blocks, _BLOCK_SIZE, dim + 1)  # [B, bs, p + 1]
    squared_norms = np.einsum("bij,bij->bi", blocks[:, :, :dim], blocks[:, :, :dim])  # [B, bs]
    # Block centroids [B, p + 1] augmented like the rows, and radii [B] (padding rows excluded).
    rows_per_block = np.minimum(_BLOCK_SIZE, n_points - np.arange(n_blocks) * _BLOCK_SIZE)
    centroids = blocks.sum(axis=1) / rows_per_block[:, None].astype(np.float32)
    centroids[:, dim] = 1.0
    centroid_sq_norms = np.einsum("bj,bj->b", centroids[:, :dim], centroids[:, :dim])
    offsets = np.linalg.norm(blocks[:, :, :dim] - centroids[:, None, :dim], axis=2)  # [B, bs]
    radii = np.where(np.arange(_BLOCK_SIZE)[None, :] < rows_per_block[:, None], offsets, 0.0).max(axis=1)
    # Rounding of the expanded distances is relative to the squared norms: a margin keeps the
    # pruning from skipping a centre that rounding would have let through.
    radii = radii * np.float32(1.0 + 1e-4) + np.float32(1e-3) * np.sqrt(squared_norms.max(axis=1))
    min_sq_distances = np.full((n_blocks, _BLOCK_SIZE), np.inf, dtype=np.float32)
    min_sq_distances.reshape(-1)[n_points:] = -np.inf  # padding rows are never selected
    block_bounds = np.full(n_blocks, np.inf, dtype=np.float32)  # >= max of each block's row
    centres_seen = np.zeros(n_blocks, dtype=np.int64)  # centres included in each block's row
    centres = np.empty((n_select, dim + 1), dtype=np.float32)  # augmented [-2 c, ||c||^2]
    selected = np.empty(n_select, dtype=np.int64)

    index = start
    for step in range(n_select):
        selected[step] = index
        block, row = divmod(index, _BLOCK_SIZE)
        centres[step, :dim] = -2.0 * blocks[block, row, :dim]
        centres[step, dim] = squared_norms[block, row]
        min_sq_distances[block, row] = -np.inf  # selected points are never selected again
        n_centres = step + 1
        if n_centres == n_select:
            break
        while True:
            block = int(np.argmax(block_bounds))
            if centres_seen[block] == n_centres:
                break
            relevant = unseen = centres[centres_seen[block] : n_centres]  # [m, p + 1]
            if prune:
                # ||c - centroid||^2 [m]; only centres within radius + sqrt(bound) can lower a row.
                centroid_sq_distances = unseen @ centroids[block] + centroid_sq_norms[block]
                reach = radii[block] + np.sqrt(block_bounds[block])
                relevant = unseen[centroid_sq_distances < reach * reach]
            if len(relevant):
                nearest_relevant = (blocks[block] @ relevant.T).min(axis=1) + squared_norms[block]  # [bs]
                np.minimum(min_sq_distances[block], nearest_relevant, out=min_sq_distances[block])
            block_bounds[block] = min_sq_distances[block].max()
            centres_seen[block] = n_centres
        index = block * _BLOCK_SIZE + int(np.argmax(min_sq_distances[block]))
    return selected
