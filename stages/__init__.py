"""Thin entry points, one per DVC stage (see dvc.yaml): read params, call pipeline/, write outs."""

import gc
import sys
from collections.abc import Callable

from pipeline.memory import keep_freed_memory

# Before a stage's module imports torch: every stage allocates the same tensors over and over, and
# glibc's default hands them back to the kernel each time (pipeline/memory.py).
keep_freed_memory()


def run(stage: str, main: Callable[[], None]) -> None:
    """Run a stage's main; bad params or data end it with a one-line message, not a traceback.

    ParamsError and DataError are ValueErrors, and so are the scheduler's and the UNet's errors
    for combinations that each key allows alone (e.g. zero terminal SNR with epsilon prediction).
    """
    # The modules imported by now live until the process ends. Frozen, their objects are left out
    # of every later cyclic collection, and out of the interpreter's at exit, which otherwise
    # traverses them all once more: about 1 s of each stage process (docs/benchmarks.md).
    gc.freeze()
    try:
        main()
    except ValueError as err:
        sys.exit(f"{stage}: error: {err}")
