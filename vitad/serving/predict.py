"""``vitad predict``: score new images with a fitted model of the pipeline.

    vitad predict --model models/<run>/<category>.safetensors IMAGES... [-o results.csv]
    vitad predict --run <run> --category <category> [--project DIR] IMAGES...

IMAGES are files, folders (searched recursively for image files) or glob patterns. Writes one
row per file (the web demo's CSV columns, :data:`vitad.serving.detector.CSV_COLUMNS`), as CSV or JSON
lines, to a file (written atomically) or stdout; optionally the heatmap overlay (PNG) and the
raw anomaly map (``.npy``, float32 [H, W] at the image's size, the run's sigma) of every image.
A file that cannot be read, decoded or scored gets an error row; the batch goes on.

Exit status: 0 when every file was scored; 1 when nothing could be scored (no model, wrong
weights, bad arguments); 3 when some file could not be scored; 4 with ``--fail-on-anomaly`` when
some image is anomalous (score above the threshold), whatever else happened.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from vitad.core.data import IMAGE_SUFFIXES
from vitad.serving.detector import ScoredFile, csv_row, csv_writer, load_detector, result_record
from vitad.figures import overlay_image
from vitad.core.io import atomic_path
from vitad.serving.model import ModelError, model_path

EXIT_UNSCORED = 3
EXIT_ANOMALOUS = 4
_GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class InputFile:
    """One file to score: the name its row shows, its path (None when the argument named nothing
    to read) and the relative name of its overlay and map files."""

    name: str
    path: Path | None
    output_name: str
    error: str | None = None


def _images_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def collect_inputs(arguments: list[str]) -> list[InputFile]:
    """The files named by ``arguments``, in order: a file as given; a folder's image files
    (suffixes :data:`vitad.core.data.IMAGE_SUFFIXES`, recursively, sorted), named by their path under
    the folder; a glob pattern's matching files (sorted). An argument that names nothing becomes
    an error entry. Output names are unique (``-2``, ``-3``... appended on collisions)."""
    found: list[tuple[str, Path | None, str, str | None]] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            images = _images_under(path)
            if not images:
                found.append((argument, None, path.name, f"a folder without image files ({', '.join(IMAGE_SUFFIXES)})"))
            found.extend((str(image), image, image.relative_to(path).as_posix(), None) for image in images)
        elif path.is_file():
            found.append((argument, path, path.name, None))
        elif _GLOB_CHARACTERS & set(argument):
            matches = sorted(Path(match) for match in glob.glob(argument, recursive=True) if Path(match).is_file())
            if not matches:
                found.append((argument, None, path.name, "no file matches this pattern"))
            found.extend((str(match), match, match.name, None) for match in matches)
        else:
            found.append((argument, None, path.name, "no such file or folder"))
    inputs, taken = [], set()
    for name, path, output_name, error in found:
        stem, suffix = Path(output_name).with_suffix("").as_posix(), 1
        unique = stem
        while unique in taken:
            suffix += 1
            unique = f"{stem}-{suffix}"
        taken.add(unique)
        inputs.append(InputFile(name, path, unique, error))
    return inputs


def _reader(path: Path | None, error: str | None):
    def read() -> bytes:
        if path is None:
            raise OSError(error)
        return path.read_bytes()

    return read


def _write_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def _write_map(path: Path, anomaly_map: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, anomaly_map.astype(np.float32, copy=False))


@contextlib.contextmanager
def _output_stream(output: str) -> Iterator[TextIO]:
    """stdout for ``-``, else a file renamed into place only when every row is written."""
    if output == "-":
        yield sys.stdout
        return
    with atomic_path(output) as tmp, tmp.open("w", encoding="utf-8", newline="") as stream:
        yield stream


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitad predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    which = parser.add_argument_group("the model (one of)")
    which.add_argument("--model", type=Path, help="a fitted model file, models/<run>/<category>.safetensors")
    which.add_argument("--run", help="a run of the project's pipeline.runs (with --category)")
    which.add_argument("--category", help="the category of --run")
    which.add_argument("--project", type=Path, default=Path("."), help="the project of --run (default: .)")
    parser.add_argument("-o", "--output", default="-", help="results file (default: - for stdout)")
    parser.add_argument("--jsonl", action="store_true", help="JSON lines (one object per file) instead of CSV")
    parser.add_argument("--overlays", type=Path, help="write each image's heatmap overlay here (PNG)")
    parser.add_argument("--maps", type=Path, help="write each image's raw anomaly map here (.npy, float32 [H, W])")
    parser.add_argument("--threshold", type=float, help="decision threshold (default: the model's calibrated one)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument(
        "--fail-on-anomaly", action="store_true", help=f"exit {EXIT_ANOMALOUS} when any image is anomalous (a CI gate)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _model_file(args: argparse.Namespace) -> Path:
    if args.model is not None:
        if args.run is not None or args.category is not None:
            raise ModelError("give either --model or --run and --category, not both")
        return args.model
    if args.run is None or args.category is None:
        raise ModelError("name the model: --model models/<run>/<category>.safetensors, or --run and --category")
    return model_path(args.project, args.run, args.category)


def main(argv: list[str] | None = None) -> int:
    """Run ``vitad predict``; returns the exit status (see the module docstring)."""
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise ModelError(f"--batch-size must be >= 1, got {args.batch_size}")
    detector = load_detector(_model_file(args), args.device)
    model = detector.model
    threshold = model.threshold if args.threshold is None else args.threshold
    if threshold is None:
        raise ModelError(
            f"{model.run}/{model.category}: the model has no calibrated threshold (fewer than 2 training images to "
            "hold out): pass --threshold"
        )
    inputs = collect_inputs(args.images)
    sources = [(item.name, _reader(item.path, item.error)) for item in inputs]
    counts = {"anomalous": 0, "normal": 0, "error": 0}
    with _output_stream(args.output) as stream, tqdm(
        total=len(inputs), unit="img", desc="vitad predict", disable=args.no_progress, file=sys.stderr
    ) as progress:
        writer = None if args.jsonl else csv_writer(stream)
        scored: ScoredFile
        for item, scored in zip(inputs, detector.score_files(sources, batch_size=args.batch_size)):
            record = result_record(scored, threshold, model)
            counts[record["decision"]] += 1
            if scored.result is not None and (args.overlays or args.maps):
                image = scored.decoded.image
                anomaly_map = detector.anomaly_map(scored.result.patch_scores, (image.height, image.width))
                if args.overlays:
                    _write_png(args.overlays / f"{item.output_name}.png", overlay_image(image, anomaly_map, model.colour_scale))
                if args.maps:
                    _write_map(args.maps / f"{item.output_name}.npy", anomaly_map)
            if writer is None:
                stream.write(json.dumps(record) + "\n")
            else:
                writer.writerow(csv_row(record))
            progress.update()
    print(
        f"vitad predict: {len(inputs)} files with {model.run}/{model.category} (threshold {threshold:.5g}): "
        f"{counts['anomalous']} anomalous, {counts['normal']} normal, {counts['error']} not scored"
        + ("" if args.output == "-" else f" -> {args.output}"),
        file=sys.stderr,
    )
    if args.fail_on_anomaly and counts["anomalous"]:
        return EXIT_ANOMALOUS
    return EXIT_UNSCORED if counts["error"] else 0
