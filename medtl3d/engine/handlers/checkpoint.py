"""``last.pt`` every epoch and ``best.pt`` when the selected epoch changes, and bit-exact resume from ``last.pt``.

Not ignite's ``Checkpoint`` / MONAI's ``CheckpointSaver``: the file must also carry the RNG states, the history, the
model's *initial* state, its ``model_config`` and the run's provenance, and stay loadable with
``torch.load(weights_only=True)`` (see :mod:`medtl3d.engine._checkpoint`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ignite.engine import Engine, Events

from ...errors import TrainingError
from .._blocks import _rank_and_world, _resume_check
from .._checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

logger = logging.getLogger("medtl3d.engine")

#: what resuming reads from ``last.pt`` besides the model, optimizer and scheduler states
RESUME_KEYS = ("run_config", "scaler", "engine", "history", "stopped_early", "initial_state", "rng")
_PAUSE_AFTER: ContextVar[int | None] = ContextVar("medtl3d_pause_after", default=None)


@contextmanager
def pause_after(epoch: int | None):
    """Training runs started inside stop after ``epoch`` (None: no pause) and keep ``last.pt``: a pause, not an
    early stop. The schedule still spans the trainer's ``max_epochs``, and a later run of the same configuration
    outside the pause (or with a later one) resumes from ``last.pt`` as if it had never stopped. A context rather
    than an argument: the caller that pauses (the cutoff search's early termination) runs bundles whose fixed
    ``run`` expressions cannot forward a search-only option."""
    token = _PAUSE_AFTER.set(None if epoch is None else int(epoch))
    try:
        yield
    finally:
        _PAUSE_AFTER.reset(token)


class TrainingCheckpoint:
    """Save ``model``, ``optimizer`` and ``scheduler`` (any object with ``state_dict``; None is skipped), the
    AMP scaler, the engine counters, ``trainer.state.history``, the RNG states, ``initial_state``, ``model_config``,
    ``run_config`` and ``provenance`` to ``output_dir/last.pt`` after every epoch, and to ``best.pt`` first when
    :class:`~medtl3d.engine.handlers.SelectModel` marked the epoch as the best.

    With ``resume`` an existing ``last.pt`` whose ``run_config`` matches continues at ``STARTED``: everything is
    restored, the RNG states last; a finished or early-stopped run trains no further. Only rank 0 writes. The
    saving handler is registered at ``STARTED``, so it runs after every other ``EPOCH_COMPLETED`` handler.
    """

    def __init__(self, output_dir: str | Path, model, optimizer, scheduler=None, *, initial_state: Mapping,
                 run_config: Mapping, model_config: Mapping | None = None, provenance: Mapping | None = None,
                 key_metric: str = "auroc", resume: bool = True) -> None:
        self.output_dir, self.resume = Path(output_dir), resume
        self.objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        self.initial_state, self.run_config = dict(initial_state), dict(run_config)
        self.model_config, self.provenance, self.key_metric = model_config, provenance, key_metric

    def attach(self, engine: Engine) -> None:
        engine.state.history = getattr(engine.state, "history", None) or []
        engine.state.stopped_early = False
        engine.add_event_handler(Events.STARTED, self.started)

    def started(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        last = self.output_dir / "last.pt"
        if not (self.resume and last.exists()):
            return
        saved = load_checkpoint(last)
        missing = [key for key in RESUME_KEYS if key not in saved]
        if missing:
            raise TrainingError(f"{last} cannot be resumed: it lacks {', '.join(missing)} (written by an older "
                                "medtl3d or another program); delete it to train from the start, or use another "
                                "output folder")
        _resume_check(saved["run_config"], self.run_config, last)
        try:
            for name, target in self.objects.items():
                if target is not None:
                    target.load_state_dict(saved[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise TrainingError(f"{last} does not fit this model/optimizer/scheduler: {err}") from err
        if saved["scaler"] is not None and getattr(engine, "scaler", None) is not None:
            engine.scaler.load_state_dict(saved["scaler"])
        engine.state.history, engine.state.stopped_early = saved["history"], saved["stopped_early"]
        self.initial_state = saved["initial_state"]
        engine.state.epoch, engine.state.iteration = saved["engine"]["epoch"], saved["engine"]["iteration"]
        pause = _PAUSE_AFTER.get()
        if engine.state.stopped_early or engine.state.epoch >= min(engine.state.max_epochs, pause or math.inf):
            logger.info("%s: run already at epoch %d; nothing to train", self.output_dir, engine.state.epoch)
            engine.terminate()
            return
        logger.info("resuming %s after epoch %d", self.output_dir, engine.state.epoch)
        set_rng_state(saved["rng"])  # last: nothing may draw random numbers between this and the first batch

    def state(self, engine: Engine) -> dict:
        scaler = getattr(engine, "scaler", None)
        return {
            **{name: (obj.state_dict() if obj is not None else None) for name, obj in self.objects.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "engine": {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                       "epoch_length": engine.state.epoch_length},
            "key_metric": self.key_metric,
            "best_metric": getattr(engine.state, "best_metric", math.nan),
            "best_epoch": getattr(engine.state, "best_epoch", 0),
            "stopped_early": engine.state.stopped_early,
            "history": engine.state.history,
            "rng": rng_state(),
            "initial_state": self.initial_state,
            "model_config": self.model_config,
            "run_config": self.run_config,
            "provenance": self.provenance,
        }

    def save(self, engine: Engine) -> None:
        engine.state.stopped_early = bool(engine.should_terminate) and engine.state.epoch < engine.state.max_epochs
        pause = _PAUSE_AFTER.get()
        if pause is not None and engine.state.epoch >= pause:  # after stopped_early: a pause is not an early stop
            engine.terminate()
        if _rank_and_world()[0] > 0:
            return
        state = self.state(engine)
        if getattr(engine.state, "best_improved", False):  # best first: a kill between the writes replays the epoch
            save_checkpoint(state, self.output_dir / "best.pt")
        save_checkpoint(state, self.output_dir / "last.pt")
