"""download stage: materialise the dataset in MVTec layout under --out.

data.source = synthetic (generated default) | mvtec (verified archive) | folder (local directory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad import mvtec, synthetic  # noqa: E402
from vitad.core.cli import run_stage  # noqa: E402
from vitad.core.data import index_category  # noqa: E402
from vitad.core.params import load_params, param, positive_int, string_list  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    source = param(params, "data.source", str, choices=("synthetic", "mvtec", "folder"))
    categories = string_list(params, "data.categories")

    if source == "synthetic":
        synthetic.generate(
            args.out,
            categories,
            seed=param(params, "data.synthetic.seed", int),
            train_images=positive_int(params, "data.synthetic.train_images"),
            test_good_images=positive_int(params, "data.synthetic.test_good_images"),
            test_images_per_defect=positive_int(params, "data.synthetic.test_images_per_defect"),
        )
    elif source == "mvtec":
        mvtec.prepare_mvtec(
            args.out,
            categories,
            url=param(params, "data.mvtec.url", str),
            sha256=param(params, "data.mvtec.sha256", str),
            archive=Path(param(params, "data.mvtec.archive", str)),
        )
    else:
        folder = param(params, "data.folder.path", str)
        mvtec.link_folder(Path(folder), args.out, categories)

    for category in categories:
        samples = index_category(args.out, category)
        test = [s for s in samples if s.split == "test"]
        print(
            f"{category}: {len(samples) - len(test)} train, {len(test)} test "
            f"({sum(s.is_anomalous for s in test)} defective) -> {args.out / category}"
        )


if __name__ == "__main__":
    run_stage(main)
