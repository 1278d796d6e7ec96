"""report stage: reports/summary.md, one table of every run x category.

Reads the <run>.json metrics file of every run of pipeline.runs from --metrics, with
its <run>.info.json (both written by the evaluate stage); states prominently
whether the backbones had random or pretrained weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad.core.cli import StageError, run_stage  # noqa: E402
from vitad.evaluation import EvaluationError, read_report_entries, summary_markdown  # noqa: E402
from vitad.core.io import write_text  # noqa: E402
from vitad.core.params import load_params, run_names  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", required=True, type=Path, help="directory of metrics files")
    parser.add_argument("--out", required=True, type=Path, help="Markdown file to write")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    runs = run_names(load_params(args.params))
    try:
        entries = read_report_entries(args.metrics, runs)
    except EvaluationError as error:
        raise StageError(str(error)) from error
    write_text(args.out, summary_markdown(entries))
    print(f"{len(entries)} runs -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
