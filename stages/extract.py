"""extract stage: one (backbone, category) -> feature bank (image embeddings + patch grids).

Reads params.yaml sections ``weights``, ``extract`` and ``backbones.<backbone>``. The extractor
(and with it the weights) is built before any image is read, so missing pretrained weights fail
at once with instructions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad.backbones import WEIGHTS_MODES, build_extractor, resolve_device  # noqa: E402
from vitad.core.cli import run_stage  # noqa: E402
from vitad.core.data import index_category  # noqa: E402
from vitad.featurebank import bank_info, extract_bank, extract_settings  # noqa: E402
from vitad.core.params import load_params, param  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    weights = param(params, "weights", str, choices=WEIGHTS_MODES)
    settings = extract_settings(params)
    backbone_config = param(params, f"backbones.{args.backbone}", dict)
    device = resolve_device(settings.device)
    extractor = build_extractor(args.backbone, backbone_config, weights, device, settings.seed)

    samples = index_category(args.data, args.category)
    info = bank_info(args.backbone, args.category, backbone_config, weights, extractor, settings.patch_dtype)
    start = time.perf_counter()
    extract_bank(args.out, extractor, args.data, samples, settings.batch_size, info,
                 desc=f"{args.backbone}/{args.category}")
    elapsed = time.perf_counter() - start
    print(
        f"{args.backbone}/{args.category}: {len(samples)} images in {elapsed:.1f} s = "
        f"{len(samples) / elapsed:.2f} img/s "
        f"({device.type}, {extractor.precision}, batch {settings.batch_size}, "
        f"{extractor.weights_info['mode']} weights: {extractor.weights_info['source']}); grid {extractor.grid_size[0]}x{extractor.grid_size[1]}, "
        f"patch dim {extractor.patch_dim} -> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
