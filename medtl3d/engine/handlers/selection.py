"""Which validated epoch becomes ``best.pt`` (:mod:`medtl3d.engine.selection`'s rules) as a handler."""

from __future__ import annotations

import math

from ignite.engine import Engine, Events

from ..selection import ModelSelection


class SelectModel:
    """After each epoch, replay ``trainer.state.history`` through the ``select`` rule (key_metric, loss, last,
    ema) and set ``trainer.state.best_metric`` / ``best_epoch`` and ``best_improved`` (the epoch just finished is
    the new best: :class:`~medtl3d.engine.handlers.TrainingCheckpoint` writes ``best.pt``). A function of the
    history, so a resumed run selects exactly as an uninterrupted one. List it after
    :class:`~medtl3d.engine.handlers.History`."""

    def __init__(self, select: str = "key_metric", key_metric: str = "auroc", ema_decay: float = 0.5) -> None:
        ModelSelection(select, key_metric, ema_decay)  # refuses an unknown rule now, not after the first epoch
        self.select, self.key_metric, self.ema_decay = select, key_metric, ema_decay

    def attach(self, engine: Engine) -> None:
        engine.state.best_metric, engine.state.best_epoch, engine.state.best_improved = math.nan, 0, False
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        selection, best = ModelSelection(self.select, self.key_metric, self.ema_decay), None
        for record in engine.state.history:
            if f"val_{self.key_metric}" in record and selection.update(record):
                best = record
        engine.state.best_improved = best is not None and best["epoch"] == engine.state.epoch
        if best is not None:
            engine.state.best_metric, engine.state.best_epoch = best[f"val_{self.key_metric}"], best["epoch"]
