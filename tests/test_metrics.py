"""vitad.evaluation.metrics against independent computations: scikit-learn for AUROC/AP, hand-computed
values and a textbook per-threshold relabelling loop for the PRO curve and AU-PRO."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from vitad.evaluation import metrics

# ----------------------------------------------------------------------------- references


def reference_pro_curve(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Textbook PRO curve: relabel and count at every distinct threshold (slow, obviously right).

    Regions: 8-connected components per image. FPR over all normal pixels of all images. The
    curve gets (0, 0) in front and (1, 1) appended, as the official MVTec AD code does.
    """
    regions = []
    for mask in masks:
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([labeled == k for k in range(1, count + 1)])
    normal_total = sum((~mask).sum() for mask in masks)
    region_count = sum(len(r) for r in regions)
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for threshold in thresholds:
        predicted = [m >= threshold for m in maps]
        fprs.append(sum((p & ~mask).sum() for p, mask in zip(predicted, masks)) / normal_total)
        overlaps = [(p & region).sum() / region.sum() for p, rs in zip(predicted, regions) for region in rs]
        pros.append(sum(overlaps) / region_count)
    return np.array(fprs + [1.0]), np.array(pros + [1.0])


def reference_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area of y(x) for x in [0, limit], y interpolated linearly at the limit, / limit."""
    area = 0.0
    for x0, y0, x1, y1 in zip(x[:-1], y[:-1], x[1:], y[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit


def random_images(seed: int, shapes, levels: int | None = 20):
    """Masks with a few blobs and maps correlated with them; ``levels`` quantises scores (ties)."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for index, shape in enumerate(shapes):
        mask = np.zeros(shape, dtype=bool)
        if index % 3 != 2:  # every third image is good
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
                mask[r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
        score = rng.random(shape) + 0.6 * mask
        if levels:
            score = np.round(score * levels) / levels
        masks.append(mask)
        maps.append(score.astype(np.float32))
    return masks, maps


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(150) < 0.4
    scores = np.round(rng.normal(size=150) + labels, 1)  # many ties
    assert metrics.image_auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-9)
    assert metrics.average_precision(labels, scores) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-9)

    fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thresholds[1:], sk_thresholds[1:])

    precision, recall, pr_thresholds = metrics.pr_curve(labels, scores)
    sk_precision, sk_recall, sk_pr_thresholds = skm.precision_recall_curve(labels, scores)
    order = np.argsort(sk_pr_thresholds)[::-1]  # sklearn lists thresholds ascending, stops at full recall
    count = order.size
    np.testing.assert_allclose(precision[:count], sk_precision[:-1][order], atol=1e-12)
    np.testing.assert_allclose(recall[:count], sk_recall[:-1][order], atol=1e-12)
    np.testing.assert_array_equal(pr_thresholds[:count], sk_pr_thresholds[order])


def test_f1_max_is_the_best_f1_over_thresholds():
    rng = np.random.default_rng(7)
    labels = rng.random(80) < 0.3
    scores = np.round(rng.random(80) + 0.3 * labels, 2)
    best = max(skm.f1_score(labels, scores >= t) for t in np.unique(scores))
    assert metrics.f1_max(labels, scores) == pytest.approx(best, abs=1e-12)


def test_image_metrics_hand_made():
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics.image_auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # a tie counts one half
    assert metrics.image_auroc([0, 1, 1], [0.2, 0.2, 0.9]) == 0.75
    # ranked 0.9 (defective), 0.8 (good), 0.2 (defective), 0.1 (good): P = 1 at R = 1/2, P = 2/3 at R = 1
    assert metrics.average_precision([0, 1, 0, 1], [0.1, 0.9, 0.8, 0.2]) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.f1_max([0, 1, 0, 1], [0.1, 0.9, 0.8, 0.2]) == pytest.approx(0.8)  # 2TP / (2TP + FP + FN) at 0.2


def test_single_class_gives_nan_with_warning():
    for function in (metrics.image_auroc, metrics.average_precision, metrics.f1_max):
        with pytest.warns(metrics.UndefinedMetricWarning, match="no defective"):
            assert np.isnan(function([0, 0, 0], [0.1, 0.2, 0.3]))
        with pytest.warns(metrics.UndefinedMetricWarning, match="no good"):
            assert np.isnan(function([1, 1], [0.1, 0.2]))
    with pytest.raises(ValueError, match="curve undefined"):
        metrics.roc_curve([1, 1], [0.1, 0.2])


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "boolean or 0/1"),
        ([0, 1], [0.1, np.nan], "NaN or infinity at index \\[1\\]"),
        ([0, 1], [0.1, 0.2, 0.3], "differ in length"),
        ([], [], "empty"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_image_metrics_reject_bad_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        metrics.image_auroc(labels, scores)


# ----------------------------------------------------------------------------- pixel level


def test_pixel_auroc_and_ap_agree_with_sklearn_on_images_of_different_sizes(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 37)  # many chunks; tie runs cross chunk borders
    masks, maps = random_images(1, [(12, 15), (20, 20), (9, 30), (16, 11)])
    maps[3][:2] = -0.0
    maps[3][2:4] = 0.0  # -0.0 and 0.0 are one threshold
    maps[3][4] = -0.25
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    result = metrics.pixel_metrics(masks, maps)
    assert result.pixel_auroc == pytest.approx(skm.roc_auc_score(flat_masks, flat_maps), abs=1e-9)
    assert result.pixel_ap == pytest.approx(skm.average_precision_score(flat_masks, flat_maps), abs=1e-9)
    assert result.pixel_f1_max == pytest.approx(metrics.f1_max(flat_masks, flat_maps), abs=1e-12)
    assert metrics.pixel_auroc(masks, maps) == result.pixel_auroc


def test_pixel_metrics_accept_stack_list_and_generator_alike():
    masks, maps = random_images(2, [(10, 10)] * 5)
    from_stack = metrics.pixel_metrics(np.stack(masks), np.stack(maps))
    from_generator = metrics.pixel_metrics(masks, (m for m in maps))
    assert from_stack.pixel_auroc == from_generator.pixel_auroc
    assert from_stack.aupro == from_generator.aupro


def test_aupro_single_region_perfect_and_inverted():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:3, 1:3] = True
    assert metrics.aupro([mask], [mask.astype(np.float32)]) == 1.0
    assert metrics.aupro([mask], [(~mask).astype(np.float32)]) == 0.0


def test_every_region_weighs_the_same():
    """Region A (1 px) found first, region B (9 px) later: PRO is 1/2 where pixel TPR is 1/10."""
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = True  # region A
    mask[2:5, 2:5] = True  # region B, not 8-connected to A
    score = np.zeros((5, 5), dtype=np.float32)
    score[0, 0] = 1.0
    score[0, 4] = 0.8  # one of the 15 normal pixels
    score[2:5, 2:5] = 0.5
    fpr, pro = metrics.pro_curve([mask], [score])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 15, 1 / 15, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1, 1])
    expected = (0.5 / 15 + (0.3 - 1 / 15) * 1.0) / 0.3  # = 1 - 1/9
    assert metrics.aupro([mask], [score]) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(8 / 9)


def test_regions_are_8_connected():
    """Two diagonal pixels form ONE region (8-connectivity), plus a separate 1-px region."""
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    mask[4, 4] = True
    score = np.zeros((5, 5), dtype=np.float32)
    score[0, 0] = 1.0  # half of the diagonal region
    _, pro = metrics.pro_curve([mask], [score])
    assert pro[1] == pytest.approx(0.25)  # 4-connectivity (three regions) would give 1/3


def test_good_images_only_contribute_false_positives():
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = True
    mask[2:5, 2:5] = True
    score = np.zeros((5, 5), dtype=np.float32)
    score[0, 0], score[0, 4] = 1.0, 0.8
    score[2:5, 2:5] = 0.5
    good_mask = np.zeros((5, 5), dtype=bool)
    good_score = np.full((5, 5), 0.9, dtype=np.float32)
    fpr, pro = metrics.pro_curve([mask, good_mask], [score, good_score])
    # At 0.9 the good image's 25 pixels are false positives among 15 + 25 normal pixels; the
    # curve jumps from FPR 0 to 0.625, beyond the limit, with PRO flat at 1/2 in between.
    np.testing.assert_allclose(fpr[:3], [0, 0, 25 / 40])
    np.testing.assert_allclose(pro[:3], [0, 0.5, 0.5])
    assert metrics.aupro([mask, good_mask], [score, good_score]) == pytest.approx(0.5, abs=1e-12)


def test_ties_are_one_operating_point():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    constant = np.full((4, 4), 0.5, dtype=np.float32)
    fpr, pro = metrics.pro_curve([mask], [constant])
    np.testing.assert_array_equal(fpr, [0, 1, 1])
    np.testing.assert_array_equal(pro, [0, 1, 1])
    assert metrics.aupro([mask], [constant]) == pytest.approx(0.15)  # (0.3 * 0.3 / 2) / 0.3
    assert metrics.pixel_auroc([mask], [constant]) == 0.5


def test_curve_that_never_reaches_the_limit_is_interpolated():
    """Normal pixels all tie at the lowest score: FPR jumps from 0 straight to 1."""
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :4] = True
    score = np.zeros((4, 4), dtype=np.float32)
    score[0, :2] = 1.0  # half the region above every normal pixel, half tied with them
    fpr, pro = metrics.pro_curve([mask], [score])
    np.testing.assert_allclose(fpr, [0, 0, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 1, 1])
    # PRO at FPR 0.3 interpolates to 0.5 + 0.5 * 0.3 = 0.65
    assert metrics.aupro([mask], [score]) == pytest.approx(0.5 * (0.5 + 0.65) * 0.3 / 0.3, abs=1e-12)
    assert metrics.aupro([mask], [score], fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("seed, limit", [(3, 0.3), (4, 0.05), (5, 1.0), (6, 0.3)])
def test_pro_curve_and_aupro_match_the_relabelling_loop(seed, limit, monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 53)
    masks, maps = random_images(seed, [(14, 14), (10, 18), (14, 14), (12, 9), (8, 8)], levels=None if seed == 6 else 25)
    fpr, pro = metrics.pro_curve(masks, maps)
    ref_fpr, ref_pro = reference_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    expected = reference_area(ref_fpr, ref_pro, limit)
    assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    assert metrics.pixel_metrics(masks, maps, fpr_limit=limit).aupro == pytest.approx(expected, abs=1e-12)


def test_plot_curves_are_small_subsets_of_the_exact_curves():
    masks, maps = random_images(8, [(60, 60)] * 6, levels=None)
    result = metrics.pixel_metrics(masks, maps, curve_resolution=50)
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    sk_fpr, sk_tpr, _ = skm.roc_curve(flat_masks, flat_maps, drop_intermediate=False)
    exact = set(zip(np.round(sk_fpr, 12), np.round(sk_tpr, 12)))
    fpr, tpr = result.roc
    assert len(fpr) <= 2 * 50 + 2 < len(sk_fpr)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert set(zip(np.round(fpr, 12), np.round(tpr, 12))) <= exact
    recall, precision = result.pr
    assert len(recall) <= 50 + 2 and np.all(np.diff(recall) >= 0) and recall[-1] == 1.0
    pro_fpr, pro = result.pro
    full_fpr, full_pro = metrics.pro_curve(masks, maps)
    assert len(pro_fpr) <= 2 * 50 + 2
    assert set(zip(np.round(pro_fpr, 12), np.round(pro, 12))) <= set(zip(np.round(full_fpr, 12), np.round(full_pro, 12)))


def test_no_anomalous_pixel_gives_nan_with_warning():
    masks = [np.zeros((4, 4), dtype=bool)] * 2
    maps = [np.ones((4, 4), dtype=np.float32)] * 2
    with pytest.warns(metrics.UndefinedMetricWarning, match="no anomalous pixel"):
        result = metrics.pixel_metrics(masks, maps)
    assert np.isnan([result.pixel_auroc, result.pixel_ap, result.pixel_f1_max, result.aupro]).all()
    assert result.roc is None
    with pytest.warns(metrics.UndefinedMetricWarning):
        assert np.isnan(metrics.aupro(masks, maps))
    with pytest.raises(ValueError, match="PRO curve undefined"):
        metrics.pro_curve(masks, maps)


def test_all_anomalous_pixels_give_nan_with_warning():
    with pytest.warns(metrics.UndefinedMetricWarning, match="no normal pixel"):
        assert np.isnan(metrics.pixel_auroc([np.ones((3, 3), dtype=bool)], [np.ones((3, 3), dtype=np.float32)]))


@pytest.mark.parametrize(
    "masks, maps, message",
    [
        ([np.zeros((4, 4), bool)], [np.zeros((4, 5), np.float32)], r"maps\[0\] has shape \(4, 5\) but masks\[0\] has shape \(4, 4\)"),
        ([np.zeros((4, 4), bool)], [np.full((4, 4), np.nan, np.float32)], r"maps\[0\] contains NaN"),
        ([np.zeros((4, 4), np.uint8)], [np.zeros((4, 4), np.float32)], r"masks\[0\] must be boolean"),
        ([np.zeros((4, 4), bool)] * 2, [np.zeros((4, 4), np.float32)], "maps has 1 images but masks has 2"),
        ([np.zeros((4, 4), bool)], [np.zeros((4, 4), np.float32)] * 2, "maps has more images than masks"),
        ([np.zeros((4, 4), bool)], [np.zeros((4, 4), np.int64)], "must be floating point"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), np.float32), r"masks must be \[N, H, W\]"),
        ([], [], "masks is empty"),
    ],
)
def test_pixel_metrics_reject_bad_input(masks, maps, message):
    with pytest.raises(ValueError, match=message):
        metrics.pixel_metrics(masks, maps)


def test_bad_fpr_limit_is_rejected():
    mask = np.eye(4, dtype=bool)
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro([mask], [mask.astype(np.float32)], fpr_limit=0.0)


def test_float64_maps_that_lose_precision_warn():
    mask = np.eye(4, dtype=bool)
    score = np.full((4, 4), 0.1)  # float64 0.1 is not a float32 value
    with pytest.warns(UserWarning, match="float32"):
        metrics.pixel_auroc([mask], [score])
