"""What the statistics return: an estimate with its interval, and a paired difference with its test."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Interval:
    """``estimate`` with its confidence interval ``[low, high]`` at ``level``; ``method`` says how it was made."""

    estimate: float
    low: float
    high: float
    level: float
    method: str
    se: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """``difference = estimate_a - estimate_b`` of one metric on the same cases, its interval and the two-sided
    p-value of "no difference"."""

    estimate_a: float
    estimate_b: float
    difference: float
    low: float
    high: float
    p_value: float
    level: float
    method: str
    se: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)
