"""Scoring new images with a fitted model: one code path for ``vitad predict`` and the web demo.

- :func:`load_detector`: a fitted model (:mod:`vitad.serving.model`) plus the extractor it was fitted on,
  rebuilt from the model's recorded backbone settings; refused when the weights available now
  are not the weights that produced the training features (their fingerprints differ).
- :func:`decode_image`: bytes -> RGB image the way the pipeline reads its images, refusing what
  is not an image, truncated files and decompression bombs with an :class:`ImageError` naming
  the file.
- :meth:`Detector.score_files`: named files -> one :class:`ScoredFile` each, in order; images
  are decoded, preprocessed, fed to the extractor and scored batch by batch with the
  pipeline's preprocessing, extractor, scorer and image-score rule (the same scores as the
  score stage's), on CPU in the extract stage's streams (:mod:`vitad.streams`); a file
  that cannot be read, decoded or scored becomes an error entry and the batch goes on.
- :func:`result_record`, :func:`results_csv`: one row per file with :data:`CSV_COLUMNS`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vitad.backbones import FeatureExtractor, build_extractor
from vitad.core.data import normalize, resize_rgb
from vitad.streams import map_in_streams
from vitad.featurebank import PATCH_DTYPES
from vitad.serving.model import FittedModel, ModelError, read_model
from vitad.scoring import ScoringError

# Images above this many pixels are refused before decoding (about 4096 x 4096: a 16 MP photo
# fits; MVTec AD images are at most 1024 x 1024).
MAX_IMAGE_PIXELS = 4096 * 4096
CSV_COLUMNS = (
    "file", "width", "height", "anomaly_score", "threshold", "decision", "run", "backbone", "recipe", "category",
    "weights", "message",
)


class ImageError(ValueError):
    """A file cannot be scored; the message names the file and says why."""


# --- decoding -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB
    notes: tuple[str, ...]  # what was done to make it RGB (shown to the user)


_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def decode_image(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode image bytes into RGB the way the pipeline reads its images
    (:func:`vitad.core.data.load_rgb`: grayscale, palette, CMYK and RGBA converted to RGB, alpha
    dropped), after applying the EXIF orientation of camera photos.

    Raises :class:`ImageError` naming ``name`` for: an empty file, bytes that are no image
    format PIL knows, an image of more than ``max_pixels`` pixels (refused from its header,
    before any pixel is decoded: a decompression bomb is a small file claiming a huge size; PIL's
    own DecompressionBombWarning/Error are turned into the same message), a truncated or corrupt
    file, and 16-bit or floating-point images (the pipeline's images are 8-bit).
    """
    if not data:
        raise ImageError(f"{name}: the file is empty")
    bomb_message = (
        f"{name}: the image is larger than the limit of {max_pixels:,} pixels (a decompression bomb or a "
        "very large photo); downscale it first"
    )
    try:
        # catch_warnings swaps the process-wide filter list (not thread-safe); the one filter it
        # adds only concerns PIL's bomb warning, so a concurrent decode can at worst see that
        # warning printed instead of raised, and the pixel check below refuses the image anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageError(f"{bomb_message} ({width}x{height} px)")
                if opened.mode in _HIGH_BIT_DEPTH_MODES:
                    raise ImageError(
                        f"{name}: {opened.mode} images (16-bit or floating point) are not supported; the pipeline's "
                        "images are 8-bit: save it as an 8-bit PNG or JPEG"
                    )
                opened.load()
                orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
                image = ImageOps.exif_transpose(opened)  # a loaded copy, valid after the file closes
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{bomb_message} ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageError(
            f"{name}: not an image (no image format recognised; use a PNG, JPEG, BMP or TIFF)"
        ) from error
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"{name}: the image file is truncated or corrupt ({error})") from error

    notes = []
    if orientation != 1:
        notes.append("rotated upright according to its EXIF orientation")
    if image.mode in ("L", "1"):
        notes.append("grayscale image: converted to RGB by repeating the gray channel, as the pipeline does")
    elif image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        notes.append(
            f"{image.mode} image: converted to RGB, its alpha (transparency) channel dropped, as the pipeline does"
        )
    elif image.mode != "RGB":
        notes.append(f"{image.mode} image: converted to RGB")
    return DecodedImage(image.convert("RGB"), tuple(notes))


# --- the detector -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageScore:
    score: float  # the image score, aggregated from patch_scores as the pipeline does
    patch_scores: np.ndarray  # [h, w] float32
    notes: tuple[str, ...]  # caveats about this image (e.g. a size unlike the training images)

    def is_anomalous(self, threshold: float) -> bool:
        return self.score > threshold


@dataclass(frozen=True)
class ScoredFile:
    """One named file of a batch: its decoded image and score, or why it could not be scored."""

    name: str
    decoded: DecodedImage | None
    result: ImageScore | None
    error: str | None

    @property
    def message(self) -> str:
        """The error, or the notes about the image and its score."""
        if self.error is not None:
            return self.error
        return "; ".join(self.decoded.notes + self.result.notes)


# A named file of a batch: its name and a function that returns its bytes (raising OSError).
Source = tuple[str, Callable[[], bytes]]


@dataclass
class Detector:
    """A fitted model plus the extractor that feeds it."""

    model: FittedModel
    extractor: FeatureExtractor
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def threshold_range(self) -> tuple[float, float]:
        """Bounds for a threshold slider: 0 to twice the larger of the threshold and the
        highest patch score of the pipeline's test images (scores are distances, >= 0)."""
        return 0.0, 2.0 * max(self.model.threshold or 0.0, self.model.colour_scale[1], 1e-6)

    def size_note(self, image: Image.Image) -> str | None:
        if (image.height, image.width) in self.model.train_sizes:
            return None
        sizes = ", ".join(f"{width}x{height}" for height, width in self.model.train_sizes)
        side = self.model.image_size
        return (
            f"the image is {image.width}x{image.height} px, the {self.model.category} training images are {sizes}: "
            f"it is resized to the model input {side}x{side} as they are, but at another scale or aspect ratio its "
            "score is less comparable with the threshold"
        )

    def anomaly_map(self, patch_scores: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
        """The run's anomaly map of one patch grid [h, w] at ``output_size`` (height, width)."""
        return self.model.anomaly_map(patch_scores, output_size)

    def _patch_features(self, pixels: torch.Tensor) -> np.ndarray:
        """Patch grids [B, h, w, D] (float32) of preprocessed images [B, 3, S, S], rounded to
        the dtype the training features were stored in, as the pipeline's test features were."""
        _, patch_grid = self.extractor.extract_arrays(pixels, PATCH_DTYPES[self.model.extractor["patch_dtype"]])
        return patch_grid.astype(np.float32)

    def _image_scores(self, patch_grids: np.ndarray) -> list[tuple[float, np.ndarray] | str]:
        """(image score, patch scores [h, w]) per patch grid of ``patch_grids`` [B, h, w, D], or
        why that image cannot be scored (the others are scored all the same)."""
        try:
            image_scores, patch_scores = self.model.image_scores(patch_grids)  # [B], [B, h, w]
        except ScoringError as error:  # e.g. features beyond the training features' float16 range
            if len(patch_grids) == 1:
                return [f"cannot be scored ({error})"]
            return [outcome for index in range(len(patch_grids)) for outcome in self._image_scores(patch_grids[index : index + 1])]
        return list(zip(image_scores.tolist(), patch_scores))

    def _decoded(self, source: Source) -> tuple[DecodedImage, np.ndarray] | str:
        """(the image, resized uint8 [S, S, 3]) of ``source``, or why it cannot be decoded."""
        name, read = source
        try:
            data = read()
        except OSError as error:
            return f"{name}: cannot be read ({error.strerror or error})"
        try:
            decoded = decode_image(data, name)
        except ImageError as error:
            return str(error)
        return decoded, resize_rgb(decoded.image, self.model.image_size)

    def _decoded_batch(self, batch: Sequence[Source]) -> list[tuple[DecodedImage, np.ndarray] | str]:
        return [self._decoded(source) for source in batch]

    def _decoded_and_scored(self, batch: Sequence[Source]) -> list[ScoredFile]:
        return self._scored(batch, self._decoded_batch(batch))

    def _scored(self, batch: Sequence[Source], decoded: Sequence[tuple[DecodedImage, np.ndarray] | str]) -> list[ScoredFile]:
        """One :class:`ScoredFile` per source of ``batch``, whose images ``decoded`` holds (or
        why one could not be decoded): their features extracted together and scored."""
        good = [index for index, item in enumerate(decoded) if not isinstance(item, str)]
        outcomes = {}
        if good:
            pixels = normalize(torch.from_numpy(np.stack([decoded[index][1] for index in good])))  # [G, 3, S, S]
            # CPU streams run side by side (the scorer only reads its state); a GPU holds one batch at a time
            with self._lock if self.extractor.device.type == "cuda" else contextlib.nullcontext():
                outcomes = dict(zip(good, self._image_scores(self._patch_features(pixels))))
        scored = []
        for index, (name, _) in enumerate(batch):
            item, outcome = decoded[index], outcomes.get(index)
            if isinstance(item, str):
                scored.append(ScoredFile(name, None, None, item))
            elif isinstance(outcome, str):
                scored.append(ScoredFile(name, item[0], None, f"{name}: {outcome}"))
            else:
                note = self.size_note(item[0].image)
                scored.append(ScoredFile(name, item[0], ImageScore(outcome[0], outcome[1], () if note is None else (note,)), None))
        return scored

    def score_files(self, sources: Iterable[Source], batch_size: int = 8) -> Iterator[ScoredFile]:
        """One :class:`ScoredFile` per source, in order (see the module docstring)."""
        sources = list(sources)
        batches = [sources[start : start + batch_size] for start in range(0, len(sources), batch_size)]
        if self.extractor.device.type == "cpu":  # as the extract stage: its streams decode, extract and score
            for scored in map_in_streams(self._decoded_and_scored, batches, self.extractor.cpu_streams):
                yield from scored
            return
        # a GPU: threads decode side by side; the model and the scorer (on all cores) take one batch at a time
        decoded_batches = map_in_streams(self._decoded_batch, batches, min(os.cpu_count() or 1, 8))
        for batch, decoded in zip(batches, decoded_batches):
            yield from self._scored(batch, decoded)


def load_detector(path, device: str | torch.device = "cpu") -> Detector:
    """The fitted model at ``path`` with its extractor rebuilt on ``device``, checked: the
    weights loaded now must have the fingerprint of the weights the model was fitted with."""
    model = read_model(path)
    settings = model.extractor
    extractor = build_extractor(
        model.backbone, settings["config"], settings["weights"], device, model.weights_info.get("seed", 0)
    )
    expected, available = model.weights_info.get("fingerprint"), extractor.weights_info["fingerprint"]
    if expected != available:
        how = (
            "random initialisation draws the same weights only with the same torch version and kind of CPU"
            if model.random_weights
            else "provide the same weights file, or re-run the pipeline (dvc repro) with the weights available here"
        )
        raise ModelError(
            f"{path}: fitted on the features of {model.backbone} weights {model.weights_info.get('source')} with "
            f"fingerprint {expected}, but the weights loaded now ({extractor.weights_info.get('source')}) have "
            f"fingerprint {available}: its scores would not mean the same; {how}"
        )
    if tuple(extractor.grid_size) != tuple(settings["grid_size"]) or extractor.patch_dim != settings["patch_dim"]:
        raise ModelError(
            f"{path}: fitted on a {settings['grid_size']} x {settings['patch_dim']} patch grid, the rebuilt extractor "
            f"gives {list(extractor.grid_size)} x {extractor.patch_dim}; re-run the pipeline (dvc repro)"
        )
    return Detector(model, extractor)


# --- results ------------------------------------------------------------------------------------


def decision(score: float | None, threshold: float) -> str:
    if score is None:
        return "error"
    return "anomalous" if score > threshold else "normal"


def result_record(scored: ScoredFile, threshold: float, model: FittedModel) -> dict:
    """One file's result with :data:`CSV_COLUMNS` (None where there is no value)."""
    image = None if scored.decoded is None else scored.decoded.image
    score = None if scored.result is None else scored.result.score
    return {
        "file": scored.name,
        "width": None if image is None else image.width,
        "height": None if image is None else image.height,
        "anomaly_score": score,
        "threshold": threshold,
        "decision": decision(score, threshold),
        "run": model.run,
        "backbone": model.backbone,
        "recipe": model.recipe,
        "category": model.category,
        "weights": model.weights_info.get("mode", ""),
        "message": scored.message,
    }


def csv_writer(stream) -> csv.DictWriter:
    """A CSV writer of :func:`result_record` rows on ``stream``, its header written."""
    writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    return writer


def csv_row(record: dict) -> dict:
    """A :func:`result_record` as CSV cells: empty where None, floats in full precision (repr)."""
    return {key: "" if value is None else repr(value) if isinstance(value, float) else value
            for key, value in record.items()}


def results_csv(scored_files: Sequence[ScoredFile], threshold: float, model: FittedModel) -> str:
    """CSV (columns :data:`CSV_COLUMNS`, one row per file in order) of a batch."""
    buffer = io.StringIO()
    writer = csv_writer(buffer)
    for scored in scored_files:
        writer.writerow(csv_row(result_record(scored, threshold, model)))
    return buffer.getvalue()
