"""Extraction throughput: the extract stage's code path versus a bare forward pass.

For each backbone (random weights, as params.yaml describes it, at --image-size), on one category
of the default dataset:

- bare:     the model's forward alone on pre-decoded, pre-normalised batches already in memory;
- pipeline: what the stage runs on the same images — extract_bank (decoding, resizing,
            normalisation, post-processing, each batch's features written to the bank file).

Prints images/s of both and their ratio (target >= 0.90). On CPU a CNN's extraction runs two
streams, each decoding a batch and running the model on it with half the torch threads
(vitad.streams), so a small model's pipeline can beat the bare forward on
all threads (ratio above 1). ``--train-images N`` generates the category with N training images
instead of using ``--data`` (the default set's 15 images are two batches, too few for the
streams to overlap decoding with a forward pass, and a run of ~0.3 s is at the mercy of noise).
Best of --repeats runs each, bare and pipeline runs interleaved, since other processes may
compete for the CPU; the paired ratio is the median over the repeats of bare / pipeline time of
one run and the next, which cancels the machine's slow drifts (on the shared 2-core build
machines bare throughput alone moves by up to 25 % between invocations).

    python benchmarks/extract.py [--data data/dataset | --train-images 40] [--category weave] [--backbones resnet50 ...]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad import synthetic  # noqa: E402
from vitad.backbones import build_extractor, resolve_device  # noqa: E402
from vitad.core.data import ImageDataset, collate, index_category  # noqa: E402
from vitad.featurebank import bank_info, extract_bank, extract_settings  # noqa: E402
from vitad.core.params import load_params, param  # noqa: E402


def _dataset(data: Path, category: str, params: dict, scratch: Path, train_images: int | None) -> Path:
    if train_images is None and (data / category).is_dir():
        return data
    if train_images is None:
        print(f"{data / category} not found: generating the default dataset's {category!r} into {scratch}")
    synthetic.generate(
        scratch / "dataset",
        [category],
        seed=param(params, "data.synthetic.seed", int),
        train_images=param(params, "data.synthetic.train_images", int) if train_images is None else train_images,
        test_good_images=param(params, "data.synthetic.test_good_images", int),
        test_images_per_defect=param(params, "data.synthetic.test_images_per_defect", int),
    )
    return scratch / "dataset"


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader's decoding workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of run()."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    run()
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def _bare(extractor, batches: list[torch.Tensor]) -> None:
    for pixels in batches:
        extractor.bare_forward(pixels)
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()


def _pipeline(extractor, root: Path, samples, batch_size: int, out: Path, info: dict) -> None:
    extract_bank(out, extractor, root, samples, batch_size, info, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, default=Path("data/dataset"))
    parser.add_argument("--category", default="weave")
    parser.add_argument(
        "--backbones", nargs="+", default=["resnet50", "wide_resnet50_2", "dinov2_vitb14", "mae_vitb16"]
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-images", type=int, help="generate the category with this many training images")
    args = parser.parse_args()
    if args.train_images is not None and args.train_images < 1:
        parser.error(f"--train-images must be at least 1, got {args.train_images}")

    params = load_params(args.params)
    settings = extract_settings(params)
    device = resolve_device(settings.device)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = _dataset(args.data, args.category, params, Path(scratch), args.train_images)
        samples = index_category(root, args.category)
        for name in args.backbones:
            config = dict(param(params, f"backbones.{name}", dict), image_size=args.image_size)
            config.pop("config", None)  # full-size architecture, whatever tiny override params.yaml holds
            extractor = build_extractor(name, config, "random", device, settings.seed)
            loader = torch.utils.data.DataLoader(
                ImageDataset(root, samples, extractor.image_size), batch_size=args.batch_size, collate_fn=collate
            )
            batches = [extractor.prepare(images) for images, _ in loader]
            extractor.bare_forward(batches[0])  # warm-up: kernel selection, allocator
            info = bank_info(name, args.category, config, "random", extractor, settings.patch_dtype)
            out = Path(scratch) / f"{name}.safetensors"
            bare_runs, pipeline_runs = [], []  # (wall s, CPU s), bare and pipeline interleaved
            for _ in range(args.repeats):
                bare_runs.append(_timed(lambda: _bare(extractor, batches)))
                # The stage writes a new file (DVC deletes outputs first): replacing the previous
                # run's 40 MB bank would time its unlink too.
                out.unlink(missing_ok=True)
                pipeline_runs.append(
                    _timed(
                        lambda: _pipeline(extractor, root, samples, args.batch_size, out, info)
                    )
                )
            bare = tuple(map(min, zip(*bare_runs)))  # best wall, best CPU
            pipeline = tuple(map(min, zip(*pipeline_runs)))
            paired = statistics.median(b[0] / p[0] for b, p in zip(bare_runs, pipeline_runs))
            rows.append((name, bare, pipeline, paired))
            print(
                f"{name}: bare {len(samples) / bare[0]:.2f} img/s, pipeline {len(samples) / pipeline[0]:.2f} img/s",
                flush=True,
            )

    print(
        f"\n{len(samples)} images of {args.category!r}, {args.image_size} px, batch {args.batch_size}, random weights, "
        f"{device.type} ({extractor.precision}), {torch.get_num_threads()} torch threads; best of {args.repeats}"
    )
    print(f"{'backbone':<18}{'bare img/s':>12}{'pipeline img/s':>16}{'ratio':>8}{'paired ratio':>14}{'CPU-time ratio':>16}")
    for name, (bare_wall, bare_cpu), (pipeline_wall, pipeline_cpu), paired in rows:
        print(
            f"{name:<18}{len(samples) / bare_wall:>12.2f}{len(samples) / pipeline_wall:>16.2f}"
            f"{bare_wall / pipeline_wall:>8.2f}{paired:>14.2f}{bare_cpu / pipeline_cpu:>16.2f}"
        )
    print("ratio: pipeline / bare images/s, best runs (target >= 0.90); paired ratio: median of adjacent runs; CPU-time ratio: the same from CPU seconds spent "
          "(decoding workers included), less sensitive to other processes competing for the cores")


if __name__ == "__main__":
    main()
