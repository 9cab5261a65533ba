"""AUROC variance, interval and paired test of DeLong, DeLong & Clarke-Pearson (1988), computed with the midrank
algorithm of Sun & Xu (2014).

DeLong et al. write the AUROC of positives ``X_1..X_m`` and negatives ``Y_1..Y_n`` as the Mann-Whitney statistic
``mean_ij psi(X_i, Y_j)`` (``psi`` = 1, 1/2, 0 for ``>``, ``=``, ``<``) and estimate its covariance across score
vectors from the structural components ``V10(X_i) = mean_j psi(X_i, Y_j)`` and ``V01(Y_j) = mean_i psi(X_i, Y_j)``:
``S = S10 / m + S01 / n`` with ``S10``, ``S01`` their sample covariances. Sun & Xu (2014, Theorem 1) obtain the
components from midranks in ``O(N log N)`` instead of ``O(mn)``: ``V10(X_i) = (T_Z(X_i) - T_X(X_i)) / n`` and
``V01(Y_j) = 1 - (T_Z(Y_j) - T_Y(Y_j)) / m``, where ``T_Z``, ``T_X``, ``T_Y`` are midranks in the pooled sample, the
positives and the negatives.

- DeLong ER, DeLong DM, Clarke-Pearson DL (1988). Comparing the areas under two or more correlated receiver operating
  characteristic curves: a nonparametric approach. Biometrics 44(3):837-845.
- Sun X, Xu W (2014). Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver
  operating characteristic curves. IEEE Signal Processing Letters 21(11):1389-1393.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ._checks import StatisticsError, binary_labels, case_scores, check_level, class_counts
from ._results import Interval, PairedDifference


def _structural_components(positives: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``V10`` (k, m) and ``V01`` (k, n) of ``k`` score vectors (rows of ``scores``), from midranks."""
    m, n = int(positives.sum()), int((~positives).sum())
    pooled = stats.rankdata(scores, axis=1)
    within_positives = stats.rankdata(scores[:, positives], axis=1)
    within_negatives = stats.rankdata(scores[:, ~positives], axis=1)
    v10 = (pooled[:, positives] - within_positives) / n
    v01 = 1.0 - (pooled[:, ~positives] - within_negatives) / m
    return v10, v01


def delong_covariance(y_true, *y_scores) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs ``(k,)`` of ``k`` score vectors on the same cases and their DeLong covariance ``(k, k)``.

    Higher scores mean "positive"; ties count one half. Needs at least 2 positives and 2 negatives (the components'
    sample covariances divide by ``m - 1`` and ``n - 1``).
    """
    positives = binary_labels(y_true)
    m, n = class_counts(positives, 2, "the DeLong variance")
    if not y_scores:
        raise StatisticsError("delong_covariance needs at least one score vector")
    scores = np.stack([case_scores(s, positives.size, f"score vector {i}") for i, s in enumerate(y_scores)])
    v10, v01 = _structural_components(positives, scores)
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return v10.mean(axis=1), covariance


def delong_auc_variance(y_true, y_score) -> tuple[float, float]:
    """``(auroc, variance)`` of one score vector (DeLong et al. 1988; Sun & Xu 2014)."""
    auc, covariance = delong_covariance(y_true, y_score)
    return float(auc[0]), float(covariance[0, 0])


def delong_ci(y_true, y_score, level: float = 0.95) -> Interval:
    """AUROC with the Wald interval ``auc +- z * se`` of its DeLong standard error, clipped to [0, 1]."""
    level = check_level(level)
    auc, variance = delong_auc_variance(y_true, y_score)
    se = math.sqrt(variance)
    half = float(stats.norm.ppf(0.5 + level / 2)) * se
    return Interval(auc, max(0.0, auc - half), min(1.0, auc + half), level, "DeLong", se)


def delong_paired_test(y_true, score_a, score_b, level: float = 0.95) -> PairedDifference:
    """DeLong's test of two AUROCs on the same cases: ``AUC_a - AUC_b``, its standard error
    ``sqrt(S_aa + S_bb - 2 S_ab)``, the Wald interval and the two-sided p-value of ``z = difference / se``
    (DeLong et al. 1988, eq. 5 with the contrast ``(1, -1)``). Identical score vectors give p = 1."""
    level = check_level(level)
    (auc_a, auc_b), covariance = delong_covariance(y_true, score_a, score_b)
    variance = max(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1], 0.0)
    difference, se = float(auc_a - auc_b), math.sqrt(variance)
    if se > 0:
        p_value = float(2.0 * stats.norm.sf(abs(difference) / se))
    else:  # no variance: the two AUROCs differ on no resampling of the cases
        p_value = 1.0 if difference == 0 else 0.0
    half = float(stats.norm.ppf(0.5 + level / 2)) * se
    return PairedDifference(float(auc_a), float(auc_b), difference, max(-1.0, difference - half),
                            min(1.0, difference + half), p_value, level, "DeLong paired", se)
