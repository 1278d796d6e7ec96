"""Shared entry point for the stage scripts: known input errors become one clear line."""

from __future__ import annotations

import os
import sys
from typing import Callable

from vitad.core.errors import InputError


class StageError(RuntimeError):
    """A stage cannot proceed; the message says which file or parameter and what to do."""


# InputError: ParamsError, DatasetError, ScoresError, ArrayFileError (vitad.core.errors says why a base class)
EXPECTED_ERRORS = (InputError, StageError, FileNotFoundError)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); expected input errors exit 1 with 'error: ...' instead of a traceback.

    After a successful main() (every output written atomically and closed) the process ends with
    os._exit: tearing down the interpreter with torch and torchvision imported takes 0.5-0.9 s
    (measured here), paid by each of the pipeline's torch stages for nothing. Not under a profiler
    or tracer (cProfile, coverage), which write their results at a normal exit.
    """
    try:
        main()
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if sys.getprofile() is None and sys.gettrace() is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
