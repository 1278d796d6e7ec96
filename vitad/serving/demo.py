"""What the web demo (app/demo.py) does, importable and testable without Streamlit.

The demo scores uploaded images with the fitted models the pipeline wrote, never re-fitting:

- :func:`list_runs`: the (run, backbone, category) triples with a fitted model
  (``models/<run>/<category>.safetensors``, written by the score stage) under the project root.
- :func:`load_detector`: that model with its extractor (:func:`vitad.serving.detector.load_detector`:
  the weights fingerprint is checked); its threshold was calibrated on held-out TRAINING images
  by the score stage, and its colour scale is the pipeline's heatmap figures'.
- :func:`score_upload` and :meth:`vitad.serving.detector.Detector.score_files` (the batch mode): the
  code path of ``vitad predict``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitad.backbones import resolve_device
from vitad.core.cli import StageError
from vitad.core.data import DatasetError
from vitad.serving.detector import DecodedImage, Detector, ImageError, ImageScore
from vitad.serving.detector import load_detector as load_model
from vitad.featurebank import extract_settings
from vitad.figures import overlay_image
from vitad.core.io import ArrayFileError, load_metadata
from vitad.serving.model import model_path
from vitad.core.params import ParamsError, load_params, run_names, string_list

PROJECT_ENV = "VITAD_PROJECT"
# Longest side of the images and overlays the page shows (the anomaly map itself is at full resolution).
DISPLAY_SIDE = 1024

# Errors that mean "these pipeline outputs cannot be served", shown in the page as a message.
# (StageError covers ModelError and ScoringError.)
LOAD_ERRORS = (StageError, ParamsError, DatasetError, ArrayFileError, FileNotFoundError)


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

    def model_path(self, root: Path) -> Path:
        return model_path(root, self.name, self.category)


def list_runs(root: str | Path) -> list[Run]:
    """The (run, backbone, category) triples with a fitted model under ``root``
    (``models/<run>/<category>.safetensors``, the backbone read from its metadata): in
    params.yaml's order of runs and categories when ``root`` has a params.yaml, else sorted.

    With a ``params.yaml`` under ``root``, only its ``pipeline.runs`` and ``data.categories``:
    DVC leaves the untracked outputs of a run or category removed from params.yaml in the
    workspace, and the demo must not serve them as current results.
    """
    root = Path(root)
    models_dir = root / "models"
    if not models_dir.is_dir():
        return []
    if (root / "params.yaml").is_file():
        params = load_params(root / "params.yaml")
        names, categories = run_names(params), string_list(params, "data.categories")
    else:
        names = sorted(path.name for path in models_dir.iterdir() if path.is_dir())
        categories = sorted({path.stem for path in models_dir.glob("*/*.safetensors")})
    runs = []
    for name in names:
        for category in categories:
            path = model_path(root, name, category)
            backbone = load_metadata(path).get("backbone") if path.is_file() else None
            if isinstance(backbone, str):
                runs.append(Run(name, backbone, category))
    return runs


def detector_fingerprint(root: str | Path, run: Run) -> str:
    """Changes whenever a file :func:`load_detector` reads changes (the model, params.yaml):
    part of the demo's cache key, so a re-run pipeline is picked up without a restart."""
    root = Path(root)
    stats = {}
    for path in (run.model_path(root), root / "params.yaml"):
        stat = path.stat() if path.is_file() else None
        stats[str(path)] = None if stat is None else [stat.st_mtime_ns, stat.st_size]
    return json.dumps(stats, sort_keys=True)


def load_detector(root: str | Path, run: Run) -> Detector:
    """The fitted model of ``run`` with its extractor, on params.yaml's ``extract.device``."""
    root = Path(root)
    device = resolve_device(extract_settings(load_params(root / "params.yaml")).device)
    return load_model(run.model_path(root), device)


# --- what the page shows ------------------------------------------------------------------------


def score_upload(detector: Detector, data: bytes, name: str) -> tuple[DecodedImage, ImageScore]:
    """Decode and score one uploaded file (the batch code path with one file); every reason it
    cannot be scored is an :class:`vitad.serving.detector.ImageError`."""
    (scored,) = detector.score_files([(name, lambda: data)], batch_size=1)
    if scored.error is not None:
        raise ImageError(scored.error)
    return scored.decoded, scored.result


def display_copy(image: Image.Image, max_side: int = DISPLAY_SIDE) -> Image.Image:
    """An RGB copy shrunk to at most ``max_side`` pixels per side, for the page."""
    shown = image.convert("RGB")
    shown.thumbnail((max_side, max_side), Image.BILINEAR)
    return shown


def display_overlay(detector: Detector, decoded: DecodedImage, result: ImageScore) -> np.ndarray:
    """uint8 [h, w, 3]: the image with its anomaly map (full resolution, the run's sigma) on top,
    in the colours and scale of the pipeline's heatmap figures, shrunk for the page."""
    image = decoded.image
    anomaly_map = detector.anomaly_map(result.patch_scores, (image.height, image.width))
    return overlay_image(image, anomaly_map, detector.model.colour_scale, DISPLAY_SIDE)


def format_score(value: float) -> str:
    """Five significant digits: cosine distances (~0.01) and Mahalanobis distances (~50) alike."""
    return f"{value:.5g}"
