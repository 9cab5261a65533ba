"""One writer per output folder for the whole run (:func:`medtl3d.locking.output_lock`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack

from ignite.engine import Engine, Events

from ...config_ids import ConfigIdError
from ...errors import OutputLockedError
from ...locking import output_lock
from .._blocks import _rank_and_world


class OutputLock:
    """Hold the locks of ``folders`` from ``STARTED`` to the end of the run (an error included); a run that finds
    one held by another run stops at once. ``folders`` maps bundle config ids to folders (the error then names the
    id) or is a plain list. Only the writing rank (rank 0) locks. List it first in ``train#handlers``; it releases
    after every other ``COMPLETED`` handler (those that publish the run's files)."""

    def __init__(self, folders: Mapping[str, str] | Sequence[str]) -> None:
        self.folders = dict(folders) if isinstance(folders, Mapping) else {None: f for f in folders}
        self._stack: ExitStack | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.acquire)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.release_and_raise)

    def acquire(self, engine: Engine) -> None:
        if not engine.has_event_handler(self.release, Events.COMPLETED):  # registered now: it runs last
            engine.add_event_handler(Events.COMPLETED, self.release)
        if _rank_and_world()[0] > 0:  # the other ranks write nothing: they cannot deadlock on the lock
            return
        self._stack = ExitStack().__enter__()
        for config_id, folder in self.folders.items():
            try:
                self._stack.enter_context(output_lock(folder))
            except OutputLockedError as err:
                self.release_and_raise(engine, ConfigIdError(config_id, str(err)) if config_id else err)

    def release(self, engine: Engine, error: BaseException | None = None) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)

    def release_and_raise(self, engine: Engine, error: BaseException) -> None:
        """ignite swallows an error once an ``EXCEPTION_RAISED`` handler exists: release, then raise it again."""
        self.release(engine, error)
        raise error
