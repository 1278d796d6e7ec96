"""Array files: the streaming safetensors writer, chunked and memory-mapped reads, bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import save_file

from vitad.core import io
from vitad.core.io import ArrayFileError, create_arrays, load_arrays, open_arrays, save_arrays


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "patches": rng.standard_normal((5, 2, 3, 4)).astype(np.float16),
        "embeddings": rng.standard_normal((5, 6), dtype=np.float32),
        "indices": np.arange(4),
        "empty": np.zeros((2, 0), dtype=np.float32),
        "flags": np.array([True, False]),
        "doubles": rng.standard_normal(3),
        "scalar": np.array(2.5, dtype=np.float32),
        "bytes": np.arange(3, dtype=np.uint8),
    }


def test_writer_is_byte_identical_to_safetensors(tmp_path):
    arrays, metadata = _arrays(), {"info": {"name": "héllo\n\"quoted\""}, "n": 3}
    save_file(arrays, str(tmp_path / "reference.safetensors"), metadata={"json": json.dumps(metadata, sort_keys=True)})
    save_arrays(tmp_path / "ours.safetensors", arrays, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_round_trips_chunked_converted_and_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_IO_CHUNK_BYTES", 16)  # many chunks per array
    arrays = _arrays()
    path = tmp_path / "a.safetensors"
    save_arrays(path, arrays, {"k": 1}, dtypes={"embeddings": np.float16})
    loaded, metadata = load_arrays(path, {"patches": np.float32})
    assert metadata == {"k": 1} and loaded["patches"].dtype == np.float32 and loaded["embeddings"].dtype == np.float16
    np.testing.assert_array_equal(loaded["patches"], arrays["patches"].astype(np.float32))
    np.testing.assert_array_equal(loaded["embeddings"], arrays["embeddings"].astype(np.float16))
    for name in ("indices", "empty", "flags", "doubles", "scalar", "bytes"):
        np.testing.assert_array_equal(loaded[name], arrays[name])
        assert loaded[name].dtype == arrays[name].dtype
    mapped, _ = open_arrays(path)
    assert isinstance(mapped["patches"], np.memmap) and not mapped["patches"].flags.writeable
    np.testing.assert_array_equal(mapped["patches"], arrays["patches"])


def test_writing_and_reading_never_copy_a_whole_array(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_IO_CHUNK_BYTES", 1 << 16)
    patches = np.random.default_rng(1).standard_normal((64, 64, 64), dtype=np.float32)  # 1 MiB, 16 chunks
    path = tmp_path / "big.safetensors"
    tracemalloc.start()
    try:
        save_arrays(path, {"patches": patches}, dtypes={"patches": np.float16})
        _, written_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loaded, _ = load_arrays(path, {"patches": np.float32})
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written_peak < patches.nbytes / 8  # a float16 copy would be half of it
    assert read_peak < patches.nbytes * 1.2  # the float32 result plus a chunk, no float16 copy
    np.testing.assert_array_equal(loaded["patches"], patches.astype(np.float16).astype(np.float32))


def test_a_failing_check_leaves_no_file(tmp_path):
    def refuse(name, chunk):
        raise ValueError(f"{name} refused")

    with pytest.raises(ValueError, match="patches refused"):
        save_arrays(tmp_path / "a.safetensors", {"patches": np.ones(3, np.float32)}, check=refuse)
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_arrays(path, {"patches": np.ones(1000, np.float32)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArrayFileError, match="a.safetensors"):
        load_arrays(path)
    with pytest.raises(ArrayFileError, match="a.safetensors"):
        open_arrays(path)


def test_create_arrays_writes_save_arrays_bytes_row_range_by_row_range_or_nothing(tmp_path):
    rng = np.random.default_rng(7)
    arrays = {"patches": rng.standard_normal((7, 3, 5), dtype=np.float32), "scores": rng.standard_normal((4, 6))}
    dtypes = {"patches": np.float16, "scores": np.float32}
    shapes = {name: array.shape for name, array in arrays.items()}
    save_arrays(tmp_path / "saved.safetensors", arrays, {"run": 1}, dtypes=dtypes)
    with create_arrays(tmp_path / "created.safetensors", shapes, dtypes, {"run": 1}) as writer:
        writer.write("patches", 3, arrays["patches"][3:])  # any order; converted to float16 on the way
        writer.write("patches", 0, arrays["patches"][:3])
        writer.write("scores", 0, arrays["scores"])
    assert (tmp_path / "created.safetensors").read_bytes() == (tmp_path / "saved.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"rows not written exactly once: \{'patches': 4, 'scores': 4\}"):
        with create_arrays(tmp_path / "partial.safetensors", shapes, dtypes) as writer:
            writer.write("patches", 0, arrays["patches"][:3])
    with pytest.raises(ValueError, match="do not fit array 'scores'"):
        with create_arrays(tmp_path / "partial.safetensors", shapes, dtypes) as writer:
            writer.write("scores", 2, arrays["scores"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["created.safetensors", "saved.safetensors"]
