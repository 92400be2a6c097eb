"""Thin entry points, one per DVC stage (see dvc.yaml): read params, call pipeline/, write outs."""

import sys
from collections.abc import Callable

from pipeline.config import ParamsError
from pipeline.data import DataError


def run(stage: str, main: Callable[[], None]) -> None:
    """Run a stage's main; bad params or data end it with a one-line message, not a traceback."""
    try:
        main()
    except (ParamsError, DataError) as err:
        sys.exit(f"{stage}: error: {err}")
