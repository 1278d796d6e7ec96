"""Patch-score grids -> full-resolution anomaly maps (shared by evaluation, figures and the demo)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] interpolation matrix of half-pixel-centre bilinear resampling, the
    convention of ``torch.nn.functional.interpolate(..., align_corners=False)``: output pixel x
    samples the input at (x + 0.5) * in_size / out_size - 0.5, clamped to the border."""
    source = np.clip((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0, in_size - 1)
    lower = np.floor(source).astype(int)
    upper = np.minimum(lower + 1, in_size - 1)
    fraction = source - lower
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(weights, (np.arange(out_size), lower), 1 - fraction)
    np.add.at(weights, (np.arange(out_size), upper), fraction)
    return weights


UPSAMPLING = ("bilinear", "nearest")


def _nearest_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] 0/1 matrix of ``torch.nn.functional.interpolate(..., mode="nearest")``:
    output pixel x takes input floor(x * in_size / out_size)."""
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    source = np.minimum(np.floor(np.arange(out_size) * (in_size / out_size)).astype(int), in_size - 1)
    weights[np.arange(out_size), source] = 1.0
    return weights


def anomaly_map(
    patch_scores: np.ndarray,
    output_size: tuple[int, int],
    sigma: float = 0.0,
    model_size: int | tuple[int, int] | None = None,
    upsample: str = "bilinear",
) -> np.ndarray:
    """Patch grid [h, w] -> anomaly map [H, W] (float32) at ``output_size`` (height, width).

    Bilinear upsampling with half-pixel centres (``align_corners=False``) treats each patch score
    as the value at its patch centre, exactly as patches tile the resized (not cropped) model
    input, so patch (i, j) lands on the image region it was computed from (the official PatchCore
    code does this). ``upsample="nearest"`` repeats each patch score over its region instead, as
    anomalib's PatchCore and AnomalyDINO maps do. Then a Gaussian blur
    of ``sigma`` pixels OF THE MODEL INPUT (``model_size``, the side the image was resized to;
    required when sigma > 0):
    PatchCore and anomalib blur with sigma = 4 at the model input, so the blur is scaled by
    H / model height and W / model width here, and a map means the same at any output
    resolution (the image's original size or the model input). 0 disables the blur. Borders are
    mirrored without repeating the edge pixel (scipy ``mirror``, torch's ``reflect`` padding,
    which anomalib's blur uses).

    Separable upsampling is two small matrix products (rows [H, h] @ grid [h, w] @ cols [w, W]);
    done in numpy rather than torch so that evaluation, figures and report stages need not import
    torch (seconds per stage process).
    """
    patch_scores = np.asarray(patch_scores)
    if patch_scores.ndim != 2:
        raise ValueError(f"patch_scores must be a 2-D grid [h, w], got shape {patch_scores.shape}")
    if sigma > 0 and model_size is None:
        raise ValueError("sigma is in pixels of the model input: pass model_size (the side images were resized to)")
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")
    height, width = (int(v) for v in output_size)
    weights = _bilinear_weights if upsample == "bilinear" else _nearest_weights
    row_weights = weights(patch_scores.shape[0], height)  # [H, h]
    col_weights = weights(patch_scores.shape[1], width)  # [W, w]
    full = (row_weights @ patch_scores.astype(np.float64) @ col_weights.T).astype(np.float32)  # [H, W]
    if sigma > 0:
        model_height, model_width = (model_size, model_size) if np.isscalar(model_size) else model_size
        full = gaussian_filter(full, sigma=(sigma * height / model_height, sigma * width / model_width), mode="mirror")
    return full


def colour_scale(patch_scores: np.ndarray) -> tuple[float, float]:
    """Fixed colour range (vmin, vmax) for every heatmap of one (backbone, method, category).

    vmin / vmax are the minimum / maximum patch score over ALL test images of the category, so a
    good image and a defective one are drawn on the same scale. Bilinear upsampling and Gaussian
    blurring are weighted averages with non-negative weights, so no anomaly map leaves this range
    and it is computed from the patch grids without upsampling every test image. A constant score
    grid gets a range widened by a relative 1e-6 so that the colour mapping stays defined.
    """
    if patch_scores.size == 0 or not np.isfinite(patch_scores).all():
        raise ValueError("patch_scores must be a non-empty array of finite values")
    vmin, vmax = float(patch_scores.min()), float(patch_scores.max())
    if vmax <= vmin:
        vmax = vmin + 1e-6 * max(abs(vmin), 1.0)
    return vmin, vmax
