"""Atomic, deterministic file output shared by every stage.

Every file a stage writes goes to a temporary name in the same directory and is renamed into
place, so an interrupted or failing stage never leaves a half-written output behind.  Arrays are
stored with safetensors: its byte layout depends only on the arrays and the metadata (no
timestamps, unlike ``np.savez``), so identical inputs give identical files and DVC's run-cache
and ``dvc metrics diff`` stay meaningful. Arrays are written and read in chunks (or
memory-mapped), so a multi-GB feature bank never needs a second copy in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from vitad.core.errors import InputError


_UMASK = os.umask(0)
os.umask(_UMASK)


def temporary_name_pattern(name: str) -> str:
    """Glob of the temporary files :func:`atomic_path` writes for ``name``; ``.*.tmp`` in
    ``.dvcignore`` keeps them out of every hash DVC computes."""
    return f".{name}.*.tmp"


def remove_stale_temporaries(target: Path) -> None:
    """Delete what an earlier writer of ``target`` killed mid-write (SIGKILL, power loss) left.
    Only one stage writes a given output at a time (DVC holds its lock)."""
    for stale in target.parent.glob(temporary_name_pattern(target.name)):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


class ArrayFileError(InputError):
    """An array file exists but cannot be read (truncated, not safetensors, bad metadata)."""


def reset_directory(directory: str | os.PathLike) -> Path:
    """Create ``directory`` or empty it: a stage's output directory must not keep files of an
    earlier run (a category or figure that is no longer produced)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return directory


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# safetensors dtype names, and the rank by which safetensors orders tensors in the file (largest
# first, then by name): the writer below lays files out exactly as ``safetensors.numpy.save_file``.
_SAFETENSORS_DTYPES = {
    np.dtype(np.uint64): ("U64", 0), np.dtype(np.int64): ("I64", 1), np.dtype(np.float64): ("F64", 2),
    np.dtype(np.float32): ("F32", 3), np.dtype(np.uint32): ("U32", 4), np.dtype(np.int32): ("I32", 5),
    np.dtype(np.float16): ("F16", 6), np.dtype(np.uint16): ("U16", 7), np.dtype(np.int16): ("I16", 8),
    np.dtype(np.int8): ("I8", 9), np.dtype(np.uint8): ("U8", 10), np.dtype(np.bool_): ("BOOL", 11),
}
_NUMPY_DTYPES = {name: dtype for dtype, (name, _) in _SAFETENSORS_DTYPES.items()}
# Bytes converted and written per chunk: writing or reading an array never holds a second copy.
_IO_CHUNK_BYTES = 32 * 2**20

ChunkCheck = Callable[[str, np.ndarray], None]


def _row_chunks(array: np.ndarray, itemsize: int) -> Iterator[slice]:
    rows = len(array) if array.ndim else 1
    row_bytes = max(1, array.size // max(rows, 1) * itemsize)
    step = max(1, _IO_CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _layout(
    path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype], metadata: dict | None
) -> tuple[bytes, list[str], dict[str, int]]:
    """(encoded header, array names in file order, byte offset of each array from the start of
    the data) of a safetensors file holding arrays of these shapes and dtypes."""
    for name, dtype in dtypes.items():
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: array {name!r} has dtype {dtype}, which safetensors does not store here")
    order = sorted(shapes, key=lambda name: (_SAFETENSORS_DTYPES[dtypes[name]][1], name))
    header: dict[str, Any] = {"__metadata__": {"json": json.dumps(metadata or {}, sort_keys=True)}}
    offsets, offset = {}, 0
    for name in order:
        size = int(np.prod(shapes[name], dtype=np.int64)) * dtypes[name].itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtypes[name]][0],
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + size],
        }
        offsets[name] = offset
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return encoded, order, offsets


def save_arrays(
    path: str | os.PathLike,
    arrays: dict[str, np.ndarray],
    metadata: dict | None = None,
    dtypes: dict[str, np.dtype] | None = None,
    check: ChunkCheck | None = None,
) -> None:
    """Save named arrays plus JSON-serialisable metadata atomically, as a safetensors file
    (byte-identical to ``safetensors.numpy.save_file``).

    Arrays are written straight from their memory, chunk by chunk: saving never copies a whole
    array (``save_file`` first turns every array into a bytes object). ``dtypes[name]`` stores
    that array in another dtype, converted chunk by chunk; ``check(name, chunk)`` sees every
    stored chunk and may raise, leaving no file behind.
    """
    dtypes = {name: np.dtype(dtypes[name]) if dtypes and name in dtypes else np.asarray(array).dtype
              for name, array in arrays.items()}
    shapes = {name: np.shape(array) for name, array in arrays.items()}
    encoded, order, _ = _layout(path, shapes, dtypes, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in order:
            array, dtype = np.asarray(arrays[name]), dtypes[name]
            for rows in _row_chunks(array, max(array.dtype.itemsize, dtype.itemsize)):
                with np.errstate(over="ignore"):  # overflow to inf is the check's to report
                    chunk = np.ascontiguousarray(array[rows] if array.ndim else array, dtype=dtype)
                if check is not None:
                    check(name, chunk)
                handle.write(memoryview(chunk.reshape(-1)).cast("B"))


class ArrayWriter:
    """The arrays of a file :func:`create_arrays` is writing, filled a range of rows at a time."""

    def __init__(self, path: Path, fd: int, data_start: int, offsets: dict[str, int],
                 shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype], check: ChunkCheck | None):
        self.path, self._fd, self._data_start = path, fd, data_start
        self._offsets, self._shapes, self._dtypes, self._check = offsets, shapes, dtypes, check
        self._rows_written = dict.fromkeys(shapes, 0)

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        """Rows ``start : start + len(values)`` of array ``name`` <- ``values`` (converted to the
        stored dtype), shown to the check, then written to their place in the file (through the
        page cache, like any write: nothing of them stays in this process)."""
        shape, dtype = self._shapes[name], self._dtypes[name]
        if values.shape[1:] != tuple(shape[1:]) or not 0 <= start <= start + len(values) <= shape[0]:
            raise ValueError(f"{self.path}: rows {start}:{start + len(values)} of shape {values.shape[1:]} do not fit "
                             f"array {name!r} {list(shape)}")
        with np.errstate(over="ignore"):  # overflow to inf is the check's to report
            stored = np.ascontiguousarray(values, dtype=dtype)  # no copy when already stored dtype, contiguous
        if self._check is not None and len(values):
            self._check(name, stored)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        data = memoryview(stored.reshape(-1)).cast("B")
        position = self._data_start + self._offsets[name] + start * row_bytes
        while data:  # pwrite may write less than asked
            written = os.pwrite(self._fd, data, position)
            data, position = data[written:], position + written
        self._rows_written[name] += len(values)

    def missing_rows(self) -> dict[str, int]:
        """Arrays with rows not yet written, and how many (rows written twice count twice)."""
        return {name: self._shapes[name][0] - written for name, written in self._rows_written.items()
                if written != self._shapes[name][0]}


@contextlib.contextmanager
def create_arrays(
    path: str | os.PathLike,
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, np.dtype],
    metadata: dict | None = None,
    check: ChunkCheck | None = None,
) -> Iterator[ArrayWriter]:
    """Create the safetensors file :func:`save_arrays` would write for arrays of these shapes and
    dtypes (byte-identical), its rows written as they are computed (:meth:`ArrayWriter.write`)
    instead of from arrays held whole in memory. Atomic: the file appears at ``path`` only if
    the block succeeds and wrote every row exactly once; otherwise no file is left."""
    path = Path(path)
    dtypes = {name: np.dtype(dtypes[name]) for name in shapes}
    shapes = {name: tuple(int(size) for size in shape) for name, shape in shapes.items()}
    if any(len(shape) == 0 for shape in shapes.values()):
        raise ValueError(f"{path}: create_arrays writes arrays by rows; use save_arrays for scalars")
    encoded, _, offsets = _layout(path, shapes, dtypes, metadata)
    data_start = 8 + len(encoded)
    size = data_start + sum(int(np.prod(shape, dtype=np.int64)) * dtypes[name].itemsize for name, shape in shapes.items())
    with atomic_path(path) as tmp, open(tmp, "r+b") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        handle.truncate(size)
        handle.flush()
        writer = ArrayWriter(path, handle.fileno(), data_start, offsets, shapes, dtypes, check)
        yield writer
        missing = writer.missing_rows()
        if missing:
            raise ValueError(f"{path}: rows not written exactly once: {missing}")


def _unreadable(path: Path, error: Exception) -> ArrayFileError:
    return ArrayFileError(f"{path}: unreadable ({error}); delete it and re-run the stage that writes it")


def _read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries by name, metadata, byte offset of the data) of a safetensors file; the
    file is validated by safetensors itself first (offsets, sizes, dtypes)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (did the stage that writes it run? try `dvc repro`)")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = json.loads((handle.metadata() or {}).get("json", "{}"))
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size))
    except (SafetensorError, OSError, ValueError, struct.error) as error:
        raise _unreadable(path, error) from error
    header.pop("__metadata__", None)
    unknown = sorted({entry["dtype"] for entry in header.values()} - set(_NUMPY_DTYPES))
    if unknown:
        raise _unreadable(path, ValueError(f"unsupported dtype {unknown[0]}"))
    return header, metadata, 8 + header_size


def load_metadata(path: str | os.PathLike) -> dict:
    """The metadata :func:`save_arrays` wrote, without reading the arrays (only the file header)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return json.loads((handle.metadata() or {}).get("json", "{}"))
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from error


def open_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """What :func:`save_arrays` wrote as read-only memory maps in their stored dtype, plus the
    metadata: nothing is read until used, so a bank larger than memory can be streamed."""
    path = Path(path)
    header, metadata, data_start = _read_header(path)
    arrays = {}
    for name, entry in header.items():
        begin, _ = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if int(np.prod(shape)) == 0:
            arrays[name] = np.empty(shape, dtype=_NUMPY_DTYPES[entry["dtype"]])
            continue
        arrays[name] = np.memmap(path, dtype=_NUMPY_DTYPES[entry["dtype"]], mode="r", offset=data_start + begin, shape=shape)
    return arrays, metadata


def load_arrays(path: str | os.PathLike, dtypes: dict[str, np.dtype] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Load what :func:`save_arrays` wrote: (arrays, metadata). ``dtypes[name]`` converts that
    array while it is read, chunk by chunk, so a float16 array becomes float32 without a float16
    copy of it in memory."""
    path = Path(path)
    header, metadata, data_start = _read_header(path)
    arrays = {}
    try:
        with open(path, "rb") as file:
            for name, entry in header.items():
                stored = _NUMPY_DTYPES[entry["dtype"]]
                target = np.dtype(dtypes[name]) if dtypes and name in dtypes else stored
                array = np.empty(tuple(entry["shape"]), dtype=target)
                flat = array.reshape(-1)
                step = max(1, _IO_CHUNK_BYTES // stored.itemsize)
                file.seek(data_start + entry["data_offsets"][0])
                for start in range(0, flat.size, step):
                    count = min(step, flat.size - start)
                    chunk = np.frombuffer(file.read(count * stored.itemsize), dtype=stored)
                    if len(chunk) != count:
                        raise ValueError(f"array {name!r} is truncated")
                    flat[start : start + count] = chunk
                arrays[name] = array
    except (OSError, ValueError) as error:
        raise _unreadable(path, error) from error
    return arrays, metadata
