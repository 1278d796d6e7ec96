"""score stage: one backbone x method -> anomaly scores of every category's test images.

Reads params.yaml ``data.categories`` and ``score.<method>``. For each category: fit the scorer
on the training features of featurebanks/<backbone>/<category>.safetensors (patch grids and
image embeddings separately), score the test features and write <out>/<category>.safetensors with
``image_scores`` [M] (aggregated from the patch scores: the evaluated score), ``patch_scores``
[M, h, w] and ``embedding_scores`` [M] (image-embedding route), plus metadata saying what produced
them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad.cli import run_stage  # noqa: E402
from vitad.featurebank import read_bank  # noqa: E402
from vitad.io import reset_directory, save_arrays  # noqa: E402
from vitad.params import load_params, param, string_list  # noqa: E402
from vitad.scoring import make_scorer, score_bank  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--featurebanks", required=True, type=Path, help="featurebanks/<backbone>")
    parser.add_argument("--out", required=True, type=Path, help="scores/<backbone>-<method>")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    categories = string_list(params, "data.categories")
    section = param(params, f"score.{args.method}", dict)
    make_scorer(args.method, section)  # bad parameters fail before any bank is read

    reset_directory(args.out)
    for category in categories:
        bank_path = args.featurebanks / f"{category}.safetensors"
        bank = read_bank(bank_path)
        scores = score_bank(bank, args.method, section, source=str(bank_path))
        metadata = {
            "backbone": args.backbone,
            "method": args.method,
            "category": category,
            "params": scores.params,
            "weights": bank.info["weights_info"],
            "grid": list(bank.grid_size),
            "image_size": bank.info["image_size"],
            "test_samples": [sample.to_dict() for sample in bank.test_samples],
        }
        arrays = {
            "image_scores": scores.image_scores,
            "patch_scores": scores.patch_scores,
            "embedding_scores": scores.embedding_scores,
        }
        save_arrays(args.out / f"{category}.safetensors", arrays, metadata)
        print(
            f"{args.backbone}-{args.method}/{category}: fit {scores.fit_seconds:.2f} s, score {scores.score_seconds:.2f} s "
            f"({len(bank.train_samples)} train, {len(bank.test_samples)} test images) -> {args.out}"
        )


if __name__ == "__main__":
    run_stage(main)
