import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy.ndimage import gaussian_filter

from vitad.core.data import Sample, index_category, sample_mask
from vitad.figures import (
    FigureSettings,
    figure_name,
    figure_title,
    render_comparison,
    render_in_parallel,
    render_triplet,
    select_examples,
)
from vitad.heatmap import anomaly_map, colour_scale
from vitad.scorefile import ScoresError, read_category_scores, weights_are_random
from vitad.core.io import save_arrays
from vitad.core.params import ParamsError

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["washer", "mesh"]  # two of the three generated categories keep the stage tests fast


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hot_patch(grid: tuple[int, int], row: int, column: int) -> np.ndarray:
    patch_scores = np.zeros(grid, dtype=np.float32)
    patch_scores[row, column] = 1.0
    return patch_scores


def _patch_region(size: tuple[int, int], grid: tuple[int, int], row: int, column: int) -> np.ndarray:
    """bool [H, W]: the pixels patch (row, column) covers when the grid tiles the whole image."""
    patch_height, patch_width = size[0] // grid[0], size[1] // grid[1]
    region = np.zeros(size, dtype=bool)
    region[row * patch_height:(row + 1) * patch_height, column * patch_width:(column + 1) * patch_width] = True
    return region


# --- anomaly_map --------------------------------------------------------------------------------

def test_anomaly_map_has_the_original_size_and_dtype():
    heatmap = anomaly_map(np.zeros((16, 16), dtype=np.float64), (37, 53), sigma=4, model_size=224)
    assert heatmap.shape == (37, 53)
    assert heatmap.dtype == np.float32


@pytest.mark.parametrize(
    ("size", "grid", "row", "column"),
    [((64, 64), (4, 4), 1, 2), ((48, 96), (3, 4), 1, 2), ((48, 96), (3, 4), 2, 0)],
)
def test_hot_patch_lands_exactly_on_its_region(size, grid, row, column):
    # Bilinear (align_corners=False) puts each score at its patch centre: along each axis the
    # profile exceeds half the peak exactly on the pixels nearer that centre than to any other
    # patch centre, i.e. on the patch's own rows and columns.
    heatmap = anomaly_map(_hot_patch(grid, row, column), size, sigma=0)
    region = _patch_region(size, grid, row, column)
    np.testing.assert_array_equal(heatmap.max(axis=1) > 0.5, region.any(axis=1))
    np.testing.assert_array_equal(heatmap.max(axis=0) > 0.5, region.any(axis=0))
    assert region[np.unravel_index(heatmap.argmax(), size)]
    assert heatmap.max() > 0.9  # the patch centre falls between pixel centres: (1 - 0.5 / 16) ** 2 at worst


def test_hot_patch_centroid_on_a_non_square_image_with_a_non_integer_scale():
    size, grid, row, column = (700, 900), (16, 16), 5, 11
    heatmap = anomaly_map(_hot_patch(grid, row, column), size, sigma=0)
    rows, columns = np.indices(size)
    centroid = (rows * heatmap).sum() / heatmap.sum(), (columns * heatmap).sum() / heatmap.sum()
    # Patch centre in pixel-index coordinates: (i + 0.5) * H / h - 0.5.
    expected = (row + 0.5) * size[0] / grid[0] - 0.5, (column + 0.5) * size[1] / grid[1] - 0.5
    np.testing.assert_allclose(centroid, expected, atol=0.5)


def test_no_centre_crop_offset_corners_map_to_corners():
    size, grid = (224, 320), (14, 20)
    heatmap = anomaly_map(_hot_patch(grid, 0, 0), size, sigma=0)
    assert heatmap[0, 0] == pytest.approx(1.0)  # a centre crop would have cut this corner off
    assert heatmap[-1, -1] == 0.0
    opposite = anomaly_map(_hot_patch(grid, grid[0] - 1, grid[1] - 1), size, sigma=0)
    assert opposite[-1, -1] == pytest.approx(1.0)
    assert opposite[0, 0] == 0.0


def test_blur_is_applied_at_full_resolution_after_upsampling():
    size, grid = (96, 128), (6, 8)
    patch_scores = _hot_patch(grid, 2, 3)
    sharp = anomaly_map(patch_scores, size, sigma=0)
    blurred = anomaly_map(patch_scores, size, sigma=4, model_size=size)
    np.testing.assert_allclose(blurred, gaussian_filter(sharp, sigma=4, mode="mirror"), atol=1e-6)
    assert blurred.max() < sharp.max()
    assert (blurred > 1e-3).sum() > (sharp > 1e-3).sum()
    assert np.unravel_index(blurred.argmax(), size) in {(39, 55), (39, 56), (40, 55), (40, 56)}  # patch centre (40, 56)


def test_sigma_is_in_model_input_pixels_at_any_output_resolution():
    """sigma 4 at a 64 px model input is sigma 16 on a 256 px map (and 8 x 16 on a 128 x 256 one):
    the map evaluated at the original resolution is the model-resolution map, upsampled."""
    patch_scores = np.random.default_rng(2).random((8, 8)).astype(np.float32)
    at_model = anomaly_map(patch_scores, (64, 64), sigma=4, model_size=64)
    at_original = anomaly_map(patch_scores, (256, 256), sigma=4, model_size=64)
    np.testing.assert_allclose(at_original, gaussian_filter(anomaly_map(patch_scores, (256, 256)), 16, mode="mirror"), atol=1e-6)
    downsampled = at_original.reshape(64, 4, 64, 4).mean(axis=(1, 3))
    assert np.corrcoef(downsampled.ravel(), at_model.ravel())[0, 1] > 0.999
    non_square = anomaly_map(patch_scores, (128, 256), sigma=4, model_size=64)
    np.testing.assert_allclose(
        non_square, gaussian_filter(anomaly_map(patch_scores, (128, 256)), (8, 16), mode="mirror"), atol=1e-6
    )
    with pytest.raises(ValueError, match="model_size"):
        anomaly_map(patch_scores, (64, 64), sigma=4)


def test_sigma_zero_is_plain_bilinear_upsampling():
    patch_scores = np.random.default_rng(0).random((5, 7), dtype=np.float32)
    expected = F.interpolate(torch.from_numpy(patch_scores)[None, None], size=(50, 70), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(anomaly_map(patch_scores, (50, 70), sigma=0), expected[0, 0].numpy(), atol=1e-6)


def test_nearest_upsampling_is_torchs_nearest():
    patch_scores = np.random.default_rng(3).random((5, 7), dtype=np.float32)
    expected = F.interpolate(torch.from_numpy(patch_scores)[None, None], size=(50, 63), mode="nearest")[0, 0].numpy()
    np.testing.assert_array_equal(anomaly_map(patch_scores, (50, 63), upsample="nearest"), expected)
    with pytest.raises(ValueError, match="upsample must be one of bilinear, nearest"):
        anomaly_map(patch_scores, (50, 63), upsample="bicubic")


def test_anomaly_map_rejects_a_batch():
    with pytest.raises(ValueError, match="2-D grid"):
        anomaly_map(np.zeros((2, 4, 4), dtype=np.float32), (32, 32))


# --- selection, colour scale, weights -----------------------------------------------------------

def _sample(defect: str, stem: str) -> Sample:
    mask = None if defect == "good" else f"c/ground_truth/{defect}/{stem}_mask.png"
    return Sample("c", "test", defect, f"c/test/{defect}/{stem}.png", mask, (8, 8))


def test_select_examples_first_per_defect_sorted_then_good():
    samples = [_sample("scratch", "001"), _sample("good", "001"), _sample("crack", "002"), _sample("scratch", "000"),
               _sample("good", "000"), _sample("crack", "000"), _sample("crack", "001")]
    chosen = select_examples(samples, examples_per_defect=2, good_examples=1)
    assert [(samples[i].defect, Path(samples[i].image_path).stem) for i in chosen] == [
        ("crack", "000"), ("crack", "001"), ("scratch", "000"), ("scratch", "001"), ("good", "000")
    ]
    assert select_examples(list(reversed(samples)), 2, 1) == [len(samples) - 1 - i for i in chosen]
    assert [samples[i].defect for i in select_examples(samples, 0, 2)] == ["good", "good"]
    with pytest.raises(ValueError, match="examples_per_defect"):
        select_examples(samples, -1, 0)


def test_colour_scale_spans_every_map_of_the_category():
    patch_scores = np.random.default_rng(1).normal(size=(4, 6, 6)).astype(np.float32)
    vmin, vmax = colour_scale(patch_scores)
    assert (vmin, vmax) == (float(patch_scores.min()), float(patch_scores.max()))
    for grid in patch_scores:
        heatmap = anomaly_map(grid, (45, 60), sigma=3, model_size=30)
        assert vmin - 1e-6 <= heatmap.min() and heatmap.max() <= vmax + 1e-6
    low, high = colour_scale(np.full((2, 3, 3), 5.0, dtype=np.float32))
    assert low == 5.0 and high > low
    with pytest.raises(ValueError, match="finite"):
        colour_scale(np.array([[[np.nan]]], dtype=np.float32))


def test_weights_are_random():
    assert weights_are_random({"mode": "random", "seed": 0, "source": "random initialisation"})
    assert not weights_are_random({"mode": "pretrained", "source": "facebook/dinov2-base"})
    for malformed in ("random", {"source": "random"}, {"mode": "imagenet"}):
        with pytest.raises(ScoresError, match="mode 'random' or 'pretrained'"):
            weights_are_random(malformed)


def test_figure_settings_errors_name_the_key():
    base = {"examples_per_defect": 1, "good_examples": 1}
    assert FigureSettings.from_params({"heatmap": base}) == FigureSettings(1, 1)
    for key, value, message in [
        ("good_examples", -2, "heatmap.good_examples"),
        ("examples_per_defect", "1", "heatmap.examples_per_defect"),
        ("dpi", 0, "heatmap.dpi"),
    ]:
        with pytest.raises(ParamsError, match=message):
            FigureSettings.from_params({"heatmap": {**base, key: value}})
    with pytest.raises(ParamsError, match="both 0"):
        FigureSettings.from_params({"heatmap": {**base, "examples_per_defect": 0, "good_examples": 0}})


# --- rendering ----------------------------------------------------------------------------------

def test_render_triplet_writes_a_valid_deterministic_png(tmp_path):
    rng = np.random.default_rng(0)
    image = (rng.random((60, 90, 3)) * 255).astype(np.uint8)
    heatmap = anomaly_map(rng.random((4, 6), dtype=np.float32), (60, 90), sigma=2, model_size=32)
    mask = np.zeros((60, 90), dtype=bool)
    mask[10:20, 30:50] = True
    first = render_triplet(tmp_path / "a.png", image, heatmap, mask, (0.0, 1.0), "title", dpi=50)
    second = render_triplet(tmp_path / "b.png", image, heatmap, mask, (0.0, 1.0), "title", dpi=50)
    with Image.open(first) as png:
        png.verify()
    with Image.open(first) as png:
        assert png.format == "PNG"
        width, height = png.size
        assert "Software" not in png.info
    assert 300 < width < 700 and 100 < height < 300 and width > 2.5 * height  # three panels side by side
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary files left behind
    with pytest.raises(ValueError, match="differ in size"):
        render_triplet(tmp_path / "c.png", image, heatmap, mask[:, :80], (0.0, 1.0), "title")


def test_render_in_parallel_writes_the_same_files_in_order_and_raises_the_first_error(tmp_path):
    rng = np.random.default_rng(1)
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:15, 20:40] = True
    figures = [
        ((rng.random((40, 60, 3)) * 255).astype(np.uint8), rng.random((40, 60)).astype(np.float32), f"figure {i}")
        for i in range(3)
    ]
    written = {}
    for workers in (1, 2):
        folder = tmp_path / f"{workers} workers"
        folder.mkdir()
        calls = [(folder / f"{i}.png", image, heatmap, mask, (0.0, 1.0), title, 40) for i, (image, heatmap, title) in enumerate(figures)]
        paths = render_in_parallel(render_triplet, calls, workers=workers)
        assert paths == [call[0] for call in calls]
        written[workers] = [path.read_bytes() for path in paths]
    assert written[1] == written[2]
    assert len(set(written[1])) == 3
    broken = [(tmp_path / "bad.png", figures[0][0], figures[0][1], mask[:, :50], (0.0, 1.0), "bad", 40)]
    with pytest.raises(ValueError, match="differ in size"):
        render_in_parallel(render_triplet, calls[:1] + broken, workers=2)


# --- stages end to end ----------------------------------------------------------------------------

def _write_scores(scores_root: Path, data_root: Path, backbone: str, method: str, weights: dict, grid: int) -> None:
    """Hand-made score files: patch scores high where the ground truth is, plus seeded noise."""
    rng = np.random.default_rng(0)
    for category in CATEGORIES:
        test = [s for s in index_category(data_root, category) if s.split == "test"]
        patch_scores = np.stack([
            5 * F.adaptive_avg_pool2d(torch.from_numpy(sample_mask(data_root, s).astype(np.float32))[None, None], grid)[0, 0].numpy()
            + rng.random((grid, grid), dtype=np.float32)
            for s in test
        ]).astype(np.float32)  # [M, grid, grid]
        save_arrays(
            scores_root / f"{backbone}-{method}" / f"{category}.safetensors",
            {"image_scores": patch_scores.max(axis=(1, 2)), "patch_scores": patch_scores, "embedding_scores": patch_scores.mean(axis=(1, 2))},
            {"run": f"{backbone}-{method}", "backbone": backbone, "recipe": method, "method": method,
             "category": category, "weights": weights, "sigma": 4, "map_upsample": "bilinear", "image_size": 8 * grid,
             "grid": [grid, grid], "test_samples": [s.to_dict() for s in test]},
        )


@pytest.fixture(scope="module")
def pipeline_dir(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    _write_scores(root / "scores", tiny_dataset, "resnet50", "knn", {"mode": "random", "seed": 0}, grid=8)
    _write_scores(root / "scores", tiny_dataset, "dinov2_vitb14", "knn", {"mode": "pretrained", "source": "x"}, grid=6)
    (root / "scores" / "removed_backbone-knn").mkdir()  # left behind by an earlier pipeline: not a row
    runs = {f"{b}-knn": {"backbone": b, "recipe": "knn"} for b in ["resnet50", "dinov2_vitb14"]}
    params = {"pipeline": {"backbones": ["resnet50", "dinov2_vitb14"], "runs": runs},
              "data": {"categories": CATEGORIES}, "heatmap": {"sigma": 4, "examples_per_defect": 1, "good_examples": 1, "dpi": 40}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_heatmap_stage_writes_one_triplet_per_selected_image(pipeline_dir, tiny_dataset):
    out = pipeline_dir / "figures"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")
    argv = ["--scores", str(pipeline_dir / "scores" / "resnet50-knn"), "--data", str(tiny_dataset),
            "--out", str(out), "--params", str(pipeline_dir / "params.yaml")]
    _stage("heatmap").main(argv)
    expected = sorted(
        f"{category}_{defect}_000.png"
        for category, defects in (("washer", ["scratch", "crack", "spot", "good"]), ("mesh", ["broken", "bent", "contamination", "good"]))
        for defect in defects
    )
    assert sorted(p.name for p in out.iterdir()) == expected
    for path in out.iterdir():
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] > 2.5 * png.size[1]
    first = _digests(out)
    _stage("heatmap").main(argv)
    assert _digests(out) == first


def test_compare_stage_writes_one_figure_per_category_with_a_row_per_method(pipeline_dir, tiny_dataset):
    out = pipeline_dir / "compare"
    argv = ["--scores", str(pipeline_dir / "scores"), "--data", str(tiny_dataset), "--out", str(out),
            "--params", str(pipeline_dir / "params.yaml")]
    _stage("compare").main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["mesh.png", "washer.png"]
    with Image.open(out / "washer.png") as png:
        width, height = png.size
    # 4 columns (3 defect types + 1 good), 4 rows (image, ground truth, 2 backbone x method).
    assert png.format == "PNG" and 0.8 < height / width < 1.6


def _write_bad_scores(path: Path, n_patch_grids: int, category: str = "mesh") -> None:
    save_arrays(path, {"image_scores": np.zeros(3, np.float32), "patch_scores": np.zeros((n_patch_grids, 4, 4), np.float32),
                       "embedding_scores": np.zeros(3, np.float32)},
                {"run": "b-m", "backbone": "b", "recipe": "m", "method": "m", "category": category,
                 "weights": {"mode": "random"}, "sigma": 4, "map_upsample": "bilinear", "image_size": 32,
                 "test_samples": [_sample("good", f"00{i}").to_dict() for i in range(3)]})


def test_bad_score_files_get_errors_naming_the_file(pipeline_dir, tiny_dataset, tmp_path):
    incomplete = tmp_path / "scores" / "resnet50-knn"
    incomplete.mkdir(parents=True)
    (incomplete / "washer.safetensors").write_bytes((pipeline_dir / "scores" / "resnet50-knn" / "washer.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="mesh.safetensors"):
        _stage("heatmap").main(["--scores", str(incomplete), "--data", str(tiny_dataset), "--out", str(tmp_path / "f"),
                                "--params", str(pipeline_dir / "params.yaml")])
    _write_bad_scores(tmp_path / "short.safetensors", n_patch_grids=2)
    with pytest.raises(ScoresError, match="short.safetensors: 3 test_samples"):
        read_category_scores(tmp_path / "short.safetensors")
    _write_bad_scores(tmp_path / "other.safetensors", n_patch_grids=3)
    with pytest.raises(ScoresError, match="other.safetensors: holds category 'mesh', expected 'washer'"):
        read_category_scores(tmp_path / "other.safetensors", expected_category="washer")


def test_comparison_refuses_rows_scored_on_different_test_images(pipeline_dir, tiny_dataset, tmp_path):
    washer = read_category_scores(pipeline_dir / "scores" / "resnet50-knn" / "washer.safetensors")
    _write_bad_scores(tmp_path / "washer.safetensors", n_patch_grids=3, category="washer")
    settings = FigureSettings(1, 1)
    with pytest.raises(ScoresError, match="list different test images"):
        render_comparison(tmp_path / "c.png", [washer, read_category_scores(tmp_path / "washer.safetensors")], tiny_dataset, settings)


def test_titles_say_backbone_method_category_defect_score_and_random_weights(pipeline_dir):
    random = read_category_scores(pipeline_dir / "scores" / "resnet50-knn" / "washer.safetensors")
    pretrained = read_category_scores(pipeline_dir / "scores" / "dinov2_vitb14-knn" / "washer.safetensors")
    index = next(i for i, s in enumerate(random.test_samples) if s.defect == "crack")
    title = figure_title(random, index)
    for part in ("resnet50", "knn", "washer", "crack", f"{random.image_scores[index]:.4g}", "random weights"):
        assert part in title
    assert "random" not in figure_title(pretrained, index)


def test_figure_name_is_category_defect_id():
    assert figure_name(_sample("crack", "007")) == "c_crack_007.png"


@pytest.mark.parametrize("grid_shape, size", [((16, 16), (320, 320)), ((7, 11), (48, 96)), ((28, 28), (17, 700))])
def test_upsampling_matches_torch_bilinear_half_pixel(grid_shape, size):
    import torch

    grid = np.random.default_rng(0).normal(size=grid_shape).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid)[None, None], size=size, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(anomaly_map(grid, size, sigma=0), expected, atol=1e-5)
