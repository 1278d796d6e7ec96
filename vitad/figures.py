"""Figures: image | overlay | ground-truth triplets and per-category comparison grids."""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vitad.core.data import Sample, load_rgb, sample_mask
from vitad.heatmap import colour_scale
from vitad.core.io import atomic_path
from vitad.core.params import ParamsError, param, positive_int
from vitad.scorefile import CategoryScores, ScoresError

# --- figures ----------------------------------------------------------------------------------
#
# Figures are drawn on a bare matplotlib ``Figure`` with the Agg canvas: no pyplot, so no global
# figure registry and no backend selection leaking into the caller (stages, tests, web demo).

DEFAULT_DPI = 80
OVERLAY_CMAP = "jet"
OVERLAY_ALPHA = 0.5
PANEL_INCHES = 3.0  # side of one image panel in a triplet figure
COMPARE_PANEL_INCHES = 1.6  # side of one cell in a comparison figure


@dataclass(frozen=True)
class FigureSettings:
    """The ``heatmap`` section of params.yaml."""

    examples_per_defect: int  # figures per defect type and category
    good_examples: int  # figures of good images per category
    dpi: int = DEFAULT_DPI

    @classmethod
    def from_params(cls, params: dict) -> "FigureSettings":
        counts = {}
        for key in ("examples_per_defect", "good_examples"):
            counts[key] = param(params, f"heatmap.{key}", int)
            if counts[key] < 0:
                raise ParamsError(f"params.yaml: heatmap.{key} must be >= 0, got {counts[key]!r}")
        if not any(counts.values()):
            raise ParamsError("params.yaml: heatmap.examples_per_defect and heatmap.good_examples are both 0: nothing to draw")
        return cls(dpi=positive_int(params, "heatmap.dpi", DEFAULT_DPI), **counts)


def select_examples(samples: list[Sample], examples_per_defect: int, good_examples: int) -> list[int]:
    """Indices of the test samples to draw: the first ``examples_per_defect`` images (by path) of
    every defect type, defect types in alphabetical order, then the first ``good_examples`` good
    images. Depends only on the sample list, so every backbone x method draws the same images."""
    if examples_per_defect < 0 or good_examples < 0:
        raise ValueError(f"examples_per_defect and good_examples must be >= 0, got {examples_per_defect}, {good_examples}")
    order = sorted(range(len(samples)), key=lambda i: (samples[i].defect == "good", samples[i].defect, samples[i].image_path))
    chosen, taken = [], {}
    for index in order:
        defect = samples[index].defect
        limit = good_examples if defect == "good" else examples_per_defect
        if taken.get(defect, 0) < limit:
            chosen.append(index)
            taken[defect] = taken.get(defect, 0) + 1
    return chosen


def overlay_image(
    image: Image.Image, anomaly_map: np.ndarray, scale: tuple[float, float], max_side: int | None = None
) -> np.ndarray:
    """uint8 [h, w, 3]: the RGB ``image`` with its ``anomaly_map`` [H, W] on top, coloured as the
    heatmap figures (colour map, opacity and ``scale`` = (vmin, vmax)); shrunk to at most
    ``max_side`` pixels per side when given (the map resized bilinearly with it)."""
    if anomaly_map.shape != (image.height, image.width):
        raise ValueError(f"anomaly map {anomaly_map.shape} does not match the image {image.height}x{image.width}")
    shown = image.convert("RGB")
    if max_side is not None:
        shown.thumbnail((max_side, max_side), Image.BILINEAR)
    heat = Image.fromarray(np.ascontiguousarray(anomaly_map, dtype=np.float32), mode="F")
    heat = np.asarray(heat.resize(shown.size, Image.BILINEAR))  # [h, w]
    vmin, vmax = scale
    normalised = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colours = colormaps[OVERLAY_CMAP](normalised, bytes=True)[..., :3].astype(np.float32)  # [h, w, 3]
    blended = (1.0 - OVERLAY_ALPHA) * np.asarray(shown, dtype=np.float32) + OVERLAY_ALPHA * colours
    return blended.round().astype(np.uint8)


def figure_name(sample: Sample) -> str:
    """``<category>_<defect>_<image id>.png``: unique within a category's test set."""
    return f"{sample.category}_{sample.defect}_{Path(sample.image_path).stem}.png"


def figure_title(scores: CategoryScores, index: int) -> str:
    sample = scores.test_samples[index]
    return (
        f"{scores.label} · {sample.category} / {sample.defect} {Path(sample.image_path).stem} · "
        f"image score {scores.image_scores[index]:.4g}"
    )


def _save_png(figure: Figure, path: Path) -> None:
    """Write the figure atomically; no "Software" tag, so the bytes do not depend on the
    matplotlib version. zlib level 1: at the default level PNG encoding took a third of the
    rendering time (measured: 0.28 -> 0.22 s per triplet); files are about 1.2x larger."""
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None}, pil_kwargs={"compress_level": 1})


def _draw_overlay(axes, image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray, scale: tuple[float, float]):
    """Image with the heatmap on top and the ground-truth outline in white; returns the heatmap artist."""
    axes.imshow(image)
    artist = axes.imshow(heatmap, cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, vmin=scale[0], vmax=scale[1])
    if mask.any():
        axes.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    return artist


def _inches(figure: Figure, left: float, bottom: float, width: float, height: float) -> tuple[float, ...]:
    """A rectangle given in inches from the figure's bottom-left corner, as figure fractions."""
    figure_width, figure_height = figure.get_size_inches()
    return left / figure_width, bottom / figure_height, width / figure_width, height / figure_height


def _image_axes(figure: Figure, left: float, bottom: float, width: float, height: float):
    """Axes without ticks for one image panel, placed in inches (see :func:`_inches`)."""
    axes = figure.add_axes(_inches(figure, left, bottom, width, height))
    axes.set_xticks([])
    axes.set_yticks([])
    return axes


# Triplet layout, inches: margin | image | gap | overlay | small gap | colourbar | room for its
# tick labels | mask | margin; a title band above the panels.
_MARGIN, _GAP, _COLOURBAR_GAP, _COLOURBAR_WIDTH, _COLOURBAR_LABELS, _TITLE_BAND = 0.1, 0.15, 0.08, 0.12, 0.55, 0.5


def render_triplet(
    path: str | Path,
    image: np.ndarray,
    heatmap: np.ndarray,
    mask: np.ndarray,
    scale: tuple[float, float],
    title: str,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """PNG with image | heatmap overlay (+ colourbar on the fixed ``scale``) | ground-truth mask.

    image: uint8 [H, W, 3]; heatmap: float [H, W] (from :meth:`CategoryScores.anomaly_map`); mask: bool [H, W].
    """
    path = Path(path)
    if image.shape[:2] != heatmap.shape or mask.shape != heatmap.shape:
        raise ValueError(f"{path}: image {image.shape[:2]}, heatmap {heatmap.shape} and mask {mask.shape} differ in size")
    height, width = heatmap.shape
    panel_width, panel_height = PANEL_INCHES, PANEL_INCHES * height / width
    lefts = [_MARGIN, _MARGIN + panel_width + _GAP]
    colourbar_left = lefts[1] + panel_width + _COLOURBAR_GAP
    lefts.append(colourbar_left + _COLOURBAR_WIDTH + _COLOURBAR_LABELS)
    figure = Figure(figsize=(lefts[2] + panel_width + _MARGIN, panel_height + _TITLE_BAND + _MARGIN), dpi=dpi)
    image_axes, overlay_axes, mask_axes = (_image_axes(figure, left, _MARGIN, panel_width, panel_height) for left in lefts)
    image_axes.imshow(image)
    image_axes.set_title("image", fontsize=8)
    artist = _draw_overlay(overlay_axes, image, heatmap, mask, scale)
    overlay_axes.set_title("anomaly map", fontsize=8)
    colourbar_axes = figure.add_axes(_inches(figure, colourbar_left, _MARGIN, _COLOURBAR_WIDTH, panel_height))
    colourbar = figure.colorbar(artist, cax=colourbar_axes)
    colourbar.ax.tick_params(labelsize=7)
    mask_axes.imshow(mask, cmap="gray", vmin=0, vmax=1)
    mask_axes.set_title("ground truth", fontsize=8)
    figure.suptitle(title, fontsize=8, y=1 - 0.08 / figure.get_figheight(), va="top")
    _save_png(figure, path)
    return path


def _load_example(data_root: Path, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image [H, W, 3], bool mask [H, W]), checked against the size the scores were made for."""
    image = np.asarray(load_rgb(data_root / sample.image_path))
    if image.shape[:2] != tuple(sample.original_size):
        raise ScoresError(
            f"{data_root / sample.image_path}: image is {image.shape[1]}x{image.shape[0]} but the scores were "
            f"computed for {sample.original_size[1]}x{sample.original_size[0]} (width x height); re-run `dvc repro`"
        )
    return image, sample_mask(data_root, sample)


def render_category_triplets(
    scores: CategoryScores,
    data_root: str | Path,
    out_dir: str | Path,
    settings: FigureSettings,
) -> list[Path]:
    """One triplet figure per selected test image of ``scores``' category, on the category's
    fixed colour scale (:func:`colour_scale`); returns the written paths in selection order."""
    data_root, out_dir = Path(data_root), Path(out_dir)
    scale = colour_scale(scores.patch_scores)
    calls = []
    for index in select_examples(scores.test_samples, settings.examples_per_defect, settings.good_examples):
        sample = scores.test_samples[index]
        image, mask = _load_example(data_root, sample)
        heatmap = scores.anomaly_map(index, sample.original_size)
        calls.append((out_dir / figure_name(sample), image, heatmap, mask, scale, figure_title(scores, index), settings.dpi))
    return render_in_parallel(render_triplet, calls)


def render_in_parallel(render: Callable[..., Path], calls: list[tuple], workers: int | None = None) -> list[Path]:
    """``[render(*arguments) for arguments in calls]``, spread over ``workers`` processes (default:
    one per CPU core this process may use, at most one per call).

    Figures are independent and matplotlib draws each on one core, so one after the other they
    leave the other cores idle. The workers are forked (Linux only), so they start with matplotlib
    already imported; elsewhere, or with one worker, the calls run here. The files are the same
    either way; the first error raised by a call is raised here."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if sys.platform == "linux" else 1
    workers = min(workers, len(calls))
    if workers <= 1 or sys.platform != "linux":
        return [render(*arguments) for arguments in calls]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as executor:
        return list(executor.map(render, *zip(*calls)))


def render_comparison(
    path: str | Path,
    rows: list[CategoryScores],
    data_root: str | Path,
    settings: FigureSettings,
) -> Path:
    """One category, every backbone x method: columns are the selected test images, the first
    two rows the images and their ground truth, then one row of heatmap overlays per entry of
    ``rows`` with its own colourbar. Each row keeps the fixed per-category scale of its triplet
    figures (:func:`colour_scale`): methods score on different units (cosine distance vs
    Mahalanobis distance), so one scale across rows would flatten all but one of them."""
    path, data_root = Path(path), Path(data_root)
    if not rows:
        raise ValueError(f"{path}: no score files to compare")
    reference = rows[0]
    reference_paths = [s.image_path for s in reference.test_samples]
    for row in rows[1:]:
        if row.category != reference.category or [s.image_path for s in row.test_samples] != reference_paths:
            raise ScoresError(
                f"{row.path} and {reference.path} list different test images; re-run the score stages (`dvc repro`)"
            )
    chosen = select_examples(reference.test_samples, settings.examples_per_defect, settings.good_examples)
    if not chosen:
        raise ValueError(f"{path}: no examples selected (examples_per_defect and good_examples are both 0)")
    examples = [_load_example(data_root, reference.test_samples[i]) for i in chosen]
    row_scales = [colour_scale(row.patch_scores) for row in rows]
    height, width = examples[0][0].shape[:2]
    cell_width, cell_height = COMPARE_PANEL_INCHES, COMPARE_PANEL_INCHES * height / width
    # Layout, inches: row labels | cells | colourbar (+ tick labels); a title band on top and a
    # band for the per-cell titles above every row.
    label_band, cell_gap, cell_title_band, title_band = 0.55, 0.06, 0.22, 0.5
    n_rows, n_columns = len(rows) + 2, len(chosen)
    colourbar_left = label_band + n_columns * (cell_width + cell_gap) + _COLOURBAR_GAP
    figure = Figure(
        figsize=(
            colourbar_left + _COLOURBAR_WIDTH + _COLOURBAR_LABELS,
            title_band + n_rows * (cell_height + cell_title_band) + _MARGIN,
        ),
        dpi=settings.dpi,
    )

    def row_bottom(row_number: int) -> float:
        return (n_rows - 1 - row_number) * (cell_height + cell_title_band) + _MARGIN

    def cell(row_number: int, column: int):
        return _image_axes(figure, label_band + column * (cell_width + cell_gap), row_bottom(row_number), cell_width, cell_height)

    for column, (index, (image, mask)) in enumerate(zip(chosen, examples)):
        sample = reference.test_samples[index]
        image_axes = cell(0, column)
        image_axes.imshow(image)
        image_axes.set_title(f"{sample.defect} {Path(sample.image_path).stem}", fontsize=7)
        mask_axes = cell(1, column)
        mask_axes.imshow(mask, cmap="gray", vmin=0, vmax=1)
        if column == 0:
            image_axes.set_ylabel("image", fontsize=7)
            mask_axes.set_ylabel("ground truth", fontsize=7)
        for row_number, (row, scale) in enumerate(zip(rows, row_scales), start=2):
            axes = cell(row_number, column)
            heatmap = row.anomaly_map(index, sample.original_size)
            artist = _draw_overlay(axes, image, heatmap, mask, scale)
            axes.set_title(f"score {row.image_scores[index]:.4g}", fontsize=6)
            if column == 0:
                axes.set_ylabel(row.label.replace(" (", "\n("), fontsize=7)
            if column == n_columns - 1:
                colourbar_axes = figure.add_axes(_inches(figure, colourbar_left, row_bottom(row_number), _COLOURBAR_WIDTH, cell_height))
                colourbar = figure.colorbar(artist, cax=colourbar_axes)
                colourbar.ax.tick_params(labelsize=6)
    figure.suptitle(
        f"{reference.category}: anomaly maps per backbone · method\n(colour scale per row: min–max patch "
        f"score over the category's test images; ground truth outlined in white)",
        fontsize=8, y=1 - 0.05 / figure.get_figheight(), va="top",
    )
    _save_png(figure, path)
    return path
