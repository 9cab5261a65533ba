"""The binary decision threshold as a component of ``evaluate.yaml`` (``evaluate#threshold``), which the report
handler calls once per reporting level (cases or series, then studies).

:class:`ValidationThreshold` (the default) chooses it on the validation split, never on the test cases: Youden's J,
or the highest threshold that reaches ``target_sensitivity``. :class:`FixedThreshold` is a value set beforehand
(e.g. one agreed with the clinicians), recorded as not chosen on data. Either is called with an optional ``level``,
the function that turns the validation rows into the rows of the level reported (series into studies), so the
threshold applied to a level's test rows was chosen on validation rows of that same level.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from ..errors import EvaluationError
from ..stats import ThresholdChoice
from ._cases import choose_threshold

Level = Callable[[Sequence[dict]], list[dict]]


class ValidationThreshold:
    """Chosen on the validation split: ``validator`` (an evaluator over it, train.yaml's ``validate#evaluator``)
    runs on the first call, and ``cases`` (its case collector) then holds one row per validation case (series);
    every call chooses on ``level(rows)`` (default: the rows themselves) with :func:`choose_threshold`."""

    def __init__(self, validator, cases, *, target_sensitivity: float | None = None) -> None:
        if target_sensitivity is not None and not 0.0 < float(target_sensitivity) <= 1.0:
            raise EvaluationError(f"target_sensitivity={target_sensitivity!r}: expected a number in (0, 1] or null "
                                  "(Youden's J)")
        self.validator, self.cases, self.target_sensitivity = validator, cases, target_sensitivity
        self._rows: list[dict] | None = None

    def __call__(self, level: Level | None = None) -> ThresholdChoice:
        if self._rows is None:
            self.validator.run()
            self._rows = list(self.cases.rows)
        rows = level(self._rows) if level is not None else self._rows
        return choose_threshold(rows, target_sensitivity=self.target_sensitivity)


class FixedThreshold:
    """A threshold set beforehand, the same at every level; the report says it was not chosen on data."""

    def __init__(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise EvaluationError(f"threshold value={value!r}: expected a probability in [0, 1]")
        self.value = float(value)

    def __call__(self, level: Level | None = None) -> ThresholdChoice:
        return ThresholdChoice(self.value, f"fixed {self.value:g} (set in the config, not chosen on data)", math.nan,
                               math.nan)
