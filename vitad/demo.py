"""What the web demo (app/demo.py) does, importable and testable without Streamlit.

The demo scores uploaded images with exactly what the pipeline produced and used:

- :func:`list_runs`: the (run, backbone, category) triples that have both a feature bank
  (``featurebanks/<backbone>/<category>.safetensors``) and scores
  (``scores/<run>/<category>.safetensors``) under the project root.
- :func:`load_detector`: rebuilds the extractor that wrote the bank (its recorded params entry,
  weights switch and seed; the recorded weights are checked), fits the patch-level scorer on
  the bank's training features with the parameters recorded in the score file, and calibrates a
  threshold on held-out TRAINING images only (:func:`holdout_image_scores`); test labels are
  never read. Test scores serve only the colour scale of the overlays, the same scale as the
  pipeline's heatmap figures (:func:`vitad.figures.colour_scale`).
- :func:`decode_upload`: uploaded bytes -> RGB image, refusing what is not an image, truncated
  files and decompression bombs with an :class:`UploadError` naming the file.
- :meth:`Detector.score`: the pipeline's preprocessing, extractor, scorer, image-score rule and
  :func:`vitad.heatmap.anomaly_map` (with the run's sigma) on one image.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vitad.backbones import FeatureExtractor, build_extractor, resolve_device
from vitad.cli import StageError
from vitad.data import DatasetError, preprocess
from vitad.featurebank import INFO_KEYS, PATCH_DTYPES, extract_settings, read_bank
from vitad.figures import OVERLAY_ALPHA, OVERLAY_CMAP, colour_scale
from vitad.heatmap import anomaly_map
from vitad.io import load_arrays, load_metadata
from vitad.params import ParamsError, load_params, run_names, string_list
from vitad.scorefile import ScoresError, read_category_scores
from vitad.scoring import ScoringError, few_shot_indices, make_scorer
from vitad.scoring.base import ModelMap

PROJECT_ENV = "VITAD_PROJECT"
# Uploads above this many pixels are refused before decoding (about 4096 x 4096: a 16 MP photo
# fits; MVTec AD images are at most 1024 x 1024).
MAX_UPLOAD_PIXELS = 4096 * 4096
# Threshold calibration: at most this many training images are held out, in this many folds.
MAX_CALIBRATION_IMAGES = 20
CALIBRATION_FOLDS = 5
# Longest side of the overlays the page shows (the anomaly map itself is at full resolution).
DISPLAY_SIDE = 1024
CSV_COLUMNS = (
    "file", "width", "height", "anomaly_score", "threshold", "decision", "run", "backbone", "recipe", "category",
    "weights", "message",
)


class DemoError(StageError):
    """The pipeline outputs the demo needs are missing or disagree with each other."""


class UploadError(ValueError):
    """An uploaded file cannot be scored; the message names the file and says why."""


# Errors that mean "these pipeline outputs cannot be served", shown in the page as a message.
# (StageError covers DemoError, ScoringError and FeatureBankError.)
LOAD_ERRORS = (StageError, ParamsError, ScoresError, DatasetError, FileNotFoundError)


def project_root(environ: dict | None = None) -> Path:
    """The project whose pipeline outputs are served: ``$VITAD_PROJECT``, else the working directory."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(PROJECT_ENV) or Path.cwd()).resolve()


@dataclass(frozen=True)
class Run:
    """One pipeline result the demo can serve: a run of pipeline.runs on one category."""

    name: str  # the run's key in pipeline.runs (its scores directory)
    backbone: str
    category: str

    @property
    def label(self) -> str:
        return f"{self.name} · {self.category}"

    def bank_path(self, root: Path) -> Path:
        return root / "featurebanks" / self.backbone / f"{self.category}.safetensors"

    def scores_path(self, root: Path) -> Path:
        return root / "scores" / self.name / f"{self.category}.safetensors"


def list_runs(root: str | Path) -> list[Run]:
    """The (run, backbone, category) triples with a score file AND the feature bank to fit on,
    found from the files under ``root`` (``scores/<run>/<category>.safetensors``, the backbone
    read from its metadata): in params.yaml's order of runs and categories when ``root`` has a
    params.yaml, else sorted.

    With a ``params.yaml`` under ``root``, only its ``pipeline.runs`` and ``data.categories``:
    DVC leaves the untracked outputs of a run or category removed from params.yaml in the
    workspace, and the demo must not serve them as current results.
    """
    root = Path(root)
    scores_dir = root / "scores"
    if not scores_dir.is_dir():
        return []
    if (root / "params.yaml").is_file():
        params = load_params(root / "params.yaml")
        names, categories = run_names(params), string_list(params, "data.categories")
    else:
        names = sorted(path.name for path in scores_dir.iterdir() if path.is_dir())
        categories = sorted({path.stem for path in scores_dir.glob("*/*.safetensors")})
    runs = []
    for name in names:
        for category in categories:
            scores_file = scores_dir / name / f"{category}.safetensors"
            if not scores_file.is_file():
                continue
            backbone = load_metadata(scores_file).get("backbone")
            run = Run(name, backbone, category) if isinstance(backbone, str) else None
            if run is not None and run.bank_path(root).is_file():
                runs.append(run)
    return runs


def detector_fingerprint(root: str | Path, run: Run) -> str:
    """Changes whenever a file :func:`load_detector` reads changes (bank, scores, params.yaml):
    part of the demo's cache key, so a re-run pipeline is picked up without a restart."""
    root = Path(root)
    stats = {}
    for path in (run.bank_path(root), run.scores_path(root), root / "params.yaml"):
        stat = path.stat() if path.is_file() else None
        stats[str(path)] = None if stat is None else [stat.st_mtime_ns, stat.st_size]
    return json.dumps(stats, sort_keys=True)


# --- uploads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedUpload:
    image: Image.Image  # RGB
    notes: tuple[str, ...]  # what was done to make it RGB (shown to the user)


_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def decode_upload(data: bytes, name: str, max_pixels: int = MAX_UPLOAD_PIXELS) -> DecodedUpload:
    """Decode uploaded bytes into an RGB image the way the pipeline reads its images
    (:func:`vitad.data.load_rgb`: grayscale, palette, CMYK and RGBA converted to RGB, alpha
    dropped), after applying the EXIF orientation of camera photos.

    Raises :class:`UploadError` naming ``name`` for: an empty file, bytes that are no image
    format PIL knows, an image of more than ``max_pixels`` pixels (refused from its header,
    before any pixel is decoded: a decompression bomb is a small file claiming a huge size; PIL's
    own DecompressionBombWarning/Error are turned into the same message), a truncated or corrupt
    file, and 16-bit or floating-point images (the pipeline's images are 8-bit).
    """
    if not data:
        raise UploadError(f"{name}: the file is empty")
    bomb_message = (
        f"{name}: the image is larger than the limit of {max_pixels:,} pixels (a decompression bomb or a "
        "very large photo); downscale it first"
    )
    try:
        # catch_warnings swaps the process-wide filter list (not thread-safe); the one filter it
        # adds only concerns PIL's bomb warning, so a concurrent upload can at worst see that
        # warning printed instead of raised, and the pixel check below refuses the image anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise UploadError(f"{bomb_message} ({width}x{height} px)")
                if opened.mode in _HIGH_BIT_DEPTH_MODES:
                    raise UploadError(
                        f"{name}: {opened.mode} images (16-bit or floating point) are not supported; the pipeline's "
                        "images are 8-bit: save it as an 8-bit PNG or JPEG"
                    )
                opened.load()
                orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
                image = ImageOps.exif_transpose(opened)  # a loaded copy, valid after the file closes
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UploadError(f"{bomb_message} ({error})") from error
    except UnidentifiedImageError as error:
        raise UploadError(
            f"{name}: not an image (no image format recognised; upload a PNG, JPEG, BMP or TIFF)"
        ) from error
    except UploadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise UploadError(f"{name}: the image file is truncated or corrupt ({error})") from error

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
    return DecodedUpload(image.convert("RGB"), tuple(notes))


# --- threshold calibration on training images ---------------------------------------------------


def holdout_image_scores(
    method: str,
    scorer_params: dict,
    train_patches: np.ndarray,
    max_images: int = MAX_CALIBRATION_IMAGES,
    n_folds: int = CALIBRATION_FOLDS,
    model_map: ModelMap | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores of training images scored as if they were new: (indices [C], scores [C]).

    Only training features ``train_patches`` [N, h, w, D] are used (never test images or labels).
    C = min(N, ``max_images``) images, evenly spaced over the training set, are held out:

    - ``few_shot`` n < N: the scorer is fitted on n images drawn at random
      (:func:`vitad.scoring.few_shot_indices`), so the held-out images are taken from the N - n
      images it never sees, and one fit serves them all;
    - otherwise they are split into min(``n_folds``, C) folds; each fold is scored by a scorer
      fitted on all the other training images (the bank is then 1 fold smaller than the final
      one, so the scores lean slightly high: a conservative threshold).
    """
    n_train = len(train_patches)
    few_shot = scorer_params.get("few_shot")
    if few_shot is not None and few_shot < n_train:
        unseen = np.setdiff1d(np.arange(n_train), few_shot_indices(n_train, few_shot, scorer_params.get("seed", 0)))
        indices = unseen[np.unique(np.linspace(0, len(unseen) - 1, min(max_images, len(unseen))).round().astype(int))]
        scorer = make_scorer(method, scorer_params).fit(train_patches)
        return indices, scorer.image_scores(train_patches[indices], model_map)[0]
    if n_train < 2:
        raise DemoError(
            f"{n_train} training image: at least 2 are needed to calibrate a threshold on held-out training images"
        )
    fold_params = {**scorer_params, "few_shot": None}  # few_shot == N means all images
    indices = np.unique(np.linspace(0, n_train - 1, min(max_images, n_train)).round().astype(int))
    image_scores = np.empty(len(indices), dtype=np.float32)
    position = 0
    for fold in np.array_split(indices, min(n_folds, len(indices))):
        kept = np.setdiff1d(np.arange(n_train), fold)
        scorer = make_scorer(method, fold_params).fit(train_patches[kept])
        image_scores[position : position + len(fold)] = scorer.image_scores(train_patches[fold], model_map)[0]
        position += len(fold)
    return indices, image_scores


def calibrated_threshold(holdout_scores: np.ndarray) -> float:
    """The highest held-out training score: every held-out normal image is classified normal
    (an image is anomalous when its score is strictly above the threshold)."""
    if len(holdout_scores) == 0:
        raise ValueError("no held-out training scores to calibrate a threshold on")
    return float(np.max(holdout_scores))


# --- the detector -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageScore:
    score: float  # the image score, aggregated from patch_scores as the pipeline does
    patch_scores: np.ndarray  # [h, w] float32
    anomaly_map: np.ndarray  # [H, W] float32 at the image's size
    notes: tuple[str, ...]  # caveats about this image (e.g. a size unlike the training images)

    def is_anomalous(self, threshold: float) -> bool:
        return self.score > threshold


@dataclass
class Detector:
    """A fitted patch-level scorer plus the extractor that feeds it, for one :class:`Run`."""

    run: Run
    extractor: FeatureExtractor
    scorer: object  # a fitted vitad.scoring scorer (patch level)
    patch_dtype: str  # the bank's storage dtype; new features are rounded to it like the bank's
    sigma: float  # the run's heatmap blur, pixels at the model input
    map_upsample: str  # the run's patch grid -> map upsampling
    threshold: float  # calibrated on held-out training images
    holdout_scores: np.ndarray  # [C] the held-out training image scores behind the threshold
    colour_scale: tuple[float, float]  # the pipeline's heatmap colour scale for this run
    train_sizes: tuple[tuple[int, int], ...]  # (height, width) of the training images
    weights_info: dict
    recipe: str  # the run's recipe (a section of params.yaml's score)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def random_weights(self) -> bool:
        return self.weights_info.get("mode") == "random"

    @property
    def threshold_range(self) -> tuple[float, float]:
        """Bounds for a threshold slider: 0 to twice the larger of the threshold and the
        highest patch score of the pipeline's test images (scores are distances, >= 0)."""
        return 0.0, 2.0 * max(self.threshold, self.colour_scale[1], 1e-6)

    def size_note(self, image: Image.Image) -> str | None:
        if (image.height, image.width) in self.train_sizes:
            return None
        sizes = ", ".join(f"{width}x{height}" for height, width in self.train_sizes)
        side = self.extractor.image_size
        return (
            f"the image is {image.width}x{image.height} px, the {self.run.category} training images are {sizes}: it is "
            f"resized to the model input {side}x{side} as they are, but at another scale or aspect ratio its score is "
            "less comparable with the threshold"
        )

    def anomaly_map(self, patch_scores: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
        """The run's anomaly map of one patch grid [h, w] at ``output_size``."""
        return anomaly_map(patch_scores, output_size, self.sigma, self.extractor.image_size, self.map_upsample)

    def model_map(self, patch_scores: np.ndarray) -> np.ndarray:
        side = self.extractor.image_size
        return self.anomaly_map(patch_scores, (side, side))

    def score(self, image: Image.Image) -> ImageScore:
        """Score one RGB image (e.g. :attr:`DecodedUpload.image`)."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode} (decode uploads with decode_upload)")
        pixels = preprocess(image, self.extractor.image_size)[None]  # [1, 3, S, S]
        embedding = torch.empty(1, self.extractor.embedding_dim)
        grid_shape = (1, *self.extractor.grid_size, self.extractor.patch_dim)  # [1, h, w, D]
        patch_grid = np.empty(grid_shape, dtype=PATCH_DTYPES[self.patch_dtype])
        with self._lock:  # one scoring at a time: the model and the scorer are shared by all sessions
            self.extractor.extract_into(pixels, embedding, torch.from_numpy(patch_grid))
            image_scores, patch_scores = self.scorer.image_scores(patch_grid.astype(np.float32), self.model_map)  # [1], [1, h, w]
        image_score = float(image_scores[0])
        note = self.size_note(image)
        return ImageScore(
            score=image_score,
            patch_scores=patch_scores[0],
            anomaly_map=self.anomaly_map(patch_scores[0], (image.height, image.width)),
            notes=() if note is None else (note,),
        )


def load_detector(root: str | Path, run: Run) -> Detector:
    """Fit the scorer of ``run`` on its training features and calibrate its threshold (see the
    module docstring). Reads params.yaml under ``root`` for ``extract.device``; everything else
    comes from what the pipeline recorded."""
    root = Path(root)
    params = load_params(root / "params.yaml")
    device = resolve_device(extract_settings(params).device)

    bank_path, scores_path = run.bank_path(root), run.scores_path(root)
    bank = read_bank(bank_path)
    test_scores = read_category_scores(scores_path, expected_category=run.category)
    _, scores_metadata = load_arrays(scores_path)
    if (test_scores.run, test_scores.backbone) != (run.name, run.backbone) or "params" not in scores_metadata:
        raise DemoError(
            f"{scores_path}: written for run {test_scores.run} on {test_scores.backbone} or without scorer params; "
            "re-run the pipeline (dvc repro)"
        )
    if test_scores.weights != bank.info["weights_info"]:
        raise DemoError(f"{scores_path} and {bank_path} come from different weights; re-run the pipeline (dvc repro)")

    info = bank.info
    missing = [key for key in (*INFO_KEYS, "weights") if key not in info]
    if missing:
        raise DemoError(f"{bank_path}: bank info lacks {', '.join(missing)}; re-run the pipeline (dvc repro)")
    seed = info["weights_info"].get("seed", 0)
    extractor = build_extractor(run.backbone, info["config"], info["weights"], device, seed)
    method = test_scores.method
    if extractor.weights_info != info["weights_info"]:
        raise DemoError(
            f"{bank_path}: written with weights {info['weights_info']}, but backbones.{run.backbone} now loads "
            f"{extractor.weights_info}; re-run the pipeline (dvc repro)"
        )
    if tuple(extractor.grid_size) != bank.grid_size or extractor.patch_dim != bank.train_patches.shape[-1]:
        raise DemoError(
            f"{bank_path}: patch grid {bank.grid_size} x {bank.train_patches.shape[-1]} does not match the rebuilt "
            f"extractor ({extractor.grid_size} x {extractor.patch_dim}); re-run the pipeline (dvc repro)"
        )

    scorer_params = scores_metadata["params"]
    try:
        scorer = make_scorer(method, scorer_params).fit(bank.train_patches)
        model_map = test_scores.model_map
        _, holdout_scores = holdout_image_scores(method, scorer_params, bank.train_patches, model_map=model_map)
    except StageError as error:
        raise DemoError(f"{bank_path}: {error}") from error
    return Detector(
        run=run,
        extractor=extractor,
        scorer=scorer,
        patch_dtype=info["patch_dtype"],
        sigma=test_scores.sigma,
        map_upsample=test_scores.map_upsample,
        threshold=calibrated_threshold(holdout_scores),
        holdout_scores=holdout_scores,
        colour_scale=colour_scale(test_scores.patch_scores),
        train_sizes=tuple(sorted({tuple(sample.original_size) for sample in bank.train_samples})),
        weights_info=info["weights_info"],
        recipe=test_scores.recipe,
    )


# --- what the page shows ------------------------------------------------------------------------


def score_upload(detector: Detector, data: bytes, name: str) -> tuple[DecodedUpload, ImageScore]:
    """Decode and score one uploaded file; every reason it cannot be scored is an UploadError."""
    decoded = decode_upload(data, name)
    try:
        return decoded, detector.score(decoded.image)
    except ScoringError as error:  # e.g. features beyond the bank's float16 range
        raise UploadError(f"{name}: cannot be scored ({error})") from error


def display_copy(image: Image.Image, max_side: int = DISPLAY_SIDE) -> Image.Image:
    """An RGB copy shrunk to at most ``max_side`` pixels per side, for the page."""
    shown = image.convert("RGB")
    shown.thumbnail((max_side, max_side), Image.BILINEAR)
    return shown


def overlay_image(
    image: Image.Image, anomaly_map: np.ndarray, scale: tuple[float, float], max_side: int = DISPLAY_SIDE
) -> np.ndarray:
    """uint8 [h, w, 3]: the image with the anomaly map on top, coloured as the pipeline's heatmap
    figures (colour map, opacity and ``scale`` = (vmin, vmax)), shrunk to at most ``max_side``
    pixels per side for display."""
    if anomaly_map.shape != (image.height, image.width):
        raise ValueError(f"anomaly map {anomaly_map.shape} does not match the image {image.height}x{image.width}")
    shown = display_copy(image, max_side)
    heat = Image.fromarray(np.ascontiguousarray(anomaly_map, dtype=np.float32), mode="F")
    heat = np.asarray(heat.resize(shown.size, Image.BILINEAR))  # [h, w]
    vmin, vmax = scale
    normalised = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colours = colormaps[OVERLAY_CMAP](normalised, bytes=True)[..., :3].astype(np.float32)  # [h, w, 3]
    blended = (1.0 - OVERLAY_ALPHA) * np.asarray(shown, dtype=np.float32) + OVERLAY_ALPHA * colours
    return blended.round().astype(np.uint8)


def format_score(value: float) -> str:
    """Five significant digits: cosine distances (~0.01) and Mahalanobis distances (~50) alike."""
    return f"{value:.5g}"


@dataclass(frozen=True)
class BatchRow:
    """One uploaded file of a batch: its score, or why it could not be scored."""

    file: str
    width: int | None
    height: int | None
    score: float | None
    message: str  # notes about the image, or the error

    def decision(self, threshold: float) -> str:
        if self.score is None:
            return "error"
        return "anomalous" if self.score > threshold else "normal"


def results_csv(rows: Sequence[BatchRow], threshold: float, detector: Detector) -> str:
    """CSV (columns :data:`CSV_COLUMNS`, one row per file in upload order) of a batch."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                "file": row.file,
                "width": "" if row.width is None else row.width,
                "height": "" if row.height is None else row.height,
                "anomaly_score": "" if row.score is None else repr(row.score),
                "threshold": repr(threshold),
                "decision": row.decision(threshold),
                "run": detector.run.name,
                "backbone": detector.run.backbone,
                "recipe": detector.recipe,
                "category": detector.run.category,
                "weights": detector.weights_info.get("mode", ""),
                "message": row.message,
            }
        )
    return buffer.getvalue()
