"""compare stage: one figure per category comparing every run of pipeline.runs found under --scores.

Columns are the selected test images (same rule as the heatmap stage: first
heatmap.examples_per_defect per defect type, then heatmap.good_examples good ones); the first
two rows show the images and their ground truth, then one row of anomaly-map overlays per
run of pipeline.runs (<run>, in params order), each with its own colourbar. Rows
come from params, not from listing --scores, so score directories left behind by a run since
removed from the pipeline never show up.

Writes <out>/<category>.png (a DVC image-plot directory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad.core.cli import run_stage  # noqa: E402
from vitad.figures import FigureSettings, render_comparison, render_in_parallel  # noqa: E402
from vitad.scorefile import read_category_scores  # noqa: E402
from vitad.core.io import reset_directory  # noqa: E402
from vitad.core.params import load_params, run_names, string_list  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--scores", required=True, type=Path, help="directory holding the <run>/ score directories of pipeline.runs")
    parser.add_argument("--data", required=True, type=Path, help="dataset root (MVTec layout)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    categories = string_list(params, "data.categories")
    settings = FigureSettings.from_params(params)
    score_dirs = [args.scores / name for name in run_names(params)]

    reset_directory(args.out)
    rows_per_category = {
        category: [read_category_scores(d / f"{category}.safetensors", expected_category=category) for d in score_dirs]
        for category in categories
    }
    calls = [(args.out / f"{category}.png", rows, args.data, settings) for category, rows in rows_per_category.items()]
    for (category, rows), path in zip(rows_per_category.items(), render_in_parallel(render_comparison, calls)):
        print(f"{category}: {len(rows)} runs (one row each) -> {path}")


if __name__ == "__main__":
    run_stage(main)
