"""heatmap stage: triplet figures (image | anomaly-map overlay | ground truth) for one backbone x
method, for the first heatmap.examples_per_defect images of every defect type and the first
heatmap.good_examples good images of every category in data.categories.

Writes <out>/<category>_<defect>_<image id>.png (a DVC image-plot directory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad.core.cli import run_stage  # noqa: E402
from vitad.figures import FigureSettings, render_category_triplets  # noqa: E402
from vitad.scorefile import read_category_scores  # noqa: E402
from vitad.core.io import reset_directory  # noqa: E402
from vitad.core.params import load_params, string_list  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--scores", required=True, type=Path, help="scores/<backbone>-<method>")
    parser.add_argument("--data", required=True, type=Path, help="dataset root (MVTec layout)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    categories = string_list(params, "data.categories")
    settings = FigureSettings.from_params(params)

    reset_directory(args.out)
    for category in categories:
        scores = read_category_scores(args.scores / f"{category}.safetensors", expected_category=category)
        written = render_category_triplets(scores, args.data, args.out, settings)
        print(f"{scores.label} / {category}: {len(written)} figures -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
