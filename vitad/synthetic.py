"""The embedded default dataset: generated, deterministic, in exact MVTec AD layout.

Three categories cover what the real benchmark mixes:

- ``weave``  — a texture (RGB woven fabric, 256 x 256 px);
- ``washer`` — an object (RGB metal ring on a dark belt, 320 x 320 px, jittered in place);
- ``mesh``   — a texture stored single-channel (grayscale wire grid, 288 x 288 px, like MVTec's
  grid/screw/zipper).

Every category has three defect types, at least one of them small (a few hundred pixels), and
defects are drawn both brighter and darker than their surroundings while each image gets its own
brightness/contrast jitter, so mean brightness alone does not separate good from defective.
Images of a category depend only on (seed, category name, image id): adding a category leaves
the others' files byte-identical, which keeps DVC from re-running their stages. The pixels are
the same on every CPU: all float math goes through :mod:`vitad.portable_math` (only exactly
rounded IEEE operations), never numpy's or libm's CPU-dispatched sin/exp/atan2 or the normal
sampler, so the dataset's hash in ``dvc.lock`` holds on any machine.
"""

from __future__ import annotations

import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vitad import portable_math as pm
from vitad.core.io import remove_stale_temporaries
from vitad.core.params import ParamsError

Canvas = np.ndarray  # float32 [H, W, C] in [0, 1]


@dataclass(frozen=True)
class CategorySpec:
    size: int
    grayscale: bool
    render: Callable[[np.random.Generator, int], Canvas]
    defects: dict[str, Callable[[np.random.Generator, Canvas], np.ndarray]]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    return rows, cols


def _segment_mask(size: int, start, end, width: float) -> np.ndarray:
    """bool [size, size]: pixels within width/2 of the segment start -> end ((row, col) points)."""
    rows, cols = _grid(size)
    (r0, c0), (r1, c1) = start, end
    dr, dc = r1 - r0, c1 - c0
    t = np.clip(((rows - r0) * dr + (cols - c0) * dc) / max(dr * dr + dc * dc, 1e-6), 0, 1)
    return pm.hypot(rows - (r0 + t * dr), cols - (c0 + t * dc)) <= width / 2


def _blob_mask(rng: np.random.Generator, size: int, center, radius: float) -> np.ndarray:
    """bool [size, size]: an irregular blob (radius modulated by a few random harmonics)."""
    rows, cols = _grid(size)
    dy, dx = rows - center[0], cols - center[1]
    wobble = sum(rng.uniform(0.05, 0.25) * pm.angular_harmonic(dx, dy, k, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return pm.hypot(dx, dy) <= radius * (1 + wobble)


def _random_point(rng: np.random.Generator, size: int, margin: int) -> tuple[float, float]:
    return float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))


def _signed_shift(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high) * rng.choice([-1.0, 1.0]))


# --- weave: RGB texture -------------------------------------------------------------------------

def _render_weave(rng: np.random.Generator, size: int) -> Canvas:
    rows, cols = _grid(size)
    period = 12.0
    phase_r, phase_c = rng.uniform(0, period, 2)
    warp = pm.sin(2 * np.pi * (cols + phase_c) / period)
    weft = pm.sin(2 * np.pi * (rows + phase_r) / period)
    warp, weft = warp * warp, weft * weft
    over = (np.floor((rows + phase_r) / period) + np.floor((cols + phase_c) / period)) % 2
    pattern = np.where(over > 0, warp, weft) * 0.5 + 0.25  # [H, W]
    base_colour = np.array([0.55, 0.42, 0.30], dtype=np.float32)
    canvas = pattern[..., None] * base_colour * 1.4 + pm.normal_noise(rng, 0.03, (size, size, 1))
    return canvas.astype(np.float32)


def _weave_thread(rng, canvas):
    size = canvas.shape[0]
    start = _random_point(rng, size, 20)
    angle, length = rng.uniform(0, np.pi), rng.uniform(40, 110)
    end = (start[0] + length * float(pm.sin(angle)), start[1] + length * float(pm.cos(angle)))
    mask = _segment_mask(size, start, end, rng.uniform(2, 4))
    canvas[mask] = np.array([0.15, 0.30, 0.60]) + _signed_shift(rng, 0.0, 0.2)
    return mask


def _weave_hole(rng, canvas):
    size = canvas.shape[0]
    mask = _blob_mask(rng, size, _random_point(rng, size, 20), rng.uniform(4, 9))
    canvas[mask] = 0.5 + _signed_shift(rng, 0.35, 0.45)
    return mask


def _weave_stain(rng, canvas):
    size = canvas.shape[0]
    mask = _blob_mask(rng, size, _random_point(rng, size, 30), rng.uniform(12, 22))
    canvas[mask] = canvas[mask] * np.array([0.7, 1.15, 0.8]) + _signed_shift(rng, 0.05, 0.12)
    return mask


# --- washer: RGB object -------------------------------------------------------------------------

def _washer_geometry(size: int, rng: np.random.Generator):
    center = (size / 2 + rng.uniform(-8, 8), size / 2 + rng.uniform(-8, 8))
    return center, size * 0.36, size * 0.16  # centre, outer radius, inner radius


def _render_washer(rng: np.random.Generator, size: int) -> Canvas:
    rows, cols = _grid(size)
    center, outer, inner = _washer_geometry(size, rng)
    dy, dx = rows - center[0], cols - center[1]
    radius = pm.hypot(dx, dy)
    ring = (radius <= outer) & (radius >= inner)
    shading = 0.55 + 0.25 * pm.angular_harmonic(dx, dy, 1, -rng.uniform(0, 2 * np.pi))
    belt = 0.12 + 0.03 * pm.sin(cols / 3.0)
    grey = np.where(ring, shading, belt)
    canvas = np.repeat(grey[..., None], 3, axis=2) * np.array([1.0, 1.0, 1.05])
    return (canvas + pm.normal_noise(rng, 0.015, canvas.shape)).astype(np.float32)


def _on_ring(rng, size):
    center, outer, inner = _washer_geometry(size, np.random.default_rng(0))
    angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(inner + 8, outer - 8)
    return (center[0] + radius * float(pm.sin(angle)), center[1] + radius * float(pm.cos(angle))), angle


def _washer_scratch(rng, canvas):
    size = canvas.shape[0]
    start, angle = _on_ring(rng, size)
    tangent = angle + np.pi / 2 + rng.uniform(-0.4, 0.4)
    length = rng.uniform(25, 55)
    end = (start[0] + length * float(pm.sin(tangent)), start[1] + length * float(pm.cos(tangent)))
    mask = _segment_mask(size, start, end, 2.0)
    canvas[mask] = 0.5 + _signed_shift(rng, 0.3, 0.45)
    return mask


def _washer_crack(rng, canvas):
    size = canvas.shape[0]
    center, outer, inner = _washer_geometry(size, np.random.default_rng(0))
    angle = rng.uniform(0, 2 * np.pi)
    direction = (float(pm.sin(angle)), float(pm.cos(angle)))
    start = (center[0] + inner * direction[0], center[1] + inner * direction[1])
    end = (center[0] + outer * direction[0], center[1] + outer * direction[1])
    mask = _segment_mask(size, start, end, rng.uniform(4, 7))
    canvas[mask] = 0.12
    return mask


def _washer_spot(rng, canvas):
    size = canvas.shape[0]
    point, _ = _on_ring(rng, size)
    mask = _blob_mask(rng, size, point, rng.uniform(4, 8))
    canvas[mask] = np.array([0.75, 0.35, 0.15]) + _signed_shift(rng, 0.0, 0.15)
    return mask


# --- mesh: single-channel texture ---------------------------------------------------------------

def _render_mesh(rng: np.random.Generator, size: int) -> Canvas:
    rows, cols = _grid(size)
    period = 18.0
    phase_r, phase_c = rng.uniform(0, period, 2)
    dist_r = np.abs(((rows + phase_r) % period) - period / 2)
    dist_c = np.abs(((cols + phase_c) % period) - period / 2)
    wire = np.maximum(pm.exp(-(dist_r * dist_r) / 2.0), pm.exp(-(dist_c * dist_c) / 2.0))
    grey = 0.25 + 0.5 * wire + pm.normal_noise(rng, 0.03, (size, size))
    return grey[..., None].astype(np.float32)


def _mesh_broken(rng, canvas):
    size = canvas.shape[0]
    mask = _blob_mask(rng, size, _random_point(rng, size, 20), rng.uniform(5, 8))
    canvas[mask] = 0.25
    return mask


def _mesh_bent(rng, canvas):
    """Wires pushed sideways by a smooth local displacement; the mask is where it exceeds 1 px."""
    size = canvas.shape[0]
    rows, cols = _grid(size)
    center = _random_point(rng, size, 40)
    spread, peak_shift = rng.uniform(8, 14), rng.uniform(5, 8)
    dy, dx = rows - center[0], cols - center[1]
    displacement = peak_shift * pm.exp(-(dy * dy + dx * dx) / (2 * spread * spread))
    source_rows = np.clip(np.rint(rows + displacement), 0, size - 1).astype(int)
    source_cols = np.clip(np.rint(cols + displacement), 0, size - 1).astype(int)
    canvas[:] = canvas[source_rows, source_cols]
    return displacement > 1.0


def _mesh_contamination(rng, canvas):
    size = canvas.shape[0]
    mask = _blob_mask(rng, size, _random_point(rng, size, 20), rng.uniform(3, 6))
    canvas[mask] = 0.5 + _signed_shift(rng, 0.4, 0.5)
    return mask


CATEGORIES: dict[str, CategorySpec] = {
    "weave": CategorySpec(256, False, _render_weave, {"thread": _weave_thread, "hole": _weave_hole, "stain": _weave_stain}),
    "washer": CategorySpec(320, False, _render_washer, {"scratch": _washer_scratch, "crack": _washer_crack, "spot": _washer_spot}),
    "mesh": CategorySpec(288, True, _render_mesh, {"broken": _mesh_broken, "bent": _mesh_bent, "contamination": _mesh_contamination}),
}


def _rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    """Independent stream per image: depends on nothing but these keys (stable across runs)."""
    key = zlib.crc32(f"{category}/{split}/{defect}".encode())
    return np.random.default_rng([seed, key, index])


def _to_image(canvas: Canvas, rng: np.random.Generator, grayscale: bool) -> Image.Image:
    """Per-image brightness/contrast jitter, then 8-bit RGB or single-channel L."""
    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-0.06, 0.06)
    pixels = np.clip((canvas - 0.5) * gain + 0.5 + offset, 0, 1)
    pixels = np.rint(pixels * 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0], mode="L") if grayscale else Image.fromarray(pixels, mode="RGB")


def _render(spec: CategorySpec, rng: np.random.Generator, defect: str | None, size: int):
    """(image, bool mask [H, W] or None for a good image), ``size`` x ``size`` px."""
    canvas = spec.render(rng, size)  # [H, W, 3] or [H, W, 1] for grayscale categories
    mask = spec.defects[defect](rng, canvas) if defect is not None else None
    return _to_image(np.clip(canvas, 0, 1), rng, spec.grayscale), mask


def generate_category(
    dest: Path,
    category: str,
    seed: int,
    train_images: int,
    test_good_images: int,
    test_images_per_defect: int,
    image_size: int | None = None,
) -> None:
    """Write one category in MVTec layout under dest/<category>; ``image_size`` replaces the
    category's own size (MVTec AD's images are up to 1024 px; defect sizes stay in pixels)."""
    if category not in CATEGORIES:
        raise ParamsError(
            f"params.yaml: data.categories: {category!r} is not a synthetic category (available: {', '.join(CATEGORIES)}); "
            "set data.source to mvtec or folder for real categories"
        )
    spec = CATEGORIES[category]
    size = spec.size if image_size is None else image_size
    root = dest / category
    jobs = [("train", "good", i) for i in range(train_images)]
    jobs += [("test", "good", i) for i in range(test_good_images)]
    jobs += [("test", defect, i) for defect in spec.defects for i in range(test_images_per_defect)]
    for split, defect, index in jobs:
        rng = _rng(seed, category, split, defect, index)
        image, mask = _render(spec, rng, None if defect == "good" else defect, size)
        folder = root / split / defect
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:03d}.png")
        if mask is not None:
            mask_folder = root / "ground_truth" / defect
            mask_folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_folder / f"{index:03d}_mask.png")


def generate(
    dest: str | Path,
    categories: list[str],
    seed: int = 0,
    train_images: int = 16,
    test_good_images: int = 6,
    test_images_per_defect: int = 4,
    image_size: int | None = None,
) -> None:
    """Generate the default dataset into ``dest`` (replaced atomically: built in a temporary
    sibling directory and renamed, so a failure leaves no partial dataset); ``image_size``: see
    :func:`generate_category`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        for category in categories:
            generate_category(staging, category, seed, train_images, test_good_images, test_images_per_defect, image_size)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
