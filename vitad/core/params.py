"""Reading params.yaml with errors that name the offending key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vitad.core.errors import InputError


class ParamsError(InputError):
    """A params.yaml key is missing or has the wrong type or value."""


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ParamsError(f"{path}: not found (run from the repository root or pass --params)") from error
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return params


_MISSING = object()


def param(params: dict, key: str, kind: type | tuple[type, ...], default: Any = _MISSING, choices=None) -> Any:
    """Value at dotted ``key`` (e.g. ``"score.knn.k"``), checked against ``kind`` and ``choices``."""
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is not _MISSING:
                return default
            raise ParamsError(f"params.yaml: missing key {key!r}")
        value = value[part]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass in Python: never accept True for an integer parameter.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ParamsError(f"params.yaml: {key} must be {names}, got {value!r}")
    if choices is not None and value not in choices:
        raise ParamsError(f"params.yaml: {key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def positive_int(params: dict, key: str, default: Any = _MISSING) -> int:
    value = param(params, key, int, default)
    if value is not None and value <= 0:
        raise ParamsError(f"params.yaml: {key} must be a positive integer, got {value!r}")
    return value


def string_list(params: dict, key: str) -> list[str]:
    values = param(params, key, list)
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ParamsError(f"params.yaml: {key} must be a non-empty list of names, got {values!r}")
    if len(set(values)) != len(values):
        raise ParamsError(f"params.yaml: {key} lists a name twice: {values!r}")
    return values


def run_names(params: dict) -> list[str]:
    """The keys of ``pipeline.runs``, in params order: the names of each run's stages and of its
    score, heatmap and metrics outputs (:func:`vitad.runs.run_specs` validates the entries; the
    stages after scoring need only the names, and so need not import the scorers)."""
    runs = param(params, "pipeline.runs", dict)
    if not runs:
        raise ParamsError("params.yaml: pipeline.runs must name at least one run {backbone: ..., recipe: ...}")
    return list(runs)
