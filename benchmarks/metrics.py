"""Time and peak memory of the full evaluation of one full-scale category at original resolution.

Builds a synthetic MVTec-layout category in a temporary directory (default: 120 test images of
1024 x 1024, 30 good and 90 defective with blob masks, like MVTec AD's large categories) and a
score file with 28 x 28 patch grids that follow the masks, then runs
``vitad.evaluation.evaluate_category`` exactly as the evaluate stage does: masks read from PNG,
anomaly maps upsampled and blurred on the fly, image and pixel metrics, AU-PRO, curves.

Prints the wall time, the process's peak resident memory, and a breakdown (maps vs. metrics).
Budget from issue 5: under 60 s and under 8 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad.core.data import index_category, sample_mask, split_samples  # noqa: E402
from vitad.evaluation import evaluate_category  # noqa: E402
from vitad.heatmap import anomaly_map  # noqa: E402
from vitad.scorefile import read_category_scores  # noqa: E402
from vitad.core.io import save_arrays  # noqa: E402
from vitad.evaluation.metrics import pixel_metrics  # noqa: E402

CATEGORY = "bench"
GRID = 28


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """bool [size, size]: 1-4 elliptic defects of 0.05-10 % of the image."""
    rows, cols = np.ogrid[:size, :size]
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(1, 5)):
        r, c = rng.uniform(0.1, 0.9, 2) * size
        a, b = rng.uniform(0.01, 0.15, 2) * size
        mask |= ((rows - r) / a) ** 2 + ((cols - c) / b) ** 2 <= 1
    return mask


def build_category(root: Path, images: int, good: int, size: int, seed: int) -> Path:
    """MVTec layout under root/bench and a score file; returns the score file path."""
    rng = np.random.default_rng(seed)
    plain = Image.new("L", (size, size), 128)  # evaluation reads image headers only
    for split_dir in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / CATEGORY / split_dir).mkdir(parents=True)
    plain.save(root / CATEGORY / "train" / "good" / "000.png")
    for index in range(images):
        defect = "good" if index < good else "defect"
        plain.save(root / CATEGORY / "test" / defect / f"{index:03d}.png")
        if defect != "good":
            mask = blob_mask(rng, size)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / CATEGORY / "ground_truth" / "defect" / f"{index:03d}_mask.png")
    samples = split_samples(index_category(root, CATEGORY), "test")
    grids = []
    for sample in samples:
        coverage = np.zeros((GRID, GRID), dtype=np.float32)
        if sample.mask_path:
            mask = Image.open(root / sample.mask_path).resize((GRID, GRID), Image.BOX)
            coverage = np.asarray(mask, dtype=np.float32) / 255
        grids.append(coverage + rng.random((GRID, GRID), dtype=np.float32))
    patch_scores = np.stack(grids)  # [M, GRID, GRID]
    metadata = {
        "backbone": "synthetic",
        "method": "synthetic",
        "category": CATEGORY,
        "weights": {"mode": "random", "seed": seed},
        "grid": [GRID, GRID],
        "test_samples": [sample.to_dict() for sample in samples],
    }
    path = root / "scores" / f"{CATEGORY}.safetensors"
    image_scores = patch_scores.reshape(len(samples), -1).max(axis=1)
    save_arrays(path, {"image_scores": image_scores, "patch_scores": patch_scores, "embedding_scores": image_scores}, metadata)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--good", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--sigma", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        scores_path = build_category(root, args.images, args.good, args.size, args.seed)
        print(f"setup: {args.images} test images of {args.size} x {args.size} ({args.good} good) in {time.perf_counter() - start:.1f} s")
        rss_before = peak_rss_gib()

        start = time.perf_counter()
        values, curves = evaluate_category(root, scores_path, sigma=args.sigma)
        evaluation_seconds = time.perf_counter() - start
        rss_after = peak_rss_gib()
        pixels = args.images * args.size**2
        print(
            f"evaluate_category, original resolution: {evaluation_seconds:.1f} s, peak RSS {rss_after:.2f} GiB "
            f"(process before: {rss_before:.2f} GiB), {pixels / 1e6:.0f} M pixels"
        )
        print("  " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()))
        print("  curve points: " + ", ".join(f"{name} {len(x)}" for name, (x, _) in curves.items()))

        # Breakdown: the maps alone, then the pixel metrics alone on maps held in memory.
        scores = read_category_scores(scores_path)
        start = time.perf_counter()
        maps = [anomaly_map(grid, tuple(s.original_size), args.sigma) for grid, s in zip(scores.patch_scores, scores.test_samples)]
        maps_seconds = time.perf_counter() - start
        masks = [sample_mask(root, s) for s in scores.test_samples]
        start = time.perf_counter()
        pixel_metrics(masks, maps)
        metrics_seconds = time.perf_counter() - start
        print(f"  breakdown: anomaly maps (upsample + blur) {maps_seconds:.1f} s, pixel metrics (one sort) {metrics_seconds:.1f} s")
        print(f"  budget: < 60 s and < 8 GiB on 2 cores -> {'OK' if evaluation_seconds < 60 and rss_after < 8 else 'OVER'}")


if __name__ == "__main__":
    main()
