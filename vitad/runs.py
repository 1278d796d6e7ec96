"""Runs: what one entry of ``pipeline.runs`` computes, resolved from params.yaml in one place.

A run is a backbone, a recipe and the run's own overrides::

    pipeline:
      runs:
        wide_resnet50_2-patchcore: {backbone: wide_resnet50_2, recipe: patchcore}
        dinov2_vitb14-anomalydino-1shot: {backbone: dinov2_vitb14, recipe: anomalydino, few_shot: 1}

- ``recipe`` names a section ``score.<recipe>``: ``method`` (a scorer of
  :data:`vitad.scoring.SCORERS`), that scorer's parameters and optionally ``sigma``;
- any other key of the run overrides a scorer parameter or ``sigma``; ``embedding`` (a mapping)
  overrides settings of the image-embedding route only;
- ``sigma``: the heatmap's Gaussian blur in pixels of the MODEL INPUT (PatchCore, anomalib:
  4), scaled to whatever resolution maps are drawn or evaluated at; default ``heatmap.sigma``;
- ``map_upsample``: how patch grids become maps, ``bilinear`` (the official PatchCore code; the
  default) or ``nearest`` (anomalib's PatchCore and AnomalyDINO).

The run's key names its stages and outputs (``scores/<run>``, ``reports/metrics/<run>.json``).
The score stage of a run depends on ``pipeline.runs.<run>``, ``score.<recipe>`` and
``heatmap.sigma`` only, so editing one run or one recipe re-runs only the runs that use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vitad.heatmap import UPSAMPLING, anomaly_map
from vitad.core.params import ParamsError, param, run_names, string_list
from vitad.scoring import SCORERS, embedding_route_params, make_scorer

RUN_KEYS = ("backbone", "recipe", "embedding")  # keys of a run that are not scorer overrides
RECIPE_KEYS = ("method",)  # keys of a recipe section that are not scorer parameters
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class RunSpec:
    """Everything a run's stages need to know, validated."""

    name: str
    backbone: str
    recipe: str
    method: str
    patch_params: dict  # scorer parameters of the patch route (as given; defaults filled by the scorer)
    embedding_params: dict  # scorer parameters of the image-embedding route
    sigma: float  # heatmap blur, pixels at the model input size
    map_upsample: str  # bilinear | nearest

    @property
    def label(self) -> str:
        return f"{self.backbone} · {self.recipe}"

    def model_map(self, image_size: int) -> Callable[[np.ndarray], np.ndarray]:
        """grid [h, w] -> this run's anomaly map at the model input (image_size x image_size), for
        image-score rules that read the map (``aggregate: map_max``)."""
        return lambda grid: anomaly_map(grid, (image_size, image_size), self.sigma, image_size, self.map_upsample)


def _sigma(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ParamsError(f"params.yaml: {where} must be a number >= 0 (pixels at the model input), got {value!r}")
    return float(value)


def run_spec(params: dict, name: str) -> RunSpec:
    """The validated :class:`RunSpec` of ``pipeline.runs.<name>``."""
    backbones = string_list(params, "pipeline.backbones")
    where = f"pipeline.runs.{name}"
    if not _RUN_NAME.fullmatch(name):
        raise ParamsError(f"params.yaml: {where}: a run name (a file name and a params.yaml key) has letters, digits, '_' and '-' only")
    entry = param(params, where, dict)
    backbone = param(params, f"{where}.backbone", str)
    if backbone not in backbones:
        raise ParamsError(f"params.yaml: {where}.backbone {backbone!r} is not in pipeline.backbones ({', '.join(backbones)})")
    recipe = param(params, f"{where}.recipe", str)
    recipes = param(params, "score", dict)
    if recipe not in recipes:
        raise ParamsError(f"params.yaml: {where}.recipe {recipe!r} is not a section of score ({', '.join(recipes)})")
    section = param(params, f"score.{recipe}", dict)
    method = param(params, f"score.{recipe}.method", str, choices=tuple(SCORERS))
    overrides = {key: value for key, value in entry.items() if key not in RUN_KEYS}
    settings = {**{key: value for key, value in section.items() if key not in RECIPE_KEYS}, **overrides}
    sigma = _sigma(settings.pop("sigma", param(params, "heatmap.sigma", (int, float), 4)), f"{where} sigma")
    map_upsample = settings.pop("map_upsample", "bilinear")
    if map_upsample not in UPSAMPLING:
        raise ParamsError(f"params.yaml: {where} map_upsample must be one of {', '.join(UPSAMPLING)}, got {map_upsample!r}")
    embedding_overrides = param(params, f"{where}.embedding", dict, {})
    embedding_params = embedding_route_params(method, settings, embedding_overrides)
    origin = f"params.yaml: score.{recipe} with the overrides of {where}"
    make_scorer(method, settings, where=origin)  # bad settings fail here, naming where they came from
    make_scorer(method, embedding_params, where=f"{origin} (image-embedding route)")
    return RunSpec(name, backbone, recipe, method, settings, embedding_params, sigma, map_upsample)


def run_specs(params: dict) -> list[RunSpec]:
    """The :class:`RunSpec` of every entry of ``pipeline.runs``, in params order."""
    return [run_spec(params, name) for name in run_names(params)]
