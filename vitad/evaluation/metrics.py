"""Anomaly detection metrics with the official MVTec AD semantics, as pure functions.

Image level: ``labels`` [N] (bool, True = defective) and ``scores`` [N] (float, higher = more
anomalous). Pixel level: ``masks`` (bool ground truth) and ``maps`` (float anomaly maps), each
either an array [N, H, W] or a sequence of N per-image 2-D arrays; images may differ in size
(MVTec AD at original resolution does), but each map must have its mask's shape. ``maps`` may
also be any iterable yielding the 2-D maps, e.g. a generator that computes them on the fly, so a
category never needs all its full-resolution maps in memory at once.

Every distinct score is a threshold: the curves are exact, tied scores form one operating point.

Pixel metrics rank all pixels of all images with ONE sort: each pixel becomes a 64-bit key (its
float32 score mapped to an order-preserving integer in the high half, its ground-truth region
id in the low half, 0 for normal pixels), and the sorted keys are swept in chunks that keep
running counts. This sort is about 5x faster than ``np.argsort`` on float32 and needs 8 bytes per
pixel (about 1 GB for 120 images of 1024 x 1024). Measured on 21 M pixels (20 images of
1024 x 1024, 2 shared cores): scikit-learn's roc_auc_score + average_precision_score take 40 s
and 1.4 GB peak; :func:`pixel_metrics` gives both plus AU-PRO and F1-max in 5 s and 0.7 GB.
Pixel maps are compared in float32, the dtype of :func:`vitad.heatmap.anomaly_map`: scores
that differ only beyond float32 precision are ties.

Undefined metrics: a set with no positive (defective image / anomalous pixel) or no negative
sample gives NaN and an :class:`UndefinedMetricWarning`; the curve functions raise ValueError.
Shape mismatches, non-finite scores and non-binary labels raise ValueError naming the input.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # official MVTec AD: regions are 8-connected
_CHUNK_PIXELS = 1 << 22  # sorted keys swept per step: bounds the temporaries to ~100 MB


class UndefinedMetricWarning(UserWarning):
    """A metric is NaN because the data lacks positives or negatives."""


# ----------------------------------------------------------------------------- input checks


def _check_labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    if labels.size == 0:
        raise ValueError("labels and scores are empty")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels must be boolean or 0/1, got values {np.unique(labels)[:5].tolist()}")
        labels = labels.astype(bool)
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    non_finite = np.flatnonzero(~np.isfinite(scores))
    if non_finite.size:
        raise ValueError(f"scores contain NaN or infinity at index {non_finite[:5].tolist()}")
    return labels, scores


def _image_list(arrays, name: str) -> Sequence[np.ndarray]:
    """[N, H, W] array or sequence of 2-D arrays -> sequence of 2-D arrays (views, no copies)."""
    if isinstance(arrays, np.ndarray):
        if arrays.ndim != 3:
            raise ValueError(f"{name} must be [N, H, W] or a list of 2-D arrays, got shape {arrays.shape}")
    else:
        arrays = list(arrays)
    if len(arrays) == 0:
        raise ValueError(f"{name} is empty")
    return arrays


def _undefined(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} undefined (NaN): {reason}", UndefinedMetricWarning, stacklevel=3)
    return float("nan")


# ----------------------------------------------------------------------------- operating points


@dataclass(frozen=True)
class _OperatingPoints:
    """Cumulative counts at consecutive distinct thresholds, highest threshold first.

    ``region_overlap[k]`` is the sum over ground-truth regions of the fraction of the region's
    pixels scored at or above threshold k (the PRO numerator before dividing by the number of
    regions); None at image level.
    """

    false_positives: np.ndarray  # int64 [K]
    true_positives: np.ndarray  # int64 [K]
    region_overlap: np.ndarray | None = None  # float64 [K]


def _image_operating_points(labels: np.ndarray, scores: np.ndarray) -> tuple[_OperatingPoints, np.ndarray]:
    """All distinct thresholds of image scores: (points, thresholds [K], descending)."""
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    last_of_tie = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    ends = np.flatnonzero(last_of_tie)
    true_positives = np.cumsum(labels[order], dtype=np.int64)[ends]
    false_positives = ends + 1 - true_positives
    return _OperatingPoints(false_positives, true_positives), sorted_scores[ends]


def _descending_key(anomaly_map: np.ndarray) -> np.ndarray:
    """float32 [H, W] -> uint32 [H, W] whose ascending integer order is descending score order."""
    values = np.asarray(anomaly_map, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0: equal scores, equal keys
    bits = values.view(np.uint32)
    # Non-negative floats: invert the magnitude bits (bigger score -> smaller key, all below 2**31).
    # Negative floats: their raw bits already grow as the value falls, and all are >= 2**31.
    return bits ^ np.where(bits >> 31 == 1, np.uint32(0), np.uint32(0x7FFFFFFF))


def _rank_pixels(masks, maps: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pack and sort every pixel: (keys uint64 [P], highest score first; region sizes int64 [R]).

    Key = descending score key << 32 | region id, where region ids number the 8-connected
    ground-truth regions of all images from 1 and normal pixels have id 0.
    """
    masks = _image_list(masks, "masks")
    if isinstance(maps, np.ndarray) and maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W] or a list of 2-D arrays, got shape {maps.shape}")
    keys = np.empty(sum(int(np.asarray(mask).size) for mask in masks), dtype=np.uint64)
    region_sizes = []
    offset = regions_so_far = count = 0
    for count, anomaly_map in enumerate(maps, start=1):
        if count > len(masks):
            raise ValueError(f"maps has more images than masks ({len(masks)})")
        index = count - 1
        mask, anomaly_map = np.asarray(masks[index]), np.asarray(anomaly_map)
        if mask.dtype != bool:
            raise ValueError(f"masks[{index}] must be boolean (e.g. mask > 0), got dtype {mask.dtype}")
        if mask.ndim != 2 or anomaly_map.shape != mask.shape:
            raise ValueError(f"maps[{index}] has shape {anomaly_map.shape} but masks[{index}] has shape {mask.shape}")
        if not np.issubdtype(anomaly_map.dtype, np.floating):
            raise ValueError(f"maps[{index}] must be floating point, got dtype {anomaly_map.dtype}")
        if not np.isfinite(anomaly_map).all():
            raise ValueError(f"maps[{index}] contains NaN or infinity")
        if anomaly_map.dtype != np.float32 and (anomaly_map.astype(np.float32) != anomaly_map).any():
            warnings.warn(
                f"maps[{index}] ({anomaly_map.dtype}) has values that float32 rounds: pixel metrics rank "
                "the float32-rounded scores, so scores equal at float32 precision count as ties",
                stacklevel=3,
            )
        labeled, region_count = ndimage.label(mask, structure=EIGHT_CONNECTED)  # int32 [H, W]
        region_sizes.append(np.bincount(labeled.ravel(), minlength=region_count + 1)[1:])
        region_ids = labeled.ravel().astype(np.uint64)
        region_ids[region_ids > 0] += np.uint64(regions_so_far)
        segment = keys[offset : offset + mask.size]
        segment[:] = _descending_key(anomaly_map).ravel()
        segment <<= np.uint64(32)
        segment |= region_ids
        offset += mask.size
        regions_so_far += region_count
    if count < len(masks):
        raise ValueError(f"maps has {count} images but masks has {len(masks)}")
    keys.sort()
    return keys, np.concatenate(region_sizes).astype(np.int64)


def _pixel_operating_points(keys: np.ndarray, region_sizes: np.ndarray) -> Iterator[_OperatingPoints]:
    """Sweep sorted pixel keys in chunks, yielding the operating points that end in each chunk."""
    region_weights = np.concatenate(([0.0], 1.0 / region_sizes))  # [R + 1]; 1/|region|, 0 for normal
    false_positives_before, overlap_before = 0, 0.0
    for start in range(0, keys.size, _CHUNK_PIXELS):
        stop = min(start + _CHUNK_PIXELS, keys.size)
        block = keys[start:stop]
        score_keys = block >> np.uint64(32)
        last_of_tie = np.empty(block.size, dtype=bool)
        np.not_equal(score_keys[:-1], score_keys[1:], out=last_of_tie[:-1])
        last_of_tie[-1] = stop == keys.size or (keys[stop] >> np.uint64(32)) != score_keys[-1]
        region_ids = (block & np.uint64(0xFFFFFFFF)).astype(np.intp)
        false_positives = np.cumsum(region_ids == 0, dtype=np.int64)
        false_positives += false_positives_before
        weights = region_weights[region_ids]
        weights[0] += overlap_before  # continue the running sum exactly as one long cumsum would
        overlap = np.cumsum(weights)
        ends = np.flatnonzero(last_of_tie)
        if ends.size:  # a chunk inside one long run of tied scores ends no operating point
            yield _OperatingPoints(false_positives[ends], start + ends + 1 - false_positives[ends], overlap[ends])
        false_positives_before, overlap_before = int(false_positives[-1]), float(overlap[-1])


# ----------------------------------------------------------------------------- streaming summary


class _DownsampledCurve:
    """Keeps the first point of every cell of a grid of 1/resolution, plus the last point."""

    def __init__(self, resolution: int, start: tuple[float, float] | None):
        self.resolution = resolution
        self.x_parts: list[np.ndarray] = [np.array([start[0]])] if start else []
        self.y_parts: list[np.ndarray] = [np.array([start[1]])] if start else []
        self.previous_cell = 0 if start else -1
        self.last_point: tuple[float, float] | None = start
        self.last_kept = True

    def add(self, x: np.ndarray, y: np.ndarray, monotone_y: bool) -> None:
        cells = np.floor(x * self.resolution).astype(np.int64)
        if monotone_y:
            cells += np.floor(y * self.resolution).astype(np.int64)
        keep = cells != np.concatenate(([self.previous_cell], cells[:-1]))
        self.x_parts.append(x[keep])
        self.y_parts.append(y[keep])
        self.previous_cell = int(cells[-1])
        self.last_point = (float(x[-1]), float(y[-1]))
        self.last_kept = bool(keep[-1])

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.last_kept:
            self.x_parts.append(np.array([self.last_point[0]]))
            self.y_parts.append(np.array([self.last_point[1]]))
            self.last_kept = True
        return np.concatenate(self.x_parts), np.concatenate(self.y_parts)


class _Summary:
    """Folds operating points (highest threshold first) into AUROC, AP, F1-max and AU-PRO."""

    def __init__(self, positives: int, negatives: int, regions: int = 0, fpr_limit: float = 0.3, curve_resolution: int = 0):
        self.positives, self.negatives, self.regions, self.fpr_limit = positives, negatives, regions, fpr_limit
        self.false_positives, self.true_positives = 0, 0
        self.roc_area_twice = 0  # exact integer: sum of d(FP) * (TP + TP_prev)
        self.precision_weighted_recall = 0.0  # sum of d(TP) * precision
        self.best_f1 = 0.0
        self.pro_fpr, self.pro = 0.0, 0.0
        self.pro_area, self.pro_done = 0.0, False
        self.curves = None
        if curve_resolution:
            self.curves = {
                "roc": _DownsampledCurve(curve_resolution, (0.0, 0.0)),
                "pr": _DownsampledCurve(curve_resolution, None),
                "pro": _DownsampledCurve(curve_resolution, (0.0, 0.0)),
            }

    def add(self, points: _OperatingPoints) -> None:
        false_positives, true_positives = points.false_positives, points.true_positives
        previous_fp = np.concatenate(([self.false_positives], false_positives[:-1]))
        previous_tp = np.concatenate(([self.true_positives], true_positives[:-1]))
        self.roc_area_twice += int(np.sum((false_positives - previous_fp) * (true_positives + previous_tp)))
        precision = true_positives / (true_positives + false_positives)
        self.precision_weighted_recall += float(np.sum((true_positives - previous_tp) * precision))
        # F1 = 2 TP / (2 TP + FP + FN) with FN = positives - TP
        self.best_f1 = max(self.best_f1, float(np.max(2 * true_positives / (true_positives + false_positives + self.positives))))
        self.false_positives, self.true_positives = int(false_positives[-1]), int(true_positives[-1])
        fpr = false_positives / self.negatives
        if points.region_overlap is not None:
            pro = np.minimum(points.region_overlap / self.regions, 1.0)  # as the official code: clip cumsum drift
            self._add_pro(fpr, pro)
        if self.curves:
            recall = true_positives / self.positives
            self.curves["roc"].add(fpr, recall, monotone_y=True)
            self.curves["pr"].add(recall, precision, monotone_y=False)
            if points.region_overlap is not None:
                self.curves["pro"].add(fpr, pro, monotone_y=True)

    def _add_pro(self, fpr: np.ndarray, pro: np.ndarray) -> None:
        """Trapezoids of the PRO curve up to fpr_limit, interpolating linearly at the limit."""
        if self.pro_done:
            return
        x = np.concatenate(([self.pro_fpr], fpr))
        y = np.concatenate(([self.pro], pro))
        inside = int(np.count_nonzero(x[1:] <= self.fpr_limit))  # a prefix: FPR never decreases
        self.pro_area += float(np.sum(0.5 * (y[1 : inside + 1] + y[:inside]) * (x[1 : inside + 1] - x[:inside])))
        if inside < fpr.size:
            x0, y0, x1, y1 = x[inside], y[inside], x[inside + 1], y[inside + 1]
            if x0 < self.fpr_limit:
                y_at_limit = y0 + (y1 - y0) * (self.fpr_limit - x0) / (x1 - x0)
                self.pro_area += 0.5 * (y_at_limit + y0) * (self.fpr_limit - x0)
            self.pro_done = True
        self.pro_fpr, self.pro = float(x[-1]), float(y[-1])

    def auroc(self) -> float:
        return self.roc_area_twice / (2 * self.positives * self.negatives)

    def average_precision(self) -> float:
        return self.precision_weighted_recall / self.positives

    def aupro(self) -> float:
        self._add_pro(np.array([1.0]), np.array([1.0]))  # the official curve ends with (1, 1)
        return self.pro_area / self.fpr_limit


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")


def _image_summary(labels, scores, metric: str) -> _Summary | None:
    labels, scores = _check_labels_scores(labels, scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        kind = "defective" if positives == 0 else "good"
        _undefined(metric, f"no {kind} sample among {labels.size}")
        return None
    summary = _Summary(positives, negatives)
    summary.add(_image_operating_points(labels, scores)[0])
    return summary


# ----------------------------------------------------------------------------- image level


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores.

    ROC: (FPR, TPR) at every distinct score threshold t, where a sample is predicted anomalous
    iff score >= t, FPR = FP / #good, TPR = TP / #defective; starts at (0, 0), ends at (1, 1);
    area by the trapezoidal rule (ties count one half, as in the Mann-Whitney U statistic).
    Computed exactly in integers. NaN with a warning if there is no good or no defective sample.
    """
    summary = _image_summary(labels, scores, "image_auroc")
    return summary.auroc() if summary else float("nan")


def average_precision(labels, scores) -> float:
    """Average precision: sum over distinct thresholds (descending) of (R_k - R_{k-1}) * P_k.

    P_k = TP/(TP+FP) and R_k = TP/#positives at the k-th threshold, R_0 = 0 (scikit-learn's
    definition: a step-wise, not interpolated, area under the PR curve). NaN with a warning if
    there is no positive or no negative sample.
    """
    summary = _image_summary(labels, scores, "average_precision")
    return summary.average_precision() if summary else float("nan")


def f1_max(labels, scores) -> float:
    """Best F1 = 2PR/(P+R) = 2TP/(2TP+FP+FN) over all distinct score thresholds.

    NaN with a warning if there is no positive or no negative sample.
    """
    summary = _image_summary(labels, scores, "f1_max")
    return summary.best_f1 if summary else float("nan")


def _curve_inputs(labels, scores) -> tuple[_OperatingPoints, np.ndarray, int, int]:
    labels, scores = _check_labels_scores(labels, scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"curve undefined: {positives} positive and {negatives} negative samples; need both")
    points, thresholds = _image_operating_points(labels, scores)
    return points, thresholds, positives, negatives


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr, thresholds), one point per distinct score plus the start (0, 0).

    Point k: samples with score >= thresholds[k] are predicted anomalous; thresholds descend;
    the start point has threshold +inf. Raises ValueError without both classes.
    """
    points, thresholds, positives, negatives = _curve_inputs(labels, scores)
    fpr = np.concatenate(([0.0], points.false_positives / negatives))
    tpr = np.concatenate(([0.0], points.true_positives / positives))
    return fpr, tpr, np.concatenate(([np.inf], thresholds))


def pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve (precision, recall, thresholds), one point per distinct score.

    Point k: samples with score >= thresholds[k] are predicted anomalous; thresholds descend,
    so recall rises. Precision = TP/(TP+FP), recall = TP/#positives. Raises ValueError without
    both classes.
    """
    points, thresholds, positives, _ = _curve_inputs(labels, scores)
    true_positives, false_positives = points.true_positives, points.false_positives
    return true_positives / (true_positives + false_positives), true_positives / positives, thresholds


# ----------------------------------------------------------------------------- pixel level


@dataclass(frozen=True)
class PixelMetrics:
    """Every pixel-level figure of one ranking of all pixels (see :func:`pixel_metrics`).

    Curves are downsampled for plotting to the first point of every 1/curve_resolution grid
    cell (plus the end point), so they stay within ~2 * curve_resolution points; None when
    the metrics are undefined or curve_resolution is 0.
    """

    pixel_auroc: float
    pixel_ap: float
    pixel_f1_max: float
    aupro: float
    roc: tuple[np.ndarray, np.ndarray] | None  # (fpr, tpr)
    pr: tuple[np.ndarray, np.ndarray] | None  # (recall, precision)
    pro: tuple[np.ndarray, np.ndarray] | None  # (fpr, pro)


def pixel_metrics(masks, maps, fpr_limit: float = 0.3, curve_resolution: int = 500) -> PixelMetrics:
    """Pixel AUROC, pixel AP, pixel F1-max and AU-PRO from one sort of all pixels.

    Definitions as :func:`pixel_auroc`, :func:`aupro` (and :func:`average_precision`,
    :func:`f1_max` applied to all pixels). ``maps`` may be a generator: it is consumed once,
    one image at a time. All metrics are NaN, with a warning, if no pixel is anomalous or none
    is normal.
    """
    _check_fpr_limit(fpr_limit)
    keys, region_sizes = _rank_pixels(masks, maps)
    positives = int(region_sizes.sum())
    negatives = keys.size - positives
    if positives == 0 or negatives == 0:
        reason = "no anomalous pixel in the masks" if positives == 0 else "no normal pixel in the masks"
        nan = _undefined("pixel metrics and AU-PRO", reason)
        return PixelMetrics(nan, nan, nan, nan, None, None, None)
    summary = _Summary(positives, negatives, region_sizes.size, fpr_limit, curve_resolution)
    for points in _pixel_operating_points(keys, region_sizes):
        summary.add(points)
    curves = {name: curve.points() for name, curve in summary.curves.items()} if summary.curves else {}
    return PixelMetrics(
        pixel_auroc=summary.auroc(),
        pixel_ap=summary.average_precision(),
        pixel_f1_max=summary.best_f1,
        aupro=summary.aupro(),
        roc=curves.get("roc"),
        pr=curves.get("pr"),
        pro=curves.get("pro"),
    )


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels of all images, each pixel one sample (official MVTec AD).

    Same definition as :func:`image_auroc` with pixels as samples, labels = masks, scores =
    maps (compared in float32). NaN with a warning if no pixel is anomalous or none is normal.
    """
    return pixel_metrics(masks, maps, curve_resolution=0).pixel_auroc


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve (fpr, pro) of the official MVTec AD evaluation.

    Ground-truth regions are the 8-connected components of every mask. At each distinct score
    threshold t (descending; ties form one point): FPR = normal pixels scored >= t / all normal
    pixels of all images, good images included; PRO = mean over all regions of all images,
    each weighing the same, of (region pixels scored >= t) / (region size). The curve starts
    at (0, 0) and ends with (1, 1) appended, values clipped to <= 1, as the official code does.
    Raises ValueError if there is no region or no normal pixel.
    """
    keys, region_sizes = _rank_pixels(masks, maps)
    negatives = keys.size - int(region_sizes.sum())
    if region_sizes.size == 0 or negatives == 0:
        raise ValueError(f"PRO curve undefined: {region_sizes.size} regions and {negatives} normal pixels; need both")
    chunks = list(_pixel_operating_points(keys, region_sizes))
    false_positives = np.concatenate([chunk.false_positives for chunk in chunks])
    overlap = np.concatenate([chunk.region_overlap for chunk in chunks])
    fpr = np.concatenate(([0.0], false_positives / negatives, [1.0]))
    pro = np.concatenate(([0.0], np.minimum(overlap / region_sizes.size, 1.0), [1.0]))
    return fpr, pro


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit] (official MVTec AD).

    Integrates :func:`pro_curve` by the trapezoidal rule over [0, fpr_limit]; where no curve
    point lies exactly at the limit, PRO is interpolated linearly between the neighbouring
    points. The area is divided by fpr_limit, so the result lies in [0, 1]. NaN with a
    warning if there is no anomalous or no normal pixel.
    """
    return pixel_metrics(masks, maps, fpr_limit=fpr_limit, curve_resolution=0).aupro
