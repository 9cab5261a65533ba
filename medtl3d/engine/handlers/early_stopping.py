"""Early stopping on the key metric, counted in validations.

Not MONAI's ``EarlyStopHandler`` (ignite's ``EarlyStopping``): its counter is state of its own that a resumed run
would have to restore; here the count is a function of ``trainer.state.history``, like the model selection, so
``last.pt`` needs nothing more. The rule is ignite's: a validation whose score is not above the best so far plus
``min_delta`` counts, a better one resets the count, ``patience`` counts stop; an undefined (nan) metric never
improves.
"""

from __future__ import annotations

import logging
import math

from ignite.engine import Engine, Events

from ...errors import TrainingError

logger = logging.getLogger("medtl3d.engine")


class EarlyStop:
    """Stop training after ``patience`` validations without an improvement of ``val_<key_metric>``. List it after
    :class:`~medtl3d.engine.handlers.History`."""

    def __init__(self, patience: int, key_metric: str = "auroc", min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise TrainingError(f"early_stop_patience must be None or an integer >= 1, got {patience!r}")
        self.patience, self.key, self.min_delta = patience, f"val_{key_metric}", min_delta

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def waited(self, history: list[dict]) -> int:
        """Validations since the last improvement."""
        best, count = None, 0
        for record in history:
            if self.key not in record:
                continue
            score = -math.inf if math.isnan(record[self.key]) else record[self.key]
            if best is None or score > best + self.min_delta:
                best, count = score, 0
            else:
                count += 1
        return count

    def __call__(self, engine: Engine) -> None:
        history = engine.state.history
        if history and self.key in history[-1] and self.waited(history) >= self.patience:
            logger.info("early stopping: %s did not improve for %d validations", self.key, self.patience)
            engine.terminate()
