"""Input checks shared by the statistics: labels, scores, levels; one error type that names what is wrong."""

from __future__ import annotations

import numpy as np

from ..errors import Medtl3dError


class StatisticsError(Medtl3dError, ValueError):
    """Input a statistic cannot be computed from: wrong labels or lengths, non-finite scores, too few cases."""


def binary_labels(y_true, name: str = "y_true") -> np.ndarray:
    """``y_true`` as a 1-D boolean array (positives True); accepts booleans or 0/1."""
    labels = np.asarray(y_true)
    if labels.ndim != 1:
        raise StatisticsError(f"{name} must be 1-D (one label per case), got shape {labels.shape}")
    if labels.dtype == bool:
        return labels
    if not ((labels == 0) | (labels == 1)).all():  # np.isin is 10x slower: this runs per bootstrap resample
        raise StatisticsError(f"{name} must hold 0/1 or booleans, got values {np.unique(labels)[:5].tolist()}")
    return labels.astype(bool)


def class_counts(labels: np.ndarray, minimum: int, what: str) -> tuple[int, int]:
    """``(positives, negatives)``, each at least ``minimum``."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives < minimum or negatives < minimum:
        raise StatisticsError(f"{what} needs at least {minimum} positive and {minimum} negative cases, got "
                              f"{positives} positive and {negatives} negative")
    return positives, negatives


def case_scores(y_score, cases: int, name: str = "y_score") -> np.ndarray:
    """``y_score`` as a finite 1-D float array with one value per case."""
    scores = np.asarray(y_score, dtype=float)
    if scores.ndim != 1 or scores.size != cases:
        raise StatisticsError(f"{name} must hold one score per case ({cases}), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise StatisticsError(f"{name} has {int((~np.isfinite(scores)).sum())} non-finite values")
    return scores


def check_level(level: float) -> float:
    if not 0 < level < 1:
        raise StatisticsError(f"confidence level must be in (0, 1), got {level}")
    return float(level)
