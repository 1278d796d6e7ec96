"""Scoring new images with fitted models: `vitad predict` throughput and the demo's first answer.

1. Throughput, per backbone (params.yaml's entry; weights as it says): a model fitted by the
   score stage's code (:func:`vitad.scoring.score_bank`, :func:`vitad.serving.model.fit_model`) on the
   default dataset's training set (--train-images), then a folder of --images new generated
   images, scored by predict's code path (:meth:`vitad.serving.detector.Detector.score_files` with
   CSV rows) and extracted by the extract stage's code path (extract_bank).
   Prints images/s of both and their ratio (target >= 0.90), best of --repeats interleaved runs,
   the ratio as the median of paired runs. Model loading and process start are excluded on both
   sides. predict also searches the memory bank: the bank of the default training set is small;
   the second line per backbone repeats predict with a bank the size of a full MVTec AD
   category's (--bank-images of training images after PatchCore's 10 % coreset).
2. The demo's first answer after choosing a detector, at the scale of a full MVTec AD category
   (the same large bank): reading the model file, rebuilding the extractor (model build, weights,
   fingerprint check), then scoring one uploaded image with its overlay, as the page does.
   Target: <= 5 s without the model build.

The large bank is the features of --bank-images / 10 training images, kept whole (coreset ratio
1.0): as many vectors as a 10 % coreset of --bank-images images, which is what search time
depends on; fitting a real coreset of that many images takes minutes and is not what is timed.

    python benchmarks/predict.py [--backbones efficientnet_lite0 wide_resnet50_2] [--images 200]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad import synthetic  # noqa: E402
from vitad.serving import demo  # noqa: E402
from vitad.backbones import build_extractor  # noqa: E402
from vitad.core.data import index_category  # noqa: E402
from vitad.serving.detector import Detector, csv_row, csv_writer, load_detector, result_record  # noqa: E402
from vitad.featurebank import FeatureBank, bank_info, extract_bank, extract_category, extract_settings  # noqa: E402
from vitad.serving.model import fit_model, read_model, write_model  # noqa: E402
from vitad.core.params import load_params  # noqa: E402
from vitad.runs import run_spec  # noqa: E402
from vitad.scoring import score_bank  # noqa: E402

CATEGORY = "weave"


def _params(backbone: str, recipe: str, overrides: dict) -> dict:
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["pipeline"]["runs"] = {"bench": {"backbone": backbone, "recipe": recipe, **overrides}}
    return params


def _info(extractor, params: dict, backbone: str) -> dict:
    """The bank metadata the extract stage records for ``backbone`` under ``params``."""
    patch_dtype = extract_settings(params).patch_dtype
    return bank_info(backbone, CATEGORY, params["backbones"][backbone], params["weights"], extractor, patch_dtype)


def _bank(extractor, params: dict, backbone: str, root: Path, batch_size: int) -> FeatureBank:
    info = _info(extractor, params, backbone)
    arrays = extract_category(
        extractor, root, index_category(root, CATEGORY), batch_size, patch_dtype=info["patch_dtype"], progress=False
    )
    return FeatureBank(**arrays, info=info)


def _fitted_model(extractor, params: dict, backbone: str, root: Path, path: Path, batch_size: int) -> float:
    """Fit run ``bench`` on the bank of ``root`` as the score stage does; write the model to
    ``path``; returns the seconds of the threshold calibration."""
    spec = run_spec(params, "bench")
    bank = _bank(extractor, params, backbone, root, batch_size)
    scores = score_bank(bank, spec.method, spec.patch_params, spec.embedding_params, source=str(root),
                        model_map=spec.model_map(bank.info["image_size"]))
    start = time.perf_counter()
    model = fit_model(spec, CATEGORY, bank, scores)
    calibration = time.perf_counter() - start
    write_model(path, model)
    return calibration


def _predict(detector: Detector, files: list[Path], batch_size: int) -> None:
    stream = io.StringIO()
    writer = csv_writer(stream)
    sources = [(str(path), path.read_bytes) for path in files]
    for scored in detector.score_files(sources, batch_size=batch_size):
        writer.writerow(csv_row(result_record(scored, detector.model.threshold, detector.model)))


def _extract(extractor, params: dict, backbone: str, root: Path, out: Path, batch_size: int) -> None:
    extract_bank(out, extractor, root, index_category(root, CATEGORY), batch_size, _info(extractor, params, backbone),
                 progress=False)


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "wide_resnet50_2"])
    parser.add_argument("--recipe", default="patchcore")
    parser.add_argument("--images", type=int, default=200, help="new images scored / extracted")
    parser.add_argument("--train-images", type=int, default=6, help="training images of the small model (params.yaml's default)")
    parser.add_argument("--bank-images", type=int, default=400, help="training images of a full category (MVTec AD: up to 391)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.bank_images < 20:
        parser.error(f"--bank-images must be at least 20 (the large bank takes a tenth of them, and calibration 2), got {args.bank_images}")
    if args.images < 10:
        parser.error(f"--images must be at least 10 (9 of them are the defective and good test images), got {args.images}")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        start = time.perf_counter()
        synthetic.generate(scratch / "small", [CATEGORY], seed=0, train_images=args.train_images, test_good_images=3,
                           test_images_per_defect=2)
        synthetic.generate(scratch / "large", [CATEGORY], seed=0, train_images=args.bank_images // 10,
                           test_good_images=2, test_images_per_defect=1)
        # New images: another seed's training images (defect-free) plus its defective test images.
        synthetic.generate(scratch / "new", [CATEGORY], seed=1, train_images=args.images - 9, test_good_images=3,
                           test_images_per_defect=2)
        new_files = sorted((scratch / "new" / CATEGORY).rglob("*.png"))
        new_files = [path for path in new_files if "ground_truth" not in path.parts]
        print(f"generated the images in {time.perf_counter() - start:.1f} s; {len(new_files)} new images")
        for backbone in args.backbones:
            small_params = _params(backbone, args.recipe, {})
            large_params = _params(backbone, args.recipe, {"coreset_ratio": 1.0})
            config = small_params["backbones"][backbone]
            extractor = build_extractor(backbone, config, small_params["weights"], "cpu", extract_settings(small_params).seed)
            small_calibration = _fitted_model(extractor, small_params, backbone, scratch / "small",
                                              scratch / f"{backbone}-small.safetensors", args.batch_size)
            large_calibration = _fitted_model(extractor, large_params, backbone, scratch / "large",
                                              scratch / f"{backbone}-large.safetensors", args.batch_size)
            detectors = {size: Detector(read_model(scratch / f"{backbone}-{size}.safetensors"), extractor)
                         for size in ("small", "large")}
            new_root = scratch / "new"
            times = {"extract": [], "small": [], "large": []}
            for _ in range(args.repeats):
                times["extract"].append(_timed(lambda: _extract(
                    extractor, small_params, backbone, new_root, scratch / "bank.safetensors", args.batch_size)))
                for size, detector in detectors.items():
                    times[size].append(_timed(lambda: _predict(detector, new_files, args.batch_size)))
            n = len(new_files)
            bank_sizes = {size: len(detector.model.scorer.memory_bank_) for size, detector in detectors.items()}
            print(f"\n{backbone} · {args.recipe} ({extractor.weights_info['mode']} weights), {n} images, "
                  f"batch {args.batch_size}, best of {args.repeats}:")
            print(f"  extract stage path          {n / min(times['extract']):7.1f} img/s")
            for size in ("small", "large"):
                paired = statistics.median(e / p for e, p in zip(times["extract"], times[size]))
                print(f"  predict, bank {bank_sizes[size]:6d} vectors {n / min(times[size]):7.1f} img/s   "
                      f"ratio {paired:.2f}  (target >= 0.90)")
            print(f"  threshold calibration in the score stage: {small_calibration:.2f} s ({args.train_images} "
                  f"train images), {large_calibration:.2f} s ({args.bank_images // 10} train images, no coreset)")

            # The demo's first answer: a fresh load of the large model, then one upload.
            upload = new_files[-1]
            start = time.perf_counter()
            model = read_model(scratch / f"{backbone}-large.safetensors")
            read_seconds = time.perf_counter() - start
            start = time.perf_counter()
            loaded = load_detector(scratch / f"{backbone}-large.safetensors", "cpu")
            load_seconds = time.perf_counter() - start - read_seconds  # the extractor build and its checks
            start = time.perf_counter()
            decoded, result = demo.score_upload(loaded, upload.read_bytes(), upload.name)
            demo.display_overlay(loaded, decoded, result)
            answer_seconds = time.perf_counter() - start
            print(f"  demo, bank {len(model.scorer.memory_bank_)} vectors: read model {read_seconds:.2f} s, build "
                  f"extractor + fingerprint check {load_seconds:.2f} s, first upload scored with overlay "
                  f"{answer_seconds:.2f} s; first answer {read_seconds + answer_seconds:.2f} s without the model "
                  f"build (target <= 5 s), {read_seconds + load_seconds + answer_seconds:.2f} s with it")


if __name__ == "__main__":
    main()
