"""vitad.evaluation and the evaluate / report stages, on the tiny generated dataset with score
files written here (patch grids that follow the masks plus seeded noise)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn import metrics as skm

from vitad import evaluation
from vitad.evaluation import metrics
from vitad.core.cli import StageError
from vitad.core.data import index_category, sample_mask, split_samples
from vitad.heatmap import anomaly_map
from vitad.core.io import load_arrays, save_arrays

REPO = Path(__file__).resolve().parents[1]
RANDOM_WEIGHTS = {"mode": "random", "seed": 0, "source": "random initialisation"}
GRID = 8


def write_scores(path: Path, data_root: Path, category: str, seed: int = 0, method: str = "knn", weights=RANDOM_WEIGHTS, **extra) -> Path:
    """A score file as the score stage writes it: patch grids = the mask averaged onto the grid + noise."""
    samples = split_samples(index_category(data_root, category), "test")
    rng = np.random.default_rng(seed)
    grids = []
    for sample in samples:
        mask = Image.fromarray(sample_mask(data_root, sample).astype(np.uint8) * 255)
        coverage = np.asarray(mask.resize((GRID, GRID), Image.BOX), dtype=np.float32) / 255  # [GRID, GRID]
        grids.append(coverage + 0.5 * rng.random((GRID, GRID)))
    patch_scores = np.stack(grids).astype(np.float32)  # [M, GRID, GRID]
    image_scores = patch_scores.reshape(len(samples), -1).max(axis=1)
    metadata = {
        "run": f"resnet50-{method}",
        "backbone": "resnet50",
        "recipe": method,
        "method": method,
        "category": category,
        "sigma": 4,
        "map_upsample": "bilinear",
        "image_size": 64,
        "weights": weights,
        "grid": [GRID, GRID],
        "test_samples": [sample.to_dict() for sample in samples],
        **extra,
    }
    embedding_scores = patch_scores.reshape(len(samples), -1).mean(axis=1)
    save_arrays(path, {"image_scores": image_scores, "patch_scores": patch_scores, "embedding_scores": embedding_scores}, metadata)
    return path


def independent_pixel_data(data_root: Path, scores_path: Path, size: int | None = None):
    """Masks read straight from the PNGs and maps from the patch grids, built without vitad.evaluation."""
    arrays, metadata = load_arrays(scores_path)
    masks, maps = [], []
    for index, record in enumerate(metadata["test_samples"]):
        height, width = record["original_size"]
        mask = np.zeros((height, width), dtype=bool)
        if record["mask_path"]:
            mask = np.asarray(Image.open(data_root / record["mask_path"]).convert("L")) > 0
        target = (size, size) if size else (height, width)
        if size:
            mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
        masks.append(mask)
        maps.append(anomaly_map(arrays["patch_scores"][index], target, metadata["sigma"], metadata["image_size"], "bilinear"))
    return masks, maps


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- evaluate_category


def test_original_resolution_metrics_match_an_independent_computation(tiny_dataset, tmp_path):
    path = write_scores(tmp_path / "washer.safetensors", tiny_dataset, "washer")
    values, curves = evaluation.evaluate_category(tiny_dataset, path)
    assert set(values) == set(evaluation.METRIC_NAMES)

    masks, maps = independent_pixel_data(tiny_dataset, path)
    assert masks[0].shape == (320, 320)  # washer's original size, not the 8 x 8 grid
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    assert values["pixel_auroc"] == pytest.approx(skm.roc_auc_score(flat_masks, flat_maps), abs=1e-9)
    assert values["pixel_ap"] == pytest.approx(skm.average_precision_score(flat_masks, flat_maps), abs=1e-9)
    assert values["aupro"] == pytest.approx(metrics.aupro(masks, maps), abs=1e-12)

    arrays, metadata = load_arrays(path)
    labels = [record["defect"] != "good" for record in metadata["test_samples"]]
    assert values["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, arrays["image_scores"]), abs=1e-9)
    assert values["image_ap"] == pytest.approx(skm.average_precision_score(labels, arrays["image_scores"]), abs=1e-9)
    assert values["f1_max"] == pytest.approx(metrics.f1_max(labels, arrays["image_scores"]))
    assert values["embedding_image_auroc"] == pytest.approx(skm.roc_auc_score(labels, arrays["embedding_scores"]), abs=1e-9)
    assert values["embedding_image_ap"] == pytest.approx(
        skm.average_precision_score(labels, arrays["embedding_scores"]), abs=1e-9
    )
    assert values["embedding_image_auroc"] != values["image_auroc"]  # two routes, two scores
    assert set(curves) == set(evaluation.CURVE_COLUMNS)
    assert len(curves["image_roc"][0]) <= len(labels) + 1
    assert all(len(x) == len(y) <= 1002 for x, y in curves.values())


def test_model_resolution_uses_the_model_input_size(tiny_dataset, tmp_path):
    path = write_scores(tmp_path / "mesh.safetensors", tiny_dataset, "mesh", image_size=56)
    values, _ = evaluation.evaluate_category(tiny_dataset, path, resolution="model")
    masks, maps = independent_pixel_data(tiny_dataset, path, size=56)
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    assert values["pixel_auroc"] == pytest.approx(skm.roc_auc_score(flat_masks, flat_maps), abs=1e-9)
    original, _ = evaluation.evaluate_category(tiny_dataset, path)
    assert original["pixel_auroc"] != values["pixel_auroc"]


def test_score_file_without_image_size_or_sigma_says_what_is_missing(tiny_dataset, tmp_path):
    path = write_scores(tmp_path / "mesh.safetensors", tiny_dataset, "mesh")
    arrays, metadata = load_arrays(path)
    for key in ("image_size", "sigma"):
        save_arrays(path, arrays, {name: value for name, value in metadata.items() if name != key})
        with pytest.raises(ValueError, match=f"mesh.safetensors: missing {key}"):
            evaluation.evaluate_category(tiny_dataset, path, resolution="model")
    save_arrays(path, arrays, {**metadata, "sigma": -1})
    with pytest.raises(ValueError, match="mesh.safetensors: sigma must be a number >= 0"):
        evaluation.evaluate_category(tiny_dataset, path)


def good_only_dataset(tiny_dataset: Path, root: Path) -> Path:
    """A copy of weave whose test set has good images only."""
    shutil.copytree(tiny_dataset / "weave", root / "weave")
    shutil.rmtree(root / "weave" / "ground_truth")
    for defect_dir in (root / "weave" / "test").iterdir():
        if defect_dir.name != "good":
            shutil.rmtree(defect_dir)
    return root


def test_category_without_defects_gives_nan_with_a_warning_naming_the_file(tiny_dataset, tmp_path):
    root = good_only_dataset(tiny_dataset, tmp_path / "data")
    path = write_scores(tmp_path / "weave.safetensors", root, "weave")
    with pytest.warns(metrics.UndefinedMetricWarning, match="weave.safetensors: image_auroc undefined"):
        values, curves = evaluation.evaluate_category(root, path)
    assert all(np.isnan(value) for value in values.values())
    assert curves == {}


def test_mean_is_null_when_a_category_is_undefined(tiny_dataset, tmp_path):
    root = good_only_dataset(tiny_dataset, tmp_path / "data")
    shutil.copytree(tiny_dataset / "mesh", root / "mesh")
    write_scores(tmp_path / "scores" / "weave.safetensors", root, "weave")
    write_scores(tmp_path / "scores" / "mesh.safetensors", root, "mesh")
    with pytest.warns(UserWarning):
        run = evaluation.evaluate_run(root, tmp_path / "scores", ["weave", "mesh"])
        record = evaluation.detail_record(run)
    assert record["weave"]["image_auroc"] is None and record["mean"]["image_auroc"] is None
    assert 0 <= record["mesh"]["image_auroc"] <= 1
    assert json.loads(json.dumps(record)) == record  # plain JSON: no NaN tokens
    tables = evaluation.curve_tables(run)
    assert "weave" not in tables["pixel_roc"] and "mesh," in tables["pixel_roc"]


def test_stale_scores_are_refused(tiny_dataset, tmp_path):
    path = write_scores(tmp_path / "weave.safetensors", tiny_dataset, "weave")
    arrays, metadata = load_arrays(path)
    metadata["test_samples"] = metadata["test_samples"][1:]
    save_arrays(path, {name: array[1:] for name, array in arrays.items()}, metadata)
    with pytest.raises(evaluation.EvaluationError, match="stale"):
        evaluation.evaluate_category(tiny_dataset, path)


def test_nan_scores_are_refused_naming_the_file(tiny_dataset, tmp_path):
    path = write_scores(tmp_path / "weave.safetensors", tiny_dataset, "weave")
    arrays, metadata = load_arrays(path)
    arrays["patch_scores"][0, 0, 0] = np.nan
    save_arrays(path, arrays, metadata)
    with pytest.raises(ValueError, match="weave.safetensors.*NaN"):
        evaluation.evaluate_category(tiny_dataset, path)


@pytest.mark.parametrize(
    "settings, message",
    [({"resolution": "full"}, "evaluate.resolution"), ({"fpr_limit": 1.5}, "evaluate.fpr_limit")],
)
def test_bad_settings_name_their_parameter(tiny_dataset, tmp_path, settings, message):
    path = write_scores(tmp_path / "weave.safetensors", tiny_dataset, "weave")
    with pytest.raises(evaluation.EvaluationError, match=message):
        evaluation.evaluate_category(tiny_dataset, path, **settings)


def test_score_files_of_one_run_must_agree(tiny_dataset, tmp_path):
    write_scores(tmp_path / "weave.safetensors", tiny_dataset, "weave")
    write_scores(tmp_path / "mesh.safetensors", tiny_dataset, "mesh", weights={"mode": "pretrained", "source": "facebook/dinov2-base"})
    with pytest.raises(evaluation.EvaluationError, match="disagree"):
        evaluation.evaluate_run(tiny_dataset, tmp_path, ["weave", "mesh"])


# ----------------------------------------------------------------------------- stages


def write_params(path: Path, categories, **evaluate) -> Path:
    params = {
        "data": {"categories": list(categories)},
        "evaluate": {"resolution": "original", "fpr_limit": 0.3, **evaluate},
    }
    path.write_text(yaml.safe_dump(params))
    return path


def run_evaluate(tmp_path: Path, data: Path, scores: Path, name: str, params: Path) -> tuple[Path, Path]:
    metrics_path = tmp_path / "reports" / "metrics" / f"{name}.json"
    plots = tmp_path / "reports" / "plots" / name
    load_stage("evaluate").main(
        ["--params", str(params), "--scores", str(scores), "--data", str(data), "--metrics", str(metrics_path), "--plots", str(plots)]
    )
    return metrics_path, plots


def test_evaluate_and_report_stages_write_deterministic_outputs(tiny_dataset, tmp_path):
    categories = ["weave", "mesh", "washer"]
    params = write_params(tmp_path / "params.yaml", categories)
    for seed, method in enumerate(["knn", "kmeans"]):
        for category in categories:
            write_scores(tmp_path / "scores" / f"resnet50-{method}" / f"{category}.safetensors", tiny_dataset, category, seed, method)
        metrics_path, plots = run_evaluate(tmp_path, tiny_dataset, tmp_path / "scores" / f"resnet50-{method}", f"resnet50-{method}", params)

    record = json.loads(evaluation.detail_path(metrics_path).read_text())
    assert list(record) == ["mean", "mesh", "washer", "weave"]  # sorted keys
    headline = json.loads(metrics_path.read_text())  # the DVC metrics file: means of the headline metrics
    assert headline == {name: record["mean"][name] for name in evaluation.HEADLINE_METRICS}
    assert all(set(values) == set(evaluation.METRIC_NAMES) for values in record.values())
    assert record["mean"]["aupro"] == pytest.approx(np.mean([record[c]["aupro"] for c in categories]))
    info = json.loads((metrics_path.parent / "resnet50-kmeans.info.json").read_text())
    assert info["random_weights"] is True and info["test_images"]["weave"] == {"good": 2, "defective": 3}
    roc_lines = (plots / "pixel_roc.csv").read_text().splitlines()
    assert roc_lines[0] == "category,fpr,tpr" and {line.split(",")[0] for line in roc_lines[1:]} == set(categories)
    assert sorted(p.name for p in plots.iterdir()) == sorted(f"{name}.csv" for name in evaluation.CURVE_COLUMNS)

    summary = tmp_path / "reports" / "summary.md"
    stale = metrics_path.parent / "removed_backbone-knn.json"  # left behind by a run no longer in params
    stale.write_bytes(metrics_path.read_bytes())
    evaluation.detail_path(stale).write_bytes(evaluation.detail_path(metrics_path).read_bytes())
    evaluation.info_path(stale).write_bytes(evaluation.info_path(metrics_path).read_bytes())
    report_params = write_runs_params(tmp_path / "report_params.yaml", "resnet50", ["knn", "kmeans"])
    load_stage("report").main(["--metrics", str(metrics_path.parent), "--out", str(summary), "--params", str(report_params)])
    text = summary.read_text()
    assert "removed_backbone" not in text
    assert "RANDOM initialisation" in text and "mode=random, seed=0" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "resnet50" in line]
    assert len(table) == 2 * (len(categories) + 1)
    assert table[0].startswith("| **mean** | resnet50-kmeans | kmeans | random | 4 |")  # runs in params order (yaml sorted them)

    again = tmp_path / "again"
    rerun_metrics, rerun_plots = run_evaluate(again, tiny_dataset, tmp_path / "scores" / "resnet50-kmeans", "resnet50-kmeans", params)
    assert rerun_metrics.read_bytes() == metrics_path.read_bytes()
    assert evaluation.detail_path(rerun_metrics).read_bytes() == evaluation.detail_path(metrics_path).read_bytes()
    assert all((rerun_plots / p.name).read_bytes() == p.read_bytes() for p in plots.iterdir())


def test_evaluate_stage_turns_bad_input_into_a_stage_error(tiny_dataset, tmp_path):
    write_scores(tmp_path / "scores" / "weave.safetensors", tiny_dataset, "weave")
    params = write_params(tmp_path / "params.yaml", ["weave"], fpr_limit=0)
    with pytest.raises(StageError, match="evaluate.fpr_limit"):
        run_evaluate(tmp_path, tiny_dataset, tmp_path / "scores", "x", params)
    params = write_params(tmp_path / "params.yaml", ["weave", "mesh"])
    with pytest.raises(FileNotFoundError, match="mesh.safetensors"):
        run_evaluate(tmp_path, tiny_dataset, tmp_path / "scores", "x", params)


def write_runs_params(path: Path, backbone: str, methods: list[str]) -> Path:
    runs = {f"{backbone}-{method}": {"backbone": backbone, "recipe": method} for method in methods}
    path.write_text(yaml.safe_dump({"pipeline": {"backbones": [backbone], "runs": runs}}))
    return path


def test_report_stage_without_info_file_says_which(tmp_path):
    (tmp_path / "a-knn.detail.json").write_text(json.dumps({"mean": {"image_auroc": 0.5}}))
    params = write_runs_params(tmp_path / "params.yaml", "a", ["knn"])
    with pytest.raises(StageError, match="a-knn.info.json: missing"):
        load_stage("report").main(["--metrics", str(tmp_path), "--out", str(tmp_path / "summary.md"), "--params", str(params)])


def test_report_stage_names_a_run_without_metrics(tmp_path):
    params = write_runs_params(tmp_path / "params.yaml", "a", ["kmeans", "knn"])
    (tmp_path / "a-knn.detail.json").write_text(json.dumps({"mean": {"image_auroc": 0.5}}))
    with pytest.raises(StageError, match="a-kmeans.detail.json: missing"):
        load_stage("report").main(["--metrics", str(tmp_path), "--out", str(tmp_path / "summary.md"), "--params", str(params)])


# ----------------------------------------------------------------------------- summary table


def entry(backbone: str, method: str, random: bool, **values) -> evaluation.ReportEntry:
    info = {
        "run": f"{backbone}-{method}",
        "backbone": backbone,
        "recipe": method,
        "method": method,
        "weights": {"mode": "random" if random else "pretrained"},
        "random_weights": random,
        "evaluation": {"resolution": "original", "fpr_limit": 0.3, "sigma": 4.0},
    }
    row = {name: values.get(name) for name in evaluation.METRIC_NAMES}
    return evaluation.ReportEntry(Path(f"{backbone}-{method}.json"), info, {"mean": row, "bottle": row})


def test_summary_marks_the_best_per_category_and_states_mixed_weights():
    entries = [
        entry("wrn50", "knn", False, image_auroc=0.9, aupro=None),
        entry("dinov2", "knn", True, image_auroc=0.95, aupro=0.8),
        entry("dinov2", "kmeans", True, image_auroc=0.95, aupro=0.7),
    ]
    text = evaluation.summary_markdown(entries)
    assert "**Weights: mixed.** PRETRAINED: wrn50-knn. Randomly initialised" in text
    assert "the methods): dinov2-knn, dinov2-kmeans." in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| bottle")]
    assert [row[1:4] for row in rows] == [["wrn50-knn", "knn", "**pretrained**"], ["dinov2-knn", "knn", "random"], ["dinov2-kmeans", "kmeans", "random"]]
    image_auroc = [row[5] for row in rows]
    aupro = [row[7] for row in rows]
    assert image_auroc == ["90.0", "**95.0**", "**95.0**"]  # ties: both marked
    assert aupro == ["n/a", "**80.0**", "70.0"]
