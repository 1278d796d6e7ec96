"""Patch-score grids -> full-resolution anomaly maps, and the figures made from them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def anomaly_map(patch_scores: np.ndarray, original_size: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Patch grid [h, w] -> anomaly map [H, W] (float32) at the image's original (height, width).

    Bilinear upsampling with ``align_corners=False`` treats each patch score as the value at its
    patch centre, exactly as patches tile the resized (not cropped) model input, so patch (i, j)
    lands on the image region it was computed from. Then a Gaussian blur of ``sigma`` pixels at
    full resolution (0 disables it), as in PatchCore and the official MVTec evaluation practice.
    """
    if patch_scores.ndim != 2:
        raise ValueError(f"patch_scores must be a 2-D grid [h, w], got shape {patch_scores.shape}")
    grid = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))[None, None]  # [1, 1, h, w]
    upsampled = F.interpolate(grid, size=tuple(original_size), mode="bilinear", align_corners=False)
    full = upsampled[0, 0].numpy()  # [H, W]
    if sigma > 0:
        full = gaussian_filter(full, sigma=sigma, mode="nearest")
    return full.astype(np.float32, copy=False)
