"""Shared entry point for the stage scripts: known input errors become one clear line."""

from __future__ import annotations

import sys
from typing import Callable

from vitad.data import DatasetError
from vitad.io import ArrayFileError
from vitad.params import ParamsError
from vitad.scorefile import ScoresError


class StageError(RuntimeError):
    """A stage cannot proceed; the message says which file or parameter and what to do."""


EXPECTED_ERRORS = (ParamsError, DatasetError, StageError, ScoresError, ArrayFileError, FileNotFoundError)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); expected input errors exit 1 with 'error: ...' instead of a traceback."""
    try:
        main()
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
