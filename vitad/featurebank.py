"""Feature banks: the extracted features of one (backbone, category), and the extraction loop.

A bank is one safetensors file (``featurebanks/<backbone>/<category>.safetensors``) holding

- ``train_embeddings`` [N_train, D] and ``test_embeddings`` [N_test, D], float32;
- ``train_patches`` [N_train, h, w, Dp] and ``test_patches`` [N_test, h, w, Dp], stored in
  ``extract.patch_dtype`` (float16 halves the files) and read back as float32;
- metadata: ``train_samples`` / ``test_samples`` (one :class:`vitad.core.data.Sample` per row, in
  row order) and ``info`` (backbone, category, its params entry, the weights switch and which
  weights produced the features, grid size, image size, patch dtype).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from vitad.core.cli import StageError
from vitad.core.data import ImageDataset, Sample, collate, split_samples
from vitad.core.io import create_arrays, load_arrays, open_arrays, save_arrays
from vitad.core.params import ParamsError, param, positive_int
from vitad.streams import map_in_streams

if TYPE_CHECKING:  # reading a bank needs neither torch nor the backbones (seconds to import)
    from vitad.backbones import FeatureExtractor

PATCH_DTYPES = {"float16": np.float16, "float32": np.float32}
ARRAY_NAMES = ("train_embeddings", "train_patches", "test_embeddings", "test_patches")
INFO_KEYS = ("backbone", "config", "weights_info", "grid_size", "image_size", "patch_dtype")


class FeatureBankError(StageError):
    """A feature bank file is malformed or inconsistent."""


@dataclass(frozen=True)
class ExtractSettings:
    """The ``extract`` section of params.yaml."""

    batch_size: int
    device: str  # auto | cpu | cuda
    patch_dtype: str  # float16 | float32
    seed: int


def extract_settings(params: dict) -> ExtractSettings:
    """Validate params.yaml's ``extract`` section; errors name the key."""
    return ExtractSettings(
        batch_size=positive_int(params, "extract.batch_size", 8),
        device=param(params, "extract.device", str, "auto", choices=("auto", "cpu", "cuda")),
        patch_dtype=param(params, "extract.patch_dtype", str, "float16", choices=tuple(PATCH_DTYPES)),
        seed=param(params, "extract.seed", int, 0),
    )


@dataclass(frozen=True)
class FeatureBank:
    """A bank as :func:`read_bank` returns it: float32 arrays, or memory maps in the stored dtype."""

    train_embeddings: np.ndarray  # [N_train, D] float32
    train_patches: np.ndarray  # [N_train, h, w, Dp] float32
    test_embeddings: np.ndarray  # [N_test, D] float32
    test_patches: np.ndarray  # [N_test, h, w, Dp] float32
    train_samples: list[Sample]
    test_samples: list[Sample]
    info: dict

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.info["grid_size"])


def _batch_features(
    extractor: FeatureExtractor,
    root: str | Path,
    samples: Sequence[Sample],
    batch_size: int,
    patch_dtype: np.dtype,
    num_workers: int | None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, embeddings [b, D] float32, patches [b, h, w, Dp] patch_dtype) of each batch
    of ``samples``, in order.

    On a GPU, DataLoader processes (``num_workers``, default one per core but one, at most 8)
    decode while the model runs. On CPU, ``num_workers`` streams (default the extractor's
    ``cpu_streams``, at most one per torch thread; 0 or 1: one, in the calling thread) split
    the torch threads between them (:func:`vitad.streams.map_in_streams`); a stream decodes
    and resizes its batch (PIL, which releases the GIL), normalises it and runs the model on it
    in one thread, so streams cost no process start-up and no copy of every image.
    """
    import torch

    dataset = ImageDataset(root, samples, extractor.image_size)

    if extractor.device.type == "cuda":
        workers = max(1, min(8, (os.cpu_count() or 1) - 1)) if num_workers is None else num_workers
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=True,
            prefetch_factor=2 if workers else None,
        )
        first = 0
        for images, _ in loader:
            yield first, *extractor.extract_arrays(images, patch_dtype)
            first += len(images)
        return

    def batch(first: int) -> tuple[int, np.ndarray, np.ndarray]:
        images, _ = collate([dataset[index] for index in range(first, min(first + batch_size, len(dataset)))])
        return first, *extractor.extract_arrays(images, patch_dtype)

    streams = extractor.cpu_streams if num_workers is None else num_workers
    yield from map_in_streams(batch, range(0, len(dataset), batch_size), streams)


def extract_split(
    extractor: FeatureExtractor,
    root: str | Path,
    samples: Sequence[Sample],
    batch_size: int,
    *,
    patch_dtype: str = "float32",
    num_workers: int | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``samples`` (images under ``root``), row i = samples[i].

    Returns ``(embeddings [N, D] float32, patches [N, h, w, Dp] patch_dtype)``;
    :func:`_batch_features` says how decoding and the forward pass share the machine
    (``num_workers``).
    """
    if patch_dtype not in PATCH_DTYPES:
        raise ParamsError(
            f"params.yaml: extract.patch_dtype must be one of {', '.join(PATCH_DTYPES)}, got {patch_dtype!r}"
        )
    if not samples:
        raise ValueError(f"no images to extract under {root}")
    embeddings = np.empty((len(samples), extractor.embedding_dim), dtype=np.float32)
    patches = np.empty((len(samples), *extractor.grid_size, extractor.patch_dim), dtype=PATCH_DTYPES[patch_dtype])
    for first, batch_embeddings, batch_patches in _progress(
        _batch_features(extractor, root, samples, batch_size, patches.dtype, num_workers), len(samples), progress, desc
    ):
        embeddings[first : first + len(batch_embeddings)] = batch_embeddings
        patches[first : first + len(batch_patches)] = batch_patches
    return embeddings, patches


def _progress(batches: Iterator[tuple[int, np.ndarray, np.ndarray]], total: int, progress: bool,
              desc: str | None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``batches``, counted on a progress bar of ``total`` images."""
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch[1]))


def extract_bank(
    path: str | Path,
    extractor: FeatureExtractor,
    root: str | Path,
    samples: Sequence[Sample],
    batch_size: int,
    info: dict,
    *,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> None:
    """Extract one category's index (train and test samples, one pass) into the bank file
    ``path``: the file :func:`extract_category` + :func:`write_bank` write, byte for byte, but
    each batch's features go to the file as they are computed (:func:`vitad.core.io.create_arrays`),
    so the stage holds a few batches of features instead of the whole bank (at full MVTec size and
    448 px, a ViT-B's bank is larger than its weights). Atomic, like :func:`write_bank`: an error
    (inf/NaN features included) leaves no file and any earlier bank at ``path`` untouched."""
    patch_dtype = _checked_info(path, info)
    train, test = split_samples(samples, "train"), split_samples(samples, "test")
    counts = {"train": len(train), "test": len(test)}
    shapes, dtypes = {}, {}
    for split, count in counts.items():
        shapes[f"{split}_embeddings"], dtypes[f"{split}_embeddings"] = (count, extractor.embedding_dim), np.float32
        shapes[f"{split}_patches"] = (count, *extractor.grid_size, extractor.patch_dim)
        dtypes[f"{split}_patches"] = patch_dtype
    batches = _batch_features(extractor, root, train + test, batch_size, patch_dtype, num_workers)
    with create_arrays(path, shapes, dtypes, _bank_metadata(info, train, test), check=_finite_check(path)) as writer:
        for first, embeddings, patches in _progress(batches, len(samples), progress, desc):
            # the batch's train rows, then its test rows (train samples come first)
            for split, start, stop, offset in (("train", first, min(first + len(embeddings), len(train)), 0),
                                               ("test", max(first, len(train)), first + len(embeddings), len(train))):
                if start < stop:
                    rows = slice(start - first, stop - first)
                    writer.write(f"{split}_embeddings", start - offset, embeddings[rows])
                    writer.write(f"{split}_patches", start - offset, patches[rows])


def extract_category(
    extractor: FeatureExtractor,
    root: str | Path,
    samples: Sequence[Sample],
    batch_size: int,
    *,
    patch_dtype: str = "float32",
    progress: bool = True,
    desc: str | None = None,
) -> dict:
    """Features of one category's index (train and test samples), as :func:`write_bank`'s
    keyword arguments (all but ``info``). One pass over train + test: one loader, full batches."""
    train, test = split_samples(samples, "train"), split_samples(samples, "test")
    embeddings, patches = extract_split(
        extractor, root, train + test, batch_size, patch_dtype=patch_dtype, progress=progress, desc=desc
    )
    return {
        "train_embeddings": embeddings[: len(train)],
        "train_patches": patches[: len(train)],
        "test_embeddings": embeddings[len(train):],
        "test_patches": patches[len(train):],
        "train_samples": train,
        "test_samples": test,
    }


def bank_info(
    backbone: str, category: str, config: dict, weights: str, extractor: FeatureExtractor, patch_dtype: str
) -> dict:
    """The ``info`` metadata of a bank: what produced it (JSON-serialisable)."""
    return {
        "backbone": backbone,
        "category": category,
        "config": config,
        "weights": weights,
        "weights_info": extractor.weights_info,
        "grid_size": list(extractor.grid_size),
        "image_size": extractor.image_size,
        "patch_dtype": patch_dtype,
    }


def _check_split(split: str, embeddings: np.ndarray, patches: np.ndarray, samples: Sequence[Sample]) -> None:
    if embeddings.ndim != 2 or patches.ndim != 4:
        raise ValueError(
            f"{split}: expected embeddings [N, D] and patches [N, h, w, Dp], "
            f"got {list(embeddings.shape)} and {list(patches.shape)}"
        )
    if not len(embeddings) == len(patches) == len(samples):
        raise ValueError(
            f"{split}: {len(embeddings)} embeddings, {len(patches)} patch grids and {len(samples)} samples differ"
        )


# float16 values per chunk of the finiteness test: 512 KB, so its temporaries stay in cache.
_FINITE_CHUNK = 1 << 18


def _all_finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:
        # inf/NaN are the magnitudes (sign bit cleared) >= 0x7C00, all exponent bits set. This
        # integer test over cache-sized chunks takes 4.5 ms on a 36 MB ResNet50 bank, where
        # np.isfinite takes 38 ms and the same test on the whole array 16 ms (2-core build machine).
        bits = np.ascontiguousarray(array).reshape(-1).view(np.uint16)
        return all(
            (bits[start : start + _FINITE_CHUNK] & np.uint16(0x7FFF)).max() < 0x7C00
            for start in range(0, bits.size, _FINITE_CHUNK)
        )
    return bool(np.isfinite(array).all())


def write_bank(
    path: str | Path,
    *,
    train_embeddings: np.ndarray,
    train_patches: np.ndarray,
    test_embeddings: np.ndarray,
    test_patches: np.ndarray,
    train_samples: Sequence[Sample],
    test_samples: Sequence[Sample],
    info: dict,
) -> None:
    """Write a bank atomically; patches are stored in ``info["patch_dtype"]``."""
    patch_dtype = _checked_info(path, info)
    _check_split("train", train_embeddings, train_patches, train_samples)
    _check_split("test", test_embeddings, test_patches, test_samples)
    if train_patches.shape[1:] != test_patches.shape[1:] or train_embeddings.shape[1] != test_embeddings.shape[1]:
        raise ValueError(
            f"{path}: train and test feature shapes differ ({train_patches.shape[1:]} vs {test_patches.shape[1:]})"
        )
    dtypes = {"train_embeddings": np.float32, "train_patches": patch_dtype, "test_embeddings": np.float32,
              "test_patches": patch_dtype}
    arrays = {"train_embeddings": train_embeddings, "train_patches": train_patches,
              "test_embeddings": test_embeddings, "test_patches": test_patches}
    # Converted to the stored dtypes and checked chunk by chunk while written: no second copy.
    save_arrays(path, arrays, _bank_metadata(info, train_samples, test_samples), dtypes=dtypes,
                check=_finite_check(path))


def _checked_info(path: str | Path, info: dict) -> np.dtype:
    """The stored patch dtype, after checking that ``info`` has every key a bank records."""
    missing = [key for key in INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"{path}: bank info lacks {', '.join(missing)}")
    if info["patch_dtype"] not in PATCH_DTYPES:
        raise ParamsError(
            f"params.yaml: extract.patch_dtype must be one of {', '.join(PATCH_DTYPES)}, got {info['patch_dtype']!r}"
        )
    return np.dtype(PATCH_DTYPES[info["patch_dtype"]])


def _bank_metadata(info: dict, train_samples: Sequence[Sample], test_samples: Sequence[Sample]) -> dict:
    return {
        "info": info,
        "train_samples": [sample.to_dict() for sample in train_samples],
        "test_samples": [sample.to_dict() for sample in test_samples],
    }


def _finite_check(path: str | Path) -> Callable[[str, np.ndarray], None]:
    """A chunk check for :func:`vitad.core.io.save_arrays` / ``create_arrays``: no inf/NaN stored."""

    def check_finite(name: str, stored_chunk: np.ndarray) -> None:
        if not _all_finite(stored_chunk):
            raise ValueError(
                f"{path}: {name} holds inf/NaN values as {stored_chunk.dtype}"
                + ("; set extract.patch_dtype: float32 (features exceed the float16 range)"
                   if stored_chunk.dtype == np.float16 else "")
            )

    return check_finite


def read_bank(path: str | Path, mmap: bool = False) -> FeatureBank:
    """Read a bank written by :func:`write_bank`; patch grids come back as float32, converted
    while read (no float16 copy in memory). ``mmap``: the arrays are read-only memory maps in
    their stored dtype instead (patches float16 by default), read only where used."""
    arrays, metadata = open_arrays(path) if mmap else load_arrays(path, dict.fromkeys(ARRAY_NAMES, np.float32))
    missing = [name for name in ARRAY_NAMES if name not in arrays] + [
        key for key in ("info", "train_samples", "test_samples") if key not in metadata
    ]
    if missing:
        raise FeatureBankError(
            f"{path}: not a vitad feature bank (lacks {', '.join(missing)}); re-run the extract stage (dvc repro)"
        )
    try:
        train_samples = [Sample.from_dict(record) for record in metadata["train_samples"]]
        test_samples = [Sample.from_dict(record) for record in metadata["test_samples"]]
    except TypeError as error:
        raise FeatureBankError(
            f"{path}: malformed sample metadata ({error}); re-run the extract stage (dvc repro)"
        ) from error
    bank = FeatureBank(
        train_embeddings=arrays["train_embeddings"],
        train_patches=arrays["train_patches"],
        test_embeddings=arrays["test_embeddings"],
        test_patches=arrays["test_patches"],
        train_samples=train_samples,
        test_samples=test_samples,
        info=metadata["info"],
    )
    try:
        _check_split("train", bank.train_embeddings, bank.train_patches, bank.train_samples)
        _check_split("test", bank.test_embeddings, bank.test_patches, bank.test_samples)
    except ValueError as error:
        raise FeatureBankError(f"{path}: {error}; re-run the extract stage (dvc repro)") from error
    return bank
