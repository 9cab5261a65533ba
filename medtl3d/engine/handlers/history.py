"""The run's per-epoch record: ``trainer.state.history`` and ``history.csv``."""

from __future__ import annotations

import logging
from pathlib import Path

from ignite.engine import Engine, Events

from .._blocks import _rank_and_world, _write_history

logger = logging.getLogger("medtl3d.engine")


class History:
    """Append ``{epoch, train_loss, seconds, val_<metric>..., val_loss}`` to ``trainer.state.history`` after each
    epoch (the ``val_`` entries on validated epochs: every metric of ``evaluator``), write ``history.csv`` to
    ``output_dir`` (rank 0) and log the line. ``train_loss`` and ``seconds`` come from
    :class:`~medtl3d.engine.handlers.EpochLoss`; list this handler after ``ValidationHandler``."""

    def __init__(self, evaluator: Engine, output_dir: str | Path) -> None:
        self.evaluator, self.output_dir = evaluator, Path(output_dir)
        self._validated: dict | None = None

    def attach(self, engine: Engine) -> None:
        if not hasattr(engine.state, "history"):
            engine.state.history = []
        self.evaluator.add_event_handler(Events.COMPLETED, self.validated)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def validated(self, evaluator: Engine) -> None:
        self._validated = {f"val_{name}": float(value) for name, value in evaluator.state.metrics.items()}

    def epoch_completed(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        record = {"epoch": engine.state.epoch, "train_loss": metrics.get("train_loss"),
                  "seconds": round(metrics.get("epoch_seconds", 0.0), 3), **(self._validated or {})}
        self._validated = None
        engine.state.history.append(record)
        if _rank_and_world()[0] > 0:
            return
        _write_history(engine.state.history, self.output_dir / "history.csv")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch", "seconds") and v is not None)
        logger.info("epoch %d/%d: %s", engine.state.epoch, engine.state.max_epochs, shown)
