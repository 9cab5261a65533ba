"""Paired comparisons beyond AUROC: McNemar's test of two classifiers' accuracies at fixed thresholds, the corrected
resampled t-test across folds x seeds, and the non-inferiority verdict read off a difference's interval.

One rule for degenerate intervals (:func:`informative`): an interval of zero width (every run gave the same
difference, typical of a discrete AUROC on a few validation cases over 2 folds) has no spread to measure the
uncertainty with, so no verdict is read off it; the search, the study and ``medtl3d compare`` all follow it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum

import numpy as np
from scipy import stats

from ._checks import StatisticsError, check_level

DEFAULT_MARGINS = {"auroc": 0.02, "dice": 0.01}


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test: the discordant counts, the statistic and p-value, and which form of the test was used."""

    only_a_correct: int
    only_b_correct: int
    statistic: float
    p_value: float
    method: str
    accuracy_a: float
    accuracy_b: float
    cases: int

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar_test(correct_a, correct_b, *, exact_below: int = 25) -> McNemarResult:
    """McNemar's test (McNemar 1947, Psychometrika 12:153-157) of two classifiers on the same cases, from whether
    each got each case right (at thresholds chosen beforehand, e.g. by :func:`threshold_at` on validation data).

    Only the discordant cases count: ``b`` right by ``a`` only, ``c`` by ``b`` only. With ``b + c < exact_below``
    the p-value is the exact two-sided binomial test of ``b ~ Bin(b + c, 1/2)`` (``scipy.stats.binomtest``; the
    "exact conditional" test of Fagerland, Lydersen & Laake 2013, BMC Med Res Methodol 13:91); otherwise the
    chi-square ``(|b - c| - 1)^2 / (b + c)`` with Edwards' (1948, Psychometrika 13:185-187) continuity correction,
    1 degree of freedom. No discordant case gives p = 1.
    """
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.shape != b.shape or a.ndim != 1 or not np.isin(a, (0, 1)).all() or not np.isin(b, (0, 1)).all():
        raise StatisticsError(f"correct_a and correct_b must be 1-D 0/1 or booleans of one length, got shapes "
                              f"{a.shape} and {b.shape}")
    a, b = a.astype(bool), b.astype(bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        statistic, p_value, method = 0.0, 1.0, "no discordant cases"
    elif discordant < exact_below:
        statistic = float(only_a)
        p_value = float(stats.binomtest(only_a, discordant, 0.5).pvalue)
        method = f"exact binomial (b + c = {discordant} < {exact_below})"
    else:
        statistic = (abs(only_a - only_b) - 1.0) ** 2 / discordant
        p_value = float(stats.chi2.sf(statistic, 1))
        method = f"chi-square with continuity correction (b + c = {discordant} >= {exact_below})"
    return McNemarResult(only_a, only_b, statistic, p_value, method, float(a.mean()), float(b.mean()), a.size)


def holm_adjust(p_values) -> np.ndarray:
    """Holm's (1979, Scand J Stat 6:65-70) step-down adjusted p-values, controlling the family-wise error rate of
    ``m`` tests: sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``; a test is rejected
    at ``alpha`` when its adjusted p-value is ``<= alpha``. (statsmodels' ``multipletests(method="holm")``; not a
    dependency for these few lines.)"""
    p = np.asarray(p_values, dtype=float).ravel()
    if not np.isfinite(p).all() or ((p < 0) | (p > 1)).any():
        raise StatisticsError(f"p-values must lie in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (p.size - np.arange(p.size)) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(stepped)
    return adjusted


@dataclass(frozen=True)
class ResampledTTest:
    """The corrected resampled t-test: mean difference, corrected standard error, t, p, interval, and the number
    of runs (train/test splits) it used."""

    mean_difference: float
    se: float
    statistic: float
    df: int
    p_value: float
    low: float
    high: float
    level: float
    runs: int
    correction: float
    method: str = "corrected resampled t-test (Nadeau & Bengio 2003)"

    def as_dict(self) -> dict:
        return asdict(self)


def corrected_resampled_ttest(differences, n_train: int, n_test: int, level: float = 0.95) -> ResampledTTest:
    """Nadeau & Bengio's (2003, Machine Learning 52:239-281) corrected resampled t-test of a mean difference
    between two models over ``J`` train/test splits (folds x seeds, flattened).

    The splits share training cases, so their differences are correlated and the naive variance ``s^2 / J``
    is too small; the correction multiplies ``s^2`` by ``1/J + n_test/n_train`` instead. The statistic has
    ``J - 1`` degrees of freedom; for r repeats of k-fold cross-validation, ``J = r k`` and
    ``n_test/n_train = 1/(k-1)`` (Bouckaert & Frank 2004, PAKDD, LNCS 3056:3-12).
    """
    level = check_level(level)
    d = np.asarray(differences, dtype=float).ravel()
    if d.size < 2 or not np.isfinite(d).all():
        raise StatisticsError(f"the corrected resampled t-test needs at least 2 finite differences, got {d.size}")
    if n_train < 1 or n_test < 1:
        raise StatisticsError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    runs = d.size
    correction = 1.0 / runs + n_test / n_train
    mean, se = float(d.mean()), math.sqrt(correction * d.var(ddof=1))
    df = runs - 1
    if se > 0:
        statistic = mean / se
        p_value = float(2.0 * stats.t.sf(abs(statistic), df))
    else:  # every split gave the same difference
        statistic, p_value = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return ResampledTTest(mean, se, statistic, df, p_value, mean - half, mean + half, level, runs, correction)


class Verdict(str, Enum):
    """Outcome of a non-inferiority comparison (CONSORT extension, Piaggio et al. 2012, JAMA 308:2594-2604,
    Figure 1)."""

    SUPERIOR = "superior"
    NON_INFERIOR = "non-inferior"
    INFERIOR = "inferior"
    INCONCLUSIVE = "inconclusive"


def informative(low: float | None, high: float | None) -> bool:
    """Whether an interval can carry a verdict: not when missing or of zero width (every run gave the same
    difference, so the corrected resampled t-test has no spread to estimate; reading a verdict off it would present
    noise as a finding)."""
    return low is not None and high is not None and low < high


def noninferiority(diff_low: float, diff_high: float, margin: float, *, higher_is_better: bool = True,
                   exact: bool = False) -> Verdict:
    """Verdict on ``candidate - reference`` from the interval ``[diff_low, diff_high]`` of that difference.

    With the difference oriented so that positive is better (negated when ``higher_is_better=False``):
    superior if the interval lies above 0; non-inferior if it lies above ``-margin`` (the candidate may be worse,
    but by less than the margin); inferior if it lies below ``-margin``; inconclusive if it contains ``-margin``.
    Typical margins: :data:`DEFAULT_MARGINS` (0.02 AUROC, 0.01 Dice); the margin must be set before looking.
    An interval of zero width is inconclusive (:func:`informative`) unless ``exact``: the caller knows it measured
    the difference without spread (a case-level interval of two runs that score every case alike).
    """
    if not margin > 0:
        raise StatisticsError(f"the non-inferiority margin must be > 0, got {margin}")
    if not diff_low <= diff_high:
        raise StatisticsError(f"the interval must have low <= high, got [{diff_low}, {diff_high}]")
    if not exact and not informative(diff_low, diff_high):
        return Verdict.INCONCLUSIVE
    low, high = (diff_low, diff_high) if higher_is_better else (-diff_high, -diff_low)
    if low > 0:
        return Verdict.SUPERIOR
    if low > -margin:
        return Verdict.NON_INFERIOR
    if high < -margin:
        return Verdict.INFERIOR
    return Verdict.INCONCLUSIVE
