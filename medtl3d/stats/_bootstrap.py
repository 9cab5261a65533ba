"""Bootstrap intervals over cases with ``scipy.stats.bootstrap``: one metric, or the paired difference of two.

Cases are resampled with replacement; with ``stratified=True`` each class of ``y_true`` is resampled on its own, so
every resample keeps the class counts (as pROC's ``boot.stratified``, Robin et al. 2011, BMC Bioinformatics
12:77). scipy does the stratification itself: each class's case indices are one
"sample", and scipy resamples samples independently. The default interval is BCa (Efron 1987, JASA 82:171-185;
Efron & Tibshirani 1993, ch. 14); where BCa is undefined (a degenerate bootstrap or jackknife distribution, e.g.
an AUROC of 1 in every resample) the percentile interval of the same resamples is used, and ``method`` says so.

A metric is ``metric(y_true, y_score) -> float`` on the resampled cases; ``y_true=None`` resamples per-case
values (e.g. Dice per case) without strata and calls ``metric(values)``, so ``bootstrap_ci(np.mean, None, dice)``
is the interval of the mean Dice.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from scipy import stats

from ._checks import StatisticsError, check_level
from ._results import Interval, PairedDifference

METHODS = ("BCa", "percentile", "basic")


def _cases(y_true, *arrays) -> tuple[np.ndarray | None, list[np.ndarray]]:
    arrays = [np.asarray(a) for a in arrays]
    labels = None if y_true is None else np.asarray(y_true)
    lengths = {len(a) for a in arrays} | ({len(labels)} if labels is not None else set())
    if len(lengths) != 1:
        raise StatisticsError(f"y_true and the scores must have one entry per case, got lengths {sorted(lengths)}")
    if min(lengths) < 2:
        raise StatisticsError("the bootstrap needs at least 2 cases")
    return labels, arrays


def _strata(labels: np.ndarray | None, stratified: bool, cases: int) -> tuple[np.ndarray, ...]:
    """The case indices to resample: one array per class of ``labels`` (stratified), else one array."""
    if labels is None or not stratified:
        return (np.arange(cases),)
    return tuple(np.flatnonzero(labels == value) for value in np.unique(labels))


def _evaluate(metric: Callable, labels, values: np.ndarray, index=slice(None)) -> float:
    return float(metric(values[index]) if labels is None else metric(labels[index], values[index]))


def _bootstrap(statistic: Callable[[np.ndarray], float], strata: tuple[np.ndarray, ...], level: float,
               n_resamples: int, method: str, seed) -> tuple[object, str]:
    """Run ``scipy.stats.bootstrap`` on the strata's indices; BCa falls back to percentile where it is undefined."""
    level = check_level(level)
    if method not in METHODS:
        raise StatisticsError(f"unknown bootstrap method {method!r}; choose one of {', '.join(METHODS)}")
    if any(len(s) < 2 for s in strata):
        raise StatisticsError(f"every stratum needs at least 2 cases to resample, got sizes {[len(s) for s in strata]}")
    options = dict(paired=False, vectorized=True, confidence_level=level, method=method)

    def of_strata(*parts: np.ndarray, axis: int = -1) -> np.ndarray:
        """The statistic of each resample; scipy passes them stacked, one resample per row of each stratum."""
        index = np.concatenate(parts, axis=axis)
        rows = index.reshape(-1, index.shape[-1])
        return np.array([statistic(row) for row in rows]).reshape(index.shape[:-1])

    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):  # checked below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(strata, of_strata, n_resamples=n_resamples, rng=np.random.default_rng(seed),
                                 **options)
    undefined = int(np.isnan(result.bootstrap_distribution).sum())
    if undefined:
        raise StatisticsError(f"the metric is undefined (NaN) on {undefined} of {n_resamples} resamples "
                              "(a resample without one of the classes? use stratified=True)")
    label = f"bootstrap {method}, {'stratified, ' if len(strata) > 1 else ''}{n_resamples} resamples"
    low, high = result.confidence_interval
    if method == "BCa" and not (np.isfinite(low) and np.isfinite(high)):
        result = stats.bootstrap(strata, of_strata, n_resamples=0, bootstrap_result=result,
                                 **{**options, "method": "percentile"})
        label = label.replace("BCa", "percentile (BCa undefined: degenerate distribution)")
    return result, label


def bootstrap_ci(metric: Callable, y_true, y_score, *, stratified: bool = True, level: float = 0.95,
                 n_resamples: int = 2000, method: str = "BCa", seed=0) -> Interval:
    """``metric`` on all cases with its bootstrap interval over cases (stratified by ``y_true`` by default)."""
    labels, (values,) = _cases(y_true, y_score)
    strata = _strata(labels, stratified, len(values))
    result, label = _bootstrap(lambda index: _evaluate(metric, labels, values, index), strata, level,
                               n_resamples, method, seed)
    low, high = result.confidence_interval
    return Interval(_evaluate(metric, labels, values), float(low), float(high), level, label,
                    float(result.standard_error))


def paired_bootstrap_diff(metric: Callable, y_true, score_a, score_b, *, stratified: bool = True,
                          level: float = 0.95, n_resamples: int = 2000, method: str = "BCa",
                          seed=0) -> PairedDifference:
    """``metric(a) - metric(b)`` on the same cases, resampling the cases once for both (the pairing).

    The p-value of "no difference" is read off the same resamples: twice the smaller share of differences on
    either side of 0, ``2 (1 + #{d* <= 0 or >= 0}) / (B + 1)`` capped at 1 (the ``(1 + count) / (B + 1)`` of
Davison & Hinkley 1997, Bootstrap Methods and their Application, ch. 4);
    it inverts the percentile interval, so with BCa the two can disagree near the boundary.
    """
    labels, (a, b) = _cases(y_true, score_a, score_b)
    strata = _strata(labels, stratified, len(a))

    def difference(index=slice(None)) -> float:
        return _evaluate(metric, labels, a, index) - _evaluate(metric, labels, b, index)

    result, label = _bootstrap(difference, strata, level, n_resamples, method, seed)
    resampled = result.bootstrap_distribution
    tail = min((resampled <= 0).sum(), (resampled >= 0).sum())
    p_value = min(1.0, 2.0 * (1 + int(tail)) / (n_resamples + 1))
    low, high = result.confidence_interval
    return PairedDifference(_evaluate(metric, labels, a), _evaluate(metric, labels, b), difference(), float(low),
                            float(high), p_value, level, f"paired {label}", float(result.standard_error))
