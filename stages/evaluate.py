"""evaluate stage: metrics and curves of one run of pipeline.runs over data.categories.

Writes
- --metrics (e.g. reports/metrics/<run>.json), the DVC metrics file: {image_auroc, pixel_auroc,
  aupro} as means over categories, so `dvc metrics show` / `dvc exp show` stay 3 columns a run;
- <metrics stem>.detail.json next to it: {category: {image_auroc, pixel_auroc, aupro, image_ap,
  pixel_ap, f1_max, pixel_f1_max, embedding_image_auroc, embedding_image_ap}, "mean": {...}}
  (f1_max is image-level; null = undefined); `dvc metrics show <file>` reads it too;
- <metrics stem>.info.json next to it: run, backbone, recipe, method, weights, evaluation settings, test image
  counts (read by the report stage);
- --plots/<curve>.csv for image_roc, image_pr, pixel_roc, pixel_pr and pro, with a category
  column (DVC plots; pixel curves downsampled to about 1000 points per category).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad.core.cli import StageError, run_stage  # noqa: E402
from vitad.evaluation import (  # noqa: E402
    RESOLUTIONS,
    EvaluationError,
    curve_tables,
    detail_path,
    detail_record,
    evaluate_run,
    headline_record,
    info_path,
    run_info,
)
from vitad.scorefile import ScoresError  # noqa: E402
from vitad.core.io import write_json, write_text  # noqa: E402
from vitad.core.params import load_params, param, string_list  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--scores", required=True, type=Path, help="scores/<run>")
    parser.add_argument("--data", required=True, type=Path, help="dataset root (MVTec layout)")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--plots", required=True, type=Path, help="directory for the curve CSVs")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    categories = string_list(params, "data.categories")
    resolution = param(params, "evaluate.resolution", str, choices=RESOLUTIONS)
    fpr_limit = param(params, "evaluate.fpr_limit", (int, float))

    try:
        run = evaluate_run(args.data, args.scores, categories, resolution, fpr_limit)
    except (EvaluationError, ScoresError) as error:
        raise StageError(str(error)) from error

    detail = detail_record(run)
    write_json(args.metrics, headline_record(detail))
    write_json(detail_path(args.metrics), detail)
    write_json(info_path(args.metrics), run_info(run))
    for name, table in curve_tables(run).items():
        write_text(args.plots / f"{name}.csv", table)
    mean = {name: "n/a" if value is None else f"{value:.4f}" for name, value in detail["mean"].items()}
    print(
        f"{run.run}: mean image AUROC {mean['image_auroc']}, pixel AUROC "
        f"{mean['pixel_auroc']}, AU-PRO {mean['aupro']} -> {args.metrics}, {args.plots}"
    )


if __name__ == "__main__":
    run_stage(main)
