import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitad import synthetic
from vitad.core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    ImageDataset,
    collate,
    index_category,
    load_mask,
    load_rgb,
    normalize,
    resize_rgb,
    sample_mask,
)


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_is_mvtec(tiny_dataset):
    for category, spec in synthetic.CATEGORIES.items():
        root = tiny_dataset / category
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *spec.defects])
        assert len(spec.defects) >= 2
        for defect in spec.defects:
            for image in (root / "test" / defect).glob("*.png"):
                assert (root / "ground_truth" / defect / f"{image.stem}_mask.png").is_file()
        assert not (root / "ground_truth" / "good").exists()


def test_sizes_and_modes_differ_between_categories(tiny_dataset):
    sizes, modes = {}, {}
    for category in synthetic.CATEGORIES:
        with Image.open(next((tiny_dataset / category / "train" / "good").glob("*.png"))) as image:
            sizes[category], modes[category] = image.size, image.mode
    assert len(set(sizes.values())) == len(sizes)
    assert all(size[0] != 224 for size in sizes.values())
    assert modes["mesh"] == "L" and modes["weave"] == "RGB"


def test_generation_is_deterministic_and_per_category(tmp_path):
    synthetic.generate(tmp_path / "a", ["weave"], seed=0, train_images=2, test_good_images=1, test_images_per_defect=1)
    synthetic.generate(tmp_path / "b", ["mesh", "weave"], seed=0, train_images=2, test_good_images=1, test_images_per_defect=1)
    synthetic.generate(tmp_path / "c", ["weave"], seed=1, train_images=2, test_good_images=1, test_images_per_defect=1)
    assert _digest(tmp_path / "a" / "weave") == _digest(tmp_path / "b" / "weave")
    assert _digest(tmp_path / "a" / "weave") != _digest(tmp_path / "c" / "weave")


def test_defects_are_not_separable_by_mean_brightness(tmp_path):
    synthetic.generate(tmp_path, list(synthetic.CATEGORIES), seed=0, train_images=1, test_good_images=12, test_images_per_defect=6)
    from sklearn.metrics import roc_auc_score

    for category in synthetic.CATEGORIES:
        test = [s for s in index_category(tmp_path, category) if s.split == "test"]
        brightness = [np.asarray(load_rgb(tmp_path / s.image_path), dtype=np.float32).mean() for s in test]
        auroc = roc_auc_score([s.is_anomalous for s in test], brightness)
        assert 0.2 < auroc < 0.8, (category, auroc)
        areas = [sample_mask(tmp_path, s).mean() for s in test if s.is_anomalous]
        assert min(areas) < 0.005, (category, min(areas))  # some defects are small
        assert max(areas) > 0


def test_index_order_and_metadata(tiny_dataset):
    samples = index_category(tiny_dataset, "washer")
    splits = [s.split for s in samples]
    assert splits == sorted(splits, key=["train", "test"].index)
    assert all(s.original_size == (320, 320) for s in samples)
    assert all((s.mask_path is None) == (not s.is_anomalous) for s in samples)
    assert samples == index_category(tiny_dataset, "washer")


def test_grayscale_loads_as_rgb_and_batches_keep_metadata(tiny_dataset):
    samples = index_category(tiny_dataset, "mesh")[:3]
    assert load_rgb(tiny_dataset / samples[0].image_path).mode == "RGB"
    loader = torch.utils.data.DataLoader(ImageDataset(tiny_dataset, samples, 56), batch_size=2, collate_fn=collate)
    images, metadata = next(iter(loader))
    assert images.shape == (2, 3, 56, 56)
    assert metadata == samples[:2]


def test_images_are_resized_without_crop():
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 30, 200))  # black band on the left 10 %
    tensor = normalize(torch.from_numpy(resize_rgb(image, 100).copy())[None])[0]
    assert tensor.shape == (3, 100, 100)
    assert tensor[0, 50, 2] < 0 < tensor[0, 50, 50]  # the border band survives the resize


def test_normalize_is_the_imagenet_normalisation_of_each_batch_image():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)  # [B, H, W, 3]
    images = normalize(torch.from_numpy(pixels))
    assert images.shape == (2, 3, 5, 7) and images.dtype == torch.float32
    expected = (pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # float64 [B, H, W, 3]
    np.testing.assert_allclose(images.permute(0, 2, 3, 1).numpy(), expected, rtol=0, atol=1e-5)
    # an image normalised alone gets the values it gets in a batch, bit for bit
    assert torch.equal(normalize(torch.from_numpy(pixels[1:])), images[1:])


def test_bad_inputs_name_the_file(tiny_dataset, tmp_path):
    with pytest.raises(DatasetError, match="'wool' not found.*weave"):
        index_category(tiny_dataset, "wool")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="broken.png"):
        load_rgb(broken)
    mask = next((tiny_dataset / "weave" / "ground_truth").rglob("*.png"))
    with pytest.raises(DatasetError, match=f"{mask.name}.*differs"):
        load_mask(mask, (10, 10))


def test_missing_mask_and_undecodable_image_are_reported(tmp_path):
    synthetic.generate(tmp_path / "d", ["weave"], seed=0, train_images=1, test_good_images=1, test_images_per_defect=1)
    mask = tmp_path / "d" / "weave" / "ground_truth" / "hole" / "000_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError, match="000_mask.png"):
        index_category(tmp_path / "d", "weave")
    image = tmp_path / "d" / "weave" / "train" / "good" / "000.png"
    image.write_bytes(b"\x89PNG truncated")
    with pytest.raises(DatasetError, match="000.png"):
        index_category(tmp_path / "d", "weave")


def test_unknown_synthetic_category(tmp_path):
    with pytest.raises(ValueError, match="data.categories.*bottle"):
        synthetic.generate(tmp_path / "x", ["bottle"])
    assert not (tmp_path / "x").exists()
