"""score stage: one run of pipeline.runs -> anomaly scores of every category's test images.

Reads params.yaml ``data.categories``, ``pipeline.runs.<run>``, the run's recipe section
``score.<recipe>``, ``heatmap.sigma`` (see vitad/runs.py) and ``extract.device``: scorers compute
on the GPU when extraction does. For each category: fit the run's
scorer on the training features of featurebanks/<backbone>/<category>.safetensors (patch grids
and image embeddings separately), score the test features and write <out>/<category>.safetensors
with ``image_scores`` [M] (the evaluated score), ``patch_scores`` [M, h, w] and
``embedding_scores`` [M] (image-embedding route), plus metadata saying what produced them; and
the fitted model <models>/<category>.safetensors (vitad/serving/model.py: the fitted patch-level scorer,
the extractor settings and weights fingerprint, the map settings and the threshold calibrated on
held-out training images), which ``vitad predict`` and the web demo load without re-fitting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad.core.cli import run_stage  # noqa: E402
from vitad.featurebank import read_bank  # noqa: E402
from vitad.core.io import reset_directory  # noqa: E402
from vitad.serving.model import fit_model, write_model  # noqa: E402
from vitad.core.params import load_params, param, string_list  # noqa: E402
from vitad.runs import run_spec  # noqa: E402
from vitad.scorefile import write_category_scores  # noqa: E402
from vitad.scoring import score_bank  # noqa: E402
from vitad.scoring.device import resolve_compute_device  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="a key of pipeline.runs")
    parser.add_argument("--featurebanks", required=True, type=Path, help="featurebanks/<backbone>")
    parser.add_argument("--out", required=True, type=Path, help="scores/<run>")
    parser.add_argument("--models", required=True, type=Path, help="models/<run>")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    categories = string_list(params, "data.categories")
    spec = run_spec(params, args.run)  # bad settings fail before any bank is read
    device = resolve_compute_device(param(params, "extract.device", str, "auto"))

    reset_directory(args.out)
    reset_directory(args.models)
    for category in categories:
        bank_path = args.featurebanks / f"{category}.safetensors"
        bank = read_bank(bank_path)
        scores = score_bank(
            bank, spec.method, spec.patch_params, spec.embedding_params, source=str(bank_path),
            model_map=spec.model_map(bank.info["image_size"]), device=device,
        )
        path = write_category_scores(args.out / f"{category}.safetensors", spec, category, bank, scores)
        start = time.perf_counter()
        model = write_model(args.models / f"{category}.safetensors", fit_model(spec, category, bank, scores))
        print(
            f"{spec.name}/{category}: fit {scores.fit_seconds:.2f} s, score {scores.score_seconds:.2f} s on {device}, "
            f"threshold calibration {time.perf_counter() - start:.2f} s ({len(bank.train_samples)} train, "
            f"{len(bank.test_samples)} test images) -> {path}, {model}"
        )


if __name__ == "__main__":
    run_stage(main)
