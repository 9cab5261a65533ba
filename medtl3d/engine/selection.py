"""Which validated epoch becomes ``best.pt``: a rule that survives small validation folds.

On a 60-image fold AUROC can reach 1.000 at epoch 1; a strict "greater than" rule then keeps that model for good.
Every rule here compares a tuple, so ties on the first criterion are broken by the second:

- ``key_metric`` (default): highest key metric, ties broken by the lower validation loss;
- ``loss``: lowest validation loss, ties broken by the higher key metric;
- ``ema``: highest exponential moving average of the key metric (``ema_decay`` weight on the past), ties broken by
  the lower validation loss;
- ``last``: the last validated epoch.

An undefined key metric (nan) never wins under ``key_metric`` / ``ema``; an undefined loss never wins under
``loss``. The state is a function of the history, so a resumed run replays it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence

from ..errors import TrainingError

SELECTIONS = ("key_metric", "loss", "last", "ema")


def check_select(select: str) -> None:
    if select not in SELECTIONS:
        close = difflib.get_close_matches(str(select), SELECTIONS, n=2)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise TrainingError(f"select={select!r} is not a model-selection rule; {hint}choose one of "
                            f"{', '.join(SELECTIONS)}")


def _low_first(value: float) -> float:
    """A value to maximise from one to minimise (nan: worst)."""
    return -math.inf if math.isnan(value) else -value


def _high_first(value: float) -> float:
    return -math.inf if math.isnan(value) else value


class ModelSelection:
    """Feed it each validated epoch's record (``val_<key_metric>``, ``val_loss``); ``update`` says whether that
    epoch is the new best."""

    def __init__(self, select: str = "key_metric", key_metric: str = "auroc", ema_decay: float = 0.5) -> None:
        check_select(select)
        self.select, self.key, self.ema_decay = select, f"val_{key_metric}", ema_decay
        self.best: tuple | None = None
        self.ema = math.nan

    def score(self, record: Mapping) -> tuple | None:
        metric, loss = float(record[self.key]), float(record.get("val_loss", math.nan))
        if self.select == "ema" and not math.isnan(metric):
            self.ema = metric if math.isnan(self.ema) else self.ema_decay * self.ema + (1 - self.ema_decay) * metric
            metric = self.ema
        if self.select == "last":
            return ()
        if self.select == "loss":
            return None if math.isnan(loss) else (_low_first(loss), _high_first(metric))
        return None if math.isnan(metric) else (metric, _low_first(loss))

    def update(self, record: Mapping) -> bool:
        score = self.score(record)
        if score is None or (self.best is not None and not score > self.best and self.select != "last"):
            return False
        self.best = score
        return True


def select_epoch(history: Sequence[Mapping], select: str = "key_metric", key_metric: str = "auroc",
                 ema_decay: float = 0.5) -> int:
    """The epoch ``select`` keeps from a training history (rows with ``epoch`` and, on validated epochs,
    ``val_<key_metric>`` and ``val_loss``); 0 when none qualifies."""
    selection, best = ModelSelection(select, key_metric, ema_decay), 0
    for record in history:
        if f"val_{key_metric}" in record and selection.update(record):
            best = record["epoch"]
    return best
