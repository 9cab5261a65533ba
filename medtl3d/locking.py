"""One writer per output folder: an exclusive ``filelock`` held for a whole run, refused at once when taken.

:func:`output_lock` locks ``<folder>/.medtl3d.lock`` without waiting and records its holder (pid, host, start
time, command) in ``<folder>/.medtl3d.lock.json``, so a second run stops with one line naming the folder and the
run that holds it. The operating system releases the lock when its process dies, so a killed run never leaves the
folder locked (a stale holder file is simply overwritten). A run that fails in a folder it created, before writing
anything there, removes the folder again. Within one thread the lock is re-entrant: a bundle run
that locks a folder may call the engine, which locks it again. The lock is advisory and relies on ``flock``: it
holds on local disks, not necessarily across machines on a network file system.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import functools
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from .errors import OutputError, OutputLockedError
from .reporting import write_text

LOCK_NAME = ".medtl3d.lock"


def _holder_path(folder: Path) -> Path:
    return folder / f"{LOCK_NAME}.json"


def _describe_holder(folder: Path) -> str:
    try:
        holder = json.loads(_holder_path(folder).read_text())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) for the ``with`` block; raise
    :class:`OutputLockedError` at once, naming the folder and the holder, when another run holds it, and
    :class:`OutputError` when a file stands at the folder's path or the folder cannot be created."""
    folder = Path(folder)
    created = not folder.exists()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is an existing file, not a folder: give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"output folder {folder} cannot be created: {err.strerror or err}") from err
    lock = FileLock(folder / LOCK_NAME, blocking=False, is_singleton=True)
    outermost = not lock.is_locked
    try:
        lock.acquire()
    except Timeout:
        raise OutputLockedError(f"output folder {folder} is being written by another run ({_describe_holder(folder)}); "
                                "wait for it to finish or choose another output folder") from None
    try:
        if outermost:
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_text(_holder_path(folder), json.dumps(holder))
        yield folder
    except BaseException:
        if outermost and created:  # a refused run leaves no empty output folder behind
            _holder_path(folder).unlink(missing_ok=True)
            lock.release()
            _remove_if_only_the_lock(folder)
        raise
    finally:
        if lock.is_locked:
            if outermost:
                _holder_path(folder).unlink(missing_ok=True)
            lock.release()


def _remove_if_only_the_lock(folder: Path) -> None:
    if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
        (folder / LOCK_NAME).unlink(missing_ok=True)
        folder.rmdir()


def one_run_per_output(error: type[Exception]) -> Callable:
    """Decorator for ``fn(bundle_dir, output_dir, **options)``: hold ``output_dir``'s lock for the whole call (a
    second run on it is refused at once, as ``error``, instead of training the same trials again); ``fn`` gets
    the resolved folder."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def locked(bundle_dir, output_dir, **options):
            out = Path(output_dir).resolve()
            with ExitStack() as stack:
                try:
                    stack.enter_context(output_lock(out))
                except OutputLockedError as err:
                    raise error(str(err)) from None
                return fn(bundle_dir, out, **options)

        return locked

    return decorate
