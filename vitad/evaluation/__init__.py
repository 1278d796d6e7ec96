"""Score files + ground truth -> metrics, curves and the summary report.

Pixel metrics are computed at each test image's ORIGINAL resolution by default, as the official
MVTec AD evaluation does: the anomaly map of every image is upsampled from its patch grid and
blurred on the fly (:meth:`vitad.scorefile.CategoryScores.anomaly_map`), ranked, and dropped;
full-size maps are never stored. ``resolution="model"`` evaluates at the model input size
instead (``image_size`` of the score metadata): maps are upsampled to image_size x image_size and
the masks resized there with nearest-neighbour interpolation, as anomalib does; figures are then
not comparable with the official ones. The blur is the run's ``sigma`` in pixels of the model
input at either resolution, so both evaluate the same map.

Each run is evaluated on two routes: the patch route (``image_scores`` from the patch scores,
and every pixel metric) and the image-embedding route (``embedding_scores`` from the CLS or
pooled embedding: ``embedding_image_auroc``, ``embedding_image_ap``).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from vitad.core.data import Sample, index_category, sample_mask, split_samples
from vitad.scorefile import CategoryScores, read_category_scores, weights_are_random
from vitad.evaluation.metrics import average_precision, f1_max, image_auroc, pixel_metrics, pr_curve, roc_curve

RESOLUTIONS = ("original", "model")
# f1_max is the image-level F1-max (best F1 over image-score thresholds); pixel_f1_max the same over pixels.
# embedding_*: the image-embedding route (CLS / pooled embeddings scored by the same method).
METRIC_NAMES = (
    "image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "f1_max", "pixel_f1_max",
    "embedding_image_auroc", "embedding_image_ap",
)
CURVE_COLUMNS = {  # curve name -> (x column, y column) of its CSV
    "image_roc": ("fpr", "tpr"),
    "image_pr": ("recall", "precision"),
    "pixel_roc": ("fpr", "tpr"),
    "pixel_pr": ("recall", "precision"),
    "pro": ("fpr", "pro"),
}
# What the DVC metrics file of a run holds (means over categories): 3 columns per run in `dvc
# metrics show` and `dvc exp show`; every metric of every category goes to the detail file.
HEADLINE_METRICS = ("image_auroc", "pixel_auroc", "aupro")
MEAN = "mean"
DETAIL_SUFFIX = ".detail.json"  # every metric per category and mean, next to each metrics file
INFO_SUFFIX = ".info.json"  # evaluation facts next to each metrics file, for the report

Curves = dict[str, tuple[np.ndarray, np.ndarray]]  # curve name -> (x, y), see CURVE_COLUMNS


class EvaluationError(ValueError):
    """Scores, dataset and evaluation settings do not fit together."""


def _check_settings(resolution: str, fpr_limit: float) -> None:
    if resolution not in RESOLUTIONS:
        raise EvaluationError(f"evaluate.resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    if not isinstance(fpr_limit, (int, float)) or isinstance(fpr_limit, bool) or not 0 < fpr_limit <= 1:
        raise EvaluationError(f"evaluate.fpr_limit must be a number in (0, 1], got {fpr_limit!r}")


def _check_against_dataset(scores: CategoryScores, data_root: Path) -> None:
    """Stale scores would be compared with the wrong masks: require the dataset's exact test set."""
    test_samples = split_samples(index_category(data_root, scores.category), "test")
    if test_samples != scores.test_samples:
        raise EvaluationError(
            f"{scores.path}: its {len(scores.test_samples)} test samples differ from the {len(test_samples)} of "
            f"{data_root / scores.category}; the scores are stale, re-run `dvc repro`"
        )


def _resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == size:
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(resized) > 0


def evaluate_category(
    data_root: str | Path,
    scores_path: str | Path,
    resolution: str = "original",
    fpr_limit: float = 0.3,
) -> tuple[dict[str, float], Curves]:
    """Metrics (keys METRIC_NAMES) and curves (keys CURVE_COLUMNS) of one score file.

    A category without good or without defective test images gets NaN for the metrics that
    need both, with a warning naming the score file, and no curves for them.
    """
    return _evaluate_scores(read_category_scores(scores_path), Path(data_root), resolution, fpr_limit)


def _evaluate_scores(
    scores: CategoryScores, data_root: Path, resolution: str, fpr_limit: float
) -> tuple[dict[str, float], Curves]:
    _check_settings(resolution, fpr_limit)
    _check_against_dataset(scores, data_root)
    samples = scores.test_samples
    model_size = (scores.image_size, scores.image_size) if resolution == "model" else None

    def evaluated_size(sample: Sample) -> tuple[int, int]:
        return model_size or tuple(sample.original_size)

    masks = [_resized_mask(sample_mask(data_root, sample), evaluated_size(sample)) for sample in samples]
    maps: Iterator[np.ndarray] = (
        scores.anomaly_map(index, evaluated_size(sample)) for index, sample in enumerate(samples)
    )
    labels = np.array([sample.is_anomalous for sample in samples])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = {
            "image_auroc": image_auroc(labels, scores.image_scores),
            "image_ap": average_precision(labels, scores.image_scores),
            "f1_max": f1_max(labels, scores.image_scores),
            "embedding_image_auroc": image_auroc(labels, scores.embedding_scores),
            "embedding_image_ap": average_precision(labels, scores.embedding_scores),
        }
        pixel = pixel_metrics(masks, maps, fpr_limit=fpr_limit)
    for warning in caught:
        warnings.warn(f"{scores.path}: {warning.message}", warning.category, stacklevel=3)
    metrics.update(pixel_auroc=pixel.pixel_auroc, aupro=pixel.aupro, pixel_ap=pixel.pixel_ap, pixel_f1_max=pixel.pixel_f1_max)

    curves: Curves = {}
    if labels.any() and not labels.all():
        fpr, tpr, _ = roc_curve(labels, scores.image_scores)
        precision, recall, _ = pr_curve(labels, scores.image_scores)
        curves.update(image_roc=(fpr, tpr), image_pr=(recall, precision))
    if pixel.roc is not None:
        curves.update(pixel_roc=pixel.roc, pixel_pr=pixel.pr, pro=pixel.pro)
    return {name: float(metrics[name]) for name in METRIC_NAMES}, curves


def mean_over_categories(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric over categories (as the MVTec AD papers report it).

    NaN, with a warning naming the categories, when a category's value is NaN: a mean over
    fewer categories would not be comparable with other runs.
    """
    means = {}
    for name in METRIC_NAMES:
        values = [per_category[category][name] for category in per_category]
        undefined = [category for category, value in zip(per_category, values) if math.isnan(value)]
        if undefined:
            warnings.warn(f"mean {name} is NaN: undefined for {', '.join(undefined)}", stacklevel=2)
        means[name] = float(np.mean(values)) if values else float("nan")
    return means


@dataclass(frozen=True)
class RunEvaluation:
    """Everything the evaluate stage writes for one (backbone, method)."""

    run: str
    backbone: str
    recipe: str
    method: str
    weights: dict
    resolution: str
    fpr_limit: float
    sigma: float  # the run's heatmap blur, pixels at the model input
    metrics: dict[str, dict[str, float]]  # category -> metric name -> value, in data.categories order
    curves: dict[str, Curves]  # category -> curves
    test_counts: dict[str, dict[str, int]]  # category -> {"good": n, "defective": n}


def evaluate_run(
    data_root: str | Path,
    scores_dir: str | Path,
    categories: Sequence[str],
    resolution: str = "original",
    fpr_limit: float = 0.3,
) -> RunEvaluation:
    """Evaluate ``scores_dir/<category>.safetensors`` for every category of one run."""
    scores_dir = Path(scores_dir)
    metrics, curves, counts, identities = {}, {}, {}, {}
    for category in categories:
        path = scores_dir / f"{category}.safetensors"
        scores = read_category_scores(path, expected_category=category)
        identity = {key: getattr(scores, key) for key in ("run", "backbone", "recipe", "method", "weights", "sigma")}
        identities[path] = json.dumps(identity, sort_keys=True)
        metrics[category], curves[category] = _evaluate_scores(scores, Path(data_root), resolution, fpr_limit)
        defective = sum(sample.is_anomalous for sample in scores.test_samples)
        counts[category] = {"good": len(scores.test_samples) - defective, "defective": defective}
    if len(set(identities.values())) != 1:
        listing = "; ".join(f"{path}: {identity}" for path, identity in identities.items())
        raise EvaluationError(f"score files of {scores_dir} disagree on run, backbone, recipe, weights or sigma: {listing}")
    identity = json.loads(next(iter(identities.values())))
    return RunEvaluation(
        identity["run"], identity["backbone"], identity["recipe"], identity["method"], identity["weights"],
        resolution, float(fpr_limit), identity["sigma"], metrics, curves, counts,
    )


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def detail_record(run: RunEvaluation) -> dict[str, dict[str, float | None]]:
    """The detail JSON: {category: {metric: value}, "mean": {...}} for every metric of
    METRIC_NAMES; NaN is written as null."""
    if MEAN in run.metrics:
        raise EvaluationError(f"a category may not be called {MEAN!r}: it names the mean over categories")
    table = {**run.metrics, MEAN: mean_over_categories(run.metrics)}
    return {row: {name: _json_number(values[name]) for name in METRIC_NAMES} for row, values in table.items()}


def headline_record(detail: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """The DVC metrics JSON of a run: {metric: mean over categories} for HEADLINE_METRICS."""
    return {name: detail[MEAN][name] for name in HEADLINE_METRICS}


def curve_tables(run: RunEvaluation) -> dict[str, str]:
    """One CSV text per curve name: ``category,<x>,<y>`` rows, categories in run order."""
    tables = {}
    for name, (x_name, y_name) in CURVE_COLUMNS.items():
        lines = [f"category,{x_name},{y_name}"]
        for category, curves in run.curves.items():
            if name in curves:
                x, y = curves[name]
                lines += [f"{category},{x_value:.6g},{y_value:.6g}" for x_value, y_value in zip(x, y)]
        tables[name] = "\n".join(lines) + "\n"
    return tables


def run_info(run: RunEvaluation) -> dict:
    """What the report needs besides the metrics: who was evaluated, with which weights, how."""
    return {
        "run": run.run,
        "backbone": run.backbone,
        "recipe": run.recipe,
        "method": run.method,
        "weights": run.weights,
        "random_weights": weights_are_random(run.weights),
        "evaluation": {"resolution": run.resolution, "fpr_limit": run.fpr_limit, "sigma": run.sigma},
        "test_images": run.test_counts,
    }


def info_path(metrics_path: str | Path) -> Path:
    """``reports/metrics/<name>.json`` -> ``reports/metrics/<name>.info.json``."""
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.stem + INFO_SUFFIX)


def detail_path(metrics_path: str | Path) -> Path:
    """``reports/metrics/<name>.json`` -> ``reports/metrics/<name>.detail.json``."""
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.stem + DETAIL_SUFFIX)


# ----------------------------------------------------------------------------- summary report

REPORT_COLUMNS = (  # (metric, column title)
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AU-PRO"),
    ("image_ap", "image AP"),
    ("pixel_ap", "pixel AP"),
    ("f1_max", "image F1-max"),
    ("pixel_f1_max", "pixel F1-max"),
    ("embedding_image_auroc", "embedding image AUROC"),
)


@dataclass(frozen=True)
class ReportEntry:
    """One run's detail file (``metrics``) with its info file."""

    path: Path
    info: dict
    metrics: dict[str, dict[str, float | None]]


def read_report_entries(metrics_dir: str | Path, names: list[str]) -> list[ReportEntry]:
    """The ``<name>.detail.json`` files of ``metrics_dir`` with their ``<name>.info.json``, for
    ``names`` in that order (the pipeline's runs: files left behind by a run since removed from
    params.yaml stay out of the report)."""
    metrics_dir = Path(metrics_dir)
    if not names:
        raise EvaluationError(f"{metrics_dir}: no runs to report")
    entries = []
    for name in names:
        path, sidecar = detail_path(metrics_dir / f"{name}.json"), info_path(metrics_dir / f"{name}.json")
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
            info = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise EvaluationError(f"{error.filename}: missing; the evaluate stage of run {name} writes it (dvc repro evaluate@{name})") from error
        except json.JSONDecodeError as error:
            raise EvaluationError(f"{path} or {sidecar}: not valid JSON ({error})") from error
        missing = [key for key in ("run", "backbone", "recipe", "weights", "random_weights", "evaluation") if key not in info]
        if missing or MEAN not in metrics:
            raise EvaluationError(f"{path} / {sidecar}: missing {', '.join(missing + ([MEAN] if MEAN not in metrics else []))}")
        entries.append(ReportEntry(path, info, metrics))
    return entries


def _weights_statement(entries: list[ReportEntry]) -> str:
    random_runs = [e for e in entries if e.info["random_weights"]]
    if len(random_runs) == len(entries):
        return (
            "> **Weights: RANDOM initialisation for every backbone.** These numbers test the pipeline, "
            "not the methods; they say nothing about pretrained performance. Set `weights: pretrained` "
            "in params.yaml for the real benchmark."
        )
    if random_runs:
        names = ", ".join(e.info["run"] for e in random_runs)
        pretrained = ", ".join(e.info["run"] for e in entries if not e.info["random_weights"])
        return (
            f"> **Weights: mixed.** PRETRAINED: {pretrained}. Randomly initialised (their numbers test the "
            f"pipeline, not the methods): {names}."
        )
    return "> **Weights: pretrained** for every backbone."


def _weights_list(entries: list[ReportEntry]) -> list[str]:
    """One line per backbone and weights record, naming the runs scored with it."""
    methods = {}
    for entry in entries:
        weights = ", ".join(f"{key}={value}" for key, value in sorted(entry.info["weights"].items()))
        methods.setdefault((entry.info["backbone"], weights), []).append(entry.info["run"])
    return [f"- {backbone} ({', '.join(names)}): {weights}" for (backbone, weights), names in sorted(methods.items())]


def _cell(value: float | None, best: float | None) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:.1f}"
    return f"**{text}**" if best is not None and value == best else text


def summary_markdown(entries: list[ReportEntry]) -> str:
    """One Markdown table of every run x category (mean first; runs in the given order), values in %.

    Within each category block the best value of every column is bold (ties: all of them).
    """
    categories = sorted({row for entry in entries for row in entry.metrics if row != MEAN})
    settings = sorted({json.dumps(entry.info["evaluation"], sort_keys=True) for entry in entries})
    lines = [
        "# vitad evaluation summary",
        "",
        _weights_statement(entries),
        "",
        *_weights_list(entries),
        "",
        "Evaluation: " + " | ".join(
            f"pixel metrics at {s['resolution']} resolution, AU-PRO up to FPR {s['fpr_limit']}"
            for s in map(json.loads, settings)
        ) + ". Values in %; `mean` is the unweighted mean over categories; **bold** = best within the category; "
        "n/a = undefined (category without good or defective test images); sigma = heatmap blur in "
        "pixels of the model input; weights: pretrained or random.",
        "",
        "| category | run | recipe | weights | sigma | " + " | ".join(title for _, title in REPORT_COLUMNS) + " |",
        "|---|---|---|---|---:|" + "---:|" * len(REPORT_COLUMNS),
    ]
    for category in [MEAN, *categories]:
        block = [entry for entry in entries if category in entry.metrics]
        best = {}
        for name, _ in REPORT_COLUMNS:
            values = [entry.metrics[category].get(name) for entry in block]
            best[name] = max((v for v in values if v is not None), default=None)
        for entry in block:
            cells = [_cell(entry.metrics[category].get(name), best[name]) for name, _ in REPORT_COLUMNS]
            label = f"**{category}**" if category == MEAN else category
            weights = "random" if entry.info["random_weights"] else "**pretrained**"
            lines.append(
                f"| {label} | {entry.info['run']} | {entry.info['recipe']} | {weights} | "
                f"{entry.info['evaluation']['sigma']:g} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"
