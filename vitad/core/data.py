"""MVTec-AD-layout dataset index, image/mask loading and batch collation.

Layout (identical for the real MVTec AD, a local folder and the generated default)::

    <root>/<category>/train/good/<id>.png
    <root>/<category>/test/<defect>/<id>.png            defect == "good" for normal images
    <root>/<category>/ground_truth/<defect>/<id>_mask.png   (no masks for "good")

Every stage works from the same index (:func:`index_category`), so the order of samples, and
with it the rows of feature banks, scores and metrics, is the same everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitad.core.errors import InputError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(InputError):
    """The dataset on disk does not have the expected MVTec layout or content."""


@dataclass(frozen=True)
class Sample:
    """One image of the index. Paths are relative to the dataset root (machine independent)."""

    category: str
    split: str  # "train" | "test"
    defect: str  # "good" or the defect type
    image_path: str
    mask_path: str | None
    original_size: tuple[int, int]  # (height, width) of the image file

    @property
    def is_anomalous(self) -> bool:
        return self.defect != "good"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "Sample":
        return cls(**{**record, "original_size": tuple(record["original_size"])})


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) read from the file header; raises DatasetError naming the file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: cannot be decoded as an image ({error})") from error
    return height, width


def list_categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def index_category(root: str | Path, category: str) -> list[Sample]:
    """Index one category: train images first, then test images by defect type, sorted by name.

    Checks the layout: the category exists, has good training images and test images, and every
    defective test image has a mask file (sizes are checked when masks are loaded).
    """
    root = Path(root)
    category_dir = root / category
    if not category_dir.is_dir():
        available = ", ".join(list_categories(root)) or "none"
        raise DatasetError(
            f"category {category!r} not found under {root} (available: {available}); "
            "check data.categories in params.yaml"
        )
    train_dir = category_dir / "train" / "good"
    test_dir = category_dir / "test"
    if not train_dir.is_dir() or not _image_files(train_dir):
        raise DatasetError(f"{train_dir}: no training images (expected <category>/train/good/*.png)")
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: missing (expected <category>/test/<defect>/*.png)")

    samples = [
        Sample(category, "train", "good", path.relative_to(root).as_posix(), None, image_size(path))
        for path in _image_files(train_dir)
    ]
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for path in _image_files(defect_dir):
            mask_rel = None
            if defect != "good":
                mask = category_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise DatasetError(f"{mask}: missing ground-truth mask for {path}")
                mask_rel = mask.relative_to(root).as_posix()
            samples.append(
                Sample(category, "test", defect, path.relative_to(root).as_posix(), mask_rel, image_size(path))
            )
    if not any(s.split == "test" for s in samples):
        raise DatasetError(f"{test_dir}: no test images")
    return samples


def split_samples(samples: Iterable[Sample], split: str) -> list[Sample]:
    return [s for s in samples if s.split == split]


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image and convert grayscale, palette or RGBA to RGB; errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: cannot be decoded as an image ({error})") from error


def load_mask(path: str | Path, expected_size: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool [H, W]; must match the image's (height, width)."""
    try:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 0
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: cannot be decoded as a mask ({error})") from error
    if mask.shape != tuple(expected_size):
        raise DatasetError(
            f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
            f"{expected_size[1]}x{expected_size[0]} (width x height)"
        )
    return mask


def sample_mask(root: str | Path, sample: Sample) -> np.ndarray:
    """bool [H, W] ground truth of a test sample; all False for good images."""
    if sample.mask_path is None:
        return np.zeros(sample.original_size, dtype=bool)
    return load_mask(Path(root) / sample.mask_path, sample.original_size)


# (x / 255 - mean) / std as one multiply-add: x * 1 / (255 std) - mean / std, in float32.
PIXEL_SCALE = np.array([1.0 / (255.0 * s) for s in IMAGENET_STD], dtype=np.float32)
PIXEL_OFFSET = np.array([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dtype=np.float32)


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 [size, size, 3], resized (bilinear) WITHOUT centre crop: defects
    sit at borders too."""
    return np.asarray(image.resize((size, size), Image.BILINEAR))


def normalize(pixels: "torch.Tensor") -> "torch.Tensor":
    """uint8 RGB [B, S, S, 3] -> float32 [B, 3, S, S]: scaled to [0, 1] and normalised with the
    ImageNet mean and std, ((x / 255) - mean) / std computed as x * PIXEL_SCALE - PIXEL_OFFSET.

    Once per batch rather than per image: the uint8 -> float copy transposes to channels-first,
    and the multiply-add then runs over contiguous memory, in the thread (and OpenMP team) that
    runs the model on the batch."""
    import torch

    batch, height, width, _ = pixels.shape
    images = torch.empty(batch, 3, height, width)
    images.copy_(pixels.permute(0, 3, 1, 2))  # [B, S, S, 3] -> [B, 3, S, S], to float32
    images.mul_(torch.from_numpy(PIXEL_SCALE)[:, None, None]).sub_(torch.from_numpy(PIXEL_OFFSET)[:, None, None])
    return images


class ImageDataset:
    """Samples -> (uint8 RGB [S, S, 3], Sample): a map-style dataset for a torch DataLoader with
    :func:`collate`, which normalises each batch."""

    def __init__(self, root: str | Path, samples: Sequence[Sample], size: int):
        self.root = Path(root)
        self.samples = list(samples)
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, Sample]:
        sample = self.samples[index]
        return resize_rgb(load_rgb(self.root / sample.image_path), self.size), sample


def collate(batch: Sequence[tuple[np.ndarray, Sample]]) -> tuple["torch.Tensor", list[Sample]]:
    """Stack :class:`ImageDataset` items into normalised images [B, 3, S, S] (:func:`normalize`)
    and keep each image's Sample (metadata) in order."""
    import torch

    images, samples = zip(*batch)
    return normalize(torch.from_numpy(np.stack(images))), list(samples)
