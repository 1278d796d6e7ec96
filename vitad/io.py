"""Atomic, deterministic file output shared by every stage.

Every file a stage writes goes to a temporary name in the same directory and is renamed into
place, so an interrupted or failing stage never leaves a half-written output behind.  Arrays are
stored with safetensors: its byte layout depends only on the arrays and the metadata (no
timestamps, unlike ``np.savez``), so identical inputs give identical files and DVC's run-cache
and ``dvc metrics diff`` stay meaningful.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file


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


class ArrayFileError(ValueError):
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


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Save named arrays plus JSON-serialisable metadata atomically (safetensors)."""
    contiguous = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    header = {"json": json.dumps(metadata or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)


def load_metadata(path: str | os.PathLike) -> dict:
    """The metadata :func:`save_arrays` wrote, without reading the arrays (only the file header)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return json.loads((handle.metadata() or {}).get("json", "{}"))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArrayFileError(f"{path}: unreadable ({error}); delete it and re-run the stage that writes it") from error


def load_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Load what :func:`save_arrays` wrote: (arrays, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (did the stage that writes it run? try `dvc repro`)")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = json.loads((handle.metadata() or {}).get("json", "{}"))
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise ArrayFileError(f"{path}: unreadable ({error}); delete it and re-run the stage that writes it") from error
