"""How a run behaves on a shared machine and in a log file: its torch thread count, and progress bars only on a
terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import TrainingError


def check_num_threads(num_threads: int | None) -> None:
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise TrainingError(f"num_threads must be None (torch's default) or an integer >= 1, got {num_threads!r}")


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(num_threads)`` for the duration of the block, then the previous count again; None
    keeps torch's (``OMP_NUM_THREADS``, else one per core: on a loaded machine one thread can be many times
    faster than two)."""
    check_num_threads(num_threads)
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``, where progress bars go) is a terminal: a log file would fill
    with carriage-return lines."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def set_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads`` for the rest of the process (a bundle run's ``initialize``); None keeps torch's."""
    check_num_threads(num_threads)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
