"""Statistics: DeLong against the O(mn) structural components of DeLong et al. (1988) and the Hanley & McNeil (1982)
rating data, the bootstrap (stratification, BCa fallback, seeds, pairing), McNemar, the corrected resampled t-test,
non-inferiority verdicts, Holm's adjustment, the macro AUROC, thresholds, operating points and calibration, each
against hand computations or an independent implementation (sklearn, scipy)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from medtl3d.stats import (
    StatisticsError,
    Verdict,
    auroc,
    average_precision,
    bootstrap_ci,
    corrected_resampled_ttest,
    delong_auc_variance,
    delong_ci,
    delong_covariance,
    delong_paired_test,
    expected_calibration_error,
    holm_adjust,
    informative,
    macro_auroc,
    mcnemar_test,
    noninferiority,
    operating_point,
    paired_bootstrap_diff,
    reliability_bins,
    roc_curve,
    threshold_at,
)


# ---------------------------------------------------------------------------------------------------- DeLong
def delong_by_pairs(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) written out: the Mann-Whitney kernel over all m x n (positive, negative) pairs, the
    structural components as its row / column means, and their covariances summed explicitly."""
    positive, negative = y == 1, y == 0
    m, n = positive.sum(), negative.sum()
    v10, v01, auc = [], [], []
    for s in scores:
        x, z = s[positive][:, None], s[negative][None, :]
        psi = (x > z) + 0.5 * (x == z)
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        auc.append(psi.sum() / (m * n))
    k = len(scores)
    covariance = np.zeros((k, k))
    for r in range(k):
        for s in range(k):
            s10 = sum((v10[r][i] - auc[r]) * (v10[s][i] - auc[s]) for i in range(m)) / (m - 1)
            s01 = sum((v01[r][j] - auc[r]) * (v01[s][j] - auc[s]) for j in range(n)) / (n - 1)
            covariance[r, s] = s10 / m + s01 / n
    return np.array(auc), covariance


@pytest.mark.parametrize("seed", range(5))
def test_fast_delong_equals_the_pairwise_structural_components(seed):
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(5, 40)), int(rng.integers(5, 40))
    y = rng.permutation(np.r_[np.ones(m, int), np.zeros(n, int)])
    base = rng.normal(size=m + n) + y
    # rounded to one decimal: many ties within and across classes
    scores = [np.round(base, 1), np.round(base + rng.normal(size=m + n), 1), np.round(rng.normal(size=m + n), 1)]
    assert len(np.unique(scores[0])) < m + n
    auc, covariance = delong_covariance(y, *scores)
    expected_auc, expected_covariance = delong_by_pairs(y, scores)
    np.testing.assert_allclose(auc, expected_auc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(covariance, expected_covariance, rtol=0, atol=1e-10)
    for score, value in zip(scores, auc):
        assert value == pytest.approx(roc_auc_score(y, score), abs=1e-12) == auroc(y, score)
    # the paired test: variance of the difference from the same covariance
    test = delong_paired_test(y, scores[0], scores[1])
    variance = expected_covariance[0, 0] + expected_covariance[1, 1] - 2 * expected_covariance[0, 1]
    assert test.difference == pytest.approx(expected_auc[0] - expected_auc[1], abs=1e-12)
    assert test.se == pytest.approx(math.sqrt(variance), abs=1e-10)
    z = test.difference / math.sqrt(variance)
    assert test.p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), abs=1e-10)
    assert test.low == pytest.approx(test.difference - 1.959963984540054 * test.se, abs=1e-10)
    assert delong_auc_variance(y, scores[2])[1] == pytest.approx(expected_covariance[2, 2], abs=1e-10)


def test_delong_on_the_hanley_mcneil_rating_data():
    """Hanley & McNeil (1982, Radiology 143:29-36, Table 1): 109 CT images rated 1 (definitely normal) to 5
    (definitely abnormal); 58 normal rated 33/6/6/11/2, 51 abnormal rated 3/2/2/11/33. Published area: 0.893.

    Hand computation of the DeLong variance. Each abnormal image's component V10 is the share of normal images
    rated below it plus half the share rated equal: ratings 1..5 give 16.5/58, 36/58, 42/58, 50.5/58, 57/58.
    Each normal image's V01 is the share of abnormal images rated above plus half those equal: 49.5/51, 47/51,
    45/51, 38.5/51, 16.5/51. The area is (3*16.5 + 2*36 + 2*42 + 11*50.5 + 33*57) / (58*51) = 2642/2958. With
    S10 = sum_r count_r (V10_r - A)^2 / 50 and S01 = sum_r count_r (V01_r - A)^2 / 57 (exact fractions below),
    var = S10/51 + S01/58 = 17089/18102960 = 0.00094399, SE 0.0307 (Hanley & McNeil's approximation gives 0.032).
    """
    y = np.r_[np.zeros(58, int), np.ones(51, int)]
    ratings = np.r_[np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2]), np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])]
    area = Fraction(2642, 2958)
    v10 = dict(zip(range(1, 6), (Fraction(33, 116), Fraction(36, 58), Fraction(42, 58), Fraction(101, 116),
                                 Fraction(57, 58))))
    v01 = dict(zip(range(1, 6), (Fraction(99, 102), Fraction(47, 51), Fraction(45, 51), Fraction(77, 102),
                                 Fraction(33, 102))))
    abnormal, normal = dict(zip(range(1, 6), (3, 2, 2, 11, 33))), dict(zip(range(1, 6), (33, 6, 6, 11, 2)))
    s10 = sum(abnormal[r] * (v10[r] - area) ** 2 for r in v10) / 50
    s01 = sum(normal[r] * (v01[r] - area) ** 2 for r in v01) / 57
    assert s10 / 51 + s01 / 58 == Fraction(17089, 18102960)

    auc, variance = delong_auc_variance(y, ratings)
    assert round(auc, 3) == 0.893  # the published area
    assert auc == pytest.approx(float(area), abs=1e-15)
    assert variance == pytest.approx(17089 / 18102960, abs=1e-15)
    interval = delong_ci(y, ratings)
    assert interval.se == pytest.approx(0.0307244, abs=1e-7)
    assert (interval.low, interval.high) == pytest.approx((auc - 1.959964 * interval.se, auc + 1.959964 * interval.se))


def test_identical_scores_give_no_difference_and_bad_input_is_refused():
    rng = np.random.default_rng(3)
    y, s = np.r_[np.ones(10, int), np.zeros(10, int)], rng.normal(size=20)
    same = delong_paired_test(y, s, s)
    assert (same.difference, same.se, same.p_value) == (0.0, 0.0, 1.0)
    with pytest.raises(StatisticsError, match="at least 2 positive"):
        delong_ci(np.r_[1, 0, 0, 0], np.arange(4.0))
    with pytest.raises(StatisticsError, match="0/1 or booleans"):
        delong_ci(np.r_[1, 2, 0, 0], np.arange(4.0))
    with pytest.raises(StatisticsError, match="non-finite"):
        delong_ci(y, np.r_[s[:-1], np.nan])
    with pytest.raises(StatisticsError, match="one score per case"):
        delong_paired_test(y, s, s[:-1])


# ---------------------------------------------------------------------------------------------------- bootstrap
def _binormal(rng, m: int, n: int, separation: float = 1.0):
    y = np.r_[np.ones(m, int), np.zeros(n, int)]
    return y, rng.normal(size=m + n) + separation * y


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible():
    y, s = _binormal(np.random.default_rng(4), 40, 60)
    first = bootstrap_ci(auroc, y, s, n_resamples=400, seed=1)
    assert first.estimate == auroc(y, s)
    assert first.low < first.estimate < first.high and first.method.startswith("bootstrap BCa, stratified")
    assert bootstrap_ci(auroc, y, s, n_resamples=400, seed=1) == first
    assert bootstrap_ci(auroc, y, s, n_resamples=400, seed=2).low != first.low
    # the bootstrap standard error estimates the same quantity as DeLong's
    assert first.se == pytest.approx(delong_ci(y, s).se, rel=0.2)


def test_stratified_resampling_keeps_class_counts_and_falls_back_when_bca_is_undefined():
    y = np.r_[np.ones(7, int), np.zeros(13, int)]
    seen: list[tuple[int, int]] = []

    def prevalence(labels, _scores):
        seen.append((int(labels.sum()), labels.size))
        return labels.mean()

    stratified = bootstrap_ci(prevalence, y, np.zeros(20), n_resamples=200, seed=0)
    resamples = [counts for counts in seen if counts[1] == 20]  # the others are BCa's leave-one-out jackknife
    assert set(resamples) == {(7, 20)} and len(resamples) >= 200
    assert (stratified.low, stratified.high) == (0.35, 0.35)  # every resample has the same prevalence
    free = bootstrap_ci(prevalence, y, np.zeros(20), n_resamples=200, seed=0, stratified=False)
    assert free.low < 0.35 < free.high and "stratified" not in free.method
    # perfectly separated classes: AUROC 1 in every resample and every jackknife sample, BCa is undefined (0 / 0)
    separated = bootstrap_ci(auroc, y, y + 0.5, n_resamples=100)
    assert (separated.low, separated.high) == (1.0, 1.0) and "percentile (BCa undefined" in separated.method


def test_per_case_values_bootstrap_without_labels():
    dice = np.random.default_rng(5).beta(8, 2, size=30)
    interval = bootstrap_ci(np.mean, None, dice, n_resamples=500, method="percentile", seed=3)
    assert interval.estimate == pytest.approx(dice.mean())
    # the percentile interval of the resampled means, drawn the way scipy draws them (one integers() call)
    index = np.random.default_rng(3).integers(0, 30, size=(500, 30))
    assert (interval.low, interval.high) == pytest.approx(tuple(np.percentile(dice[index].mean(1), [2.5, 97.5])))


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(6)
    y, good = _binormal(rng, 50, 50, separation=2.0)
    poor = good + 2.0 * rng.normal(size=100)
    better = paired_bootstrap_diff(auroc, y, good, poor, n_resamples=500, seed=0)
    assert better.difference == pytest.approx(auroc(y, good) - auroc(y, poor))
    assert (better.estimate_a, better.estimate_b) == (auroc(y, good), auroc(y, poor))
    assert 0 < better.low < better.difference < better.high and better.p_value == pytest.approx(2 / 501)
    delong = delong_paired_test(y, good, poor)
    assert better.se == pytest.approx(delong.se, rel=0.25)
    same = paired_bootstrap_diff(auroc, y, good, good.copy(), n_resamples=100, seed=0)
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    dice_a, dice_b = rng.beta(8, 2, size=25), rng.beta(8, 2, size=25)
    per_case = paired_bootstrap_diff(np.mean, None, dice_a, dice_b, n_resamples=300, seed=0)
    assert per_case.difference == pytest.approx((dice_a - dice_b).mean())
    assert per_case.low < per_case.difference < per_case.high


# ---------------------------------------------------------------------------------------------------- tests
def test_mcnemar_exact_and_chi_square_against_hand_values():
    # 3 cases right by a only, 9 by b only, 20 by both, 4 by neither: 12 discordant < 25, exact binomial
    a = np.r_[np.ones(3), np.zeros(9), np.ones(20), np.zeros(4)].astype(bool)
    b = np.r_[np.zeros(3), np.ones(9), np.ones(20), np.zeros(4)].astype(bool)
    small = mcnemar_test(a, b)
    # P(X <= 3 | Bin(12, 1/2)) = (1 + 12 + 66 + 220) / 4096, doubled
    assert small.p_value == pytest.approx(2 * 299 / 4096, abs=1e-12)
    assert small.p_value == pytest.approx(stats.binomtest(3, 12).pvalue, abs=1e-12)
    assert (small.only_a_correct, small.only_b_correct) == (3, 9) and small.method.startswith("exact binomial")
    assert (small.accuracy_a, small.accuracy_b, small.cases) == (23 / 36, 29 / 36, 36)
    # 30 vs 12 discordant: chi-square (|30 - 12| - 1)^2 / 42 = 289/42, 1 df: p = erfc(sqrt(x / 2))
    a = np.r_[np.ones(30), np.zeros(12), np.ones(50)].astype(bool)
    b = np.r_[np.zeros(30), np.ones(12), np.ones(50)].astype(bool)
    large = mcnemar_test(a, b)
    assert large.statistic == pytest.approx(289 / 42) and large.method.startswith("chi-square with continuity")
    assert large.p_value == pytest.approx(math.erfc(math.sqrt(289 / 84)), abs=1e-12)
    assert mcnemar_test(a, a).p_value == 1.0
    with pytest.raises(StatisticsError, match="one length"):
        mcnemar_test(a, a[:-1])


def test_corrected_resampled_ttest_against_hand_computation():
    # J = 5 differences, mean 0.02, sample variance (1 + 1 + 0 + 4 + 4) e-4 / 4 = 2.5e-4;
    # correction 1/5 + 20/80 = 0.45: se = sqrt(0.45 * 2.5e-4) = 0.0106066, t = 1.885618, 4 degrees of freedom
    result = corrected_resampled_ttest([0.01, 0.03, 0.02, 0.04, 0.00], n_train=80, n_test=20)
    assert (result.runs, result.df, result.correction) == (5, 4, pytest.approx(0.45))
    assert result.mean_difference == pytest.approx(0.02)
    assert result.se == pytest.approx(math.sqrt(0.45 * 2.5e-4), rel=1e-12)
    assert result.statistic == pytest.approx(0.02 / math.sqrt(0.45 * 2.5e-4), rel=1e-12)
    assert result.p_value == pytest.approx(2 * stats.t.sf(0.02 / math.sqrt(1.125e-4), 4), rel=1e-12)
    assert result.p_value == pytest.approx(0.1324, abs=1e-4)  # t = 1.886 on 4 df, from a t table
    # the naive t-test (scipy) has the same numerator and the variance s^2 / J: t shrinks by sqrt(0.2 / 0.45)
    naive = stats.ttest_1samp([0.01, 0.03, 0.02, 0.04, 0.00], 0.0)
    assert result.statistic == pytest.approx(naive.statistic * math.sqrt(0.2 / 0.45), rel=1e-12)
    assert result.p_value > naive.pvalue
    half = stats.t.ppf(0.975, 4) * result.se
    assert (result.low, result.high) == pytest.approx((0.02 - half, 0.02 + half))
    with pytest.raises(StatisticsError, match="at least 2"):
        corrected_resampled_ttest([0.1], 10, 5)


@pytest.mark.parametrize("low, high, higher_is_better, verdict", [
    (-0.01, 0.03, True, Verdict.NON_INFERIOR),  # worse by at most 0.01 < margin 0.02
    (0.005, 0.04, True, Verdict.SUPERIOR),
    (-0.06, -0.03, True, Verdict.INFERIOR),  # worse by more than the margin everywhere
    (-0.04, 0.01, True, Verdict.INCONCLUSIVE),  # the interval straddles -margin
    (-0.02, 0.01, True, Verdict.INCONCLUSIVE),  # touching -margin is not enough
    (-0.01, 0.015, False, Verdict.NON_INFERIOR),  # e.g. calibration error: larger is worse, up by at most 0.015
    (0.03, 0.05, False, Verdict.INFERIOR),
    (-0.05, -0.01, False, Verdict.SUPERIOR),
])
def test_noninferiority_verdicts(low, high, higher_is_better, verdict):
    assert noninferiority(low, high, 0.02, higher_is_better=higher_is_better) is verdict


def test_zero_width_interval_gives_no_verdict_unless_exact():
    """Every run gave the same difference: no spread, no verdict (the rule of the search, study and compare)."""
    assert not informative(-0.005, -0.005) and not informative(None, 0.1) and informative(-0.01, 0.0)
    for point in (0.01, -0.005, -0.05, 0.0):
        assert noninferiority(point, point, 0.02) is Verdict.INCONCLUSIVE
    # a case-level interval that measured the difference exactly (a run compared with itself) keeps its reading
    assert noninferiority(0.0, 0.0, 0.02, exact=True) is Verdict.NON_INFERIOR
    assert noninferiority(-0.05, -0.05, 0.02, exact=True) is Verdict.INFERIOR
    constant = corrected_resampled_ttest([-0.005] * 4, 20, 10)
    assert constant.low == constant.high and noninferiority(constant.low, constant.high, 0.02) is Verdict.INCONCLUSIVE


def test_noninferiority_refuses_a_bad_margin_or_interval():
    with pytest.raises(StatisticsError, match="margin"):
        noninferiority(-0.01, 0.01, 0.0)
    with pytest.raises(StatisticsError, match="low <= high"):
        noninferiority(0.01, -0.01, 0.02)


# ---------------------------------------------------------------------------------------------------- thresholds
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])


def test_roc_curve_matches_sklearn_with_ties():
    rng = np.random.default_rng(8)
    y, s = rng.integers(0, 2, size=60), np.round(rng.normal(size=60), 1)
    fpr, tpr, thresholds = roc_curve(y, s)
    expected = sklearn_roc_curve(y, s, drop_intermediate=False)
    for ours, theirs in zip((fpr, tpr, thresholds), expected):
        np.testing.assert_allclose(ours, theirs)


def test_threshold_rules_on_a_constructed_case():
    # threshold 0.7: sensitivity 3/4, specificity 1 (J = 0.75); 0.4: 1 and 3/4 (J = 0.75): the higher wins the tie
    youden = threshold_at(Y, SCORES)
    assert (youden.threshold, youden.rule, youden.sensitivity, youden.specificity) == (0.7, "youden", 0.75, 1.0)
    full = threshold_at(Y, SCORES, target_sensitivity=1.0)
    assert (full.threshold, full.rule, full.sensitivity, full.specificity) == (0.4, "sensitivity >= 1", 1.0, 0.75)
    assert threshold_at(Y, SCORES, target_sensitivity=0.5).threshold == 0.8
    with pytest.raises(StatisticsError, match="target_sensitivity"):
        threshold_at(Y, SCORES, target_sensitivity=0.0)


def test_operating_point_counts_and_rates():
    point = operating_point(Y, SCORES, 0.65)  # called positive: 0.7, 0.8, 0.9 (all positives); 0.4 missed
    assert (point.true_positives, point.false_positives, point.true_negatives, point.false_negatives) == (3, 0, 4, 1)
    assert (point.sensitivity, point.specificity, point.ppv, point.npv) == (0.75, 1.0, 1.0, 0.8)
    nothing = operating_point(Y, SCORES, 0.95)
    assert math.isnan(nothing.ppv) and nothing.sensitivity == 0.0 and nothing.npv == 0.5


def test_expected_calibration_error_on_a_constructed_case():
    # ten cases at 0.15 with one positive (0.05 off), ten at 0.85 with six (0.25 off): 0.5 * 0.05 + 0.5 * 0.25
    y = np.r_[1, np.zeros(9, int), np.ones(6, int), np.zeros(4, int)]
    p = np.r_[np.full(10, 0.15), np.full(10, 0.85)]
    assert expected_calibration_error(y, p) == pytest.approx(0.15, abs=1e-12)
    bins = reliability_bins(y, p, n_bins=10)
    assert bins.counts.tolist() == [0, 10, 0, 0, 0, 0, 0, 0, 10, 0]
    assert bins.observed_frequency[[1, 8]] == pytest.approx([0.1, 0.6]) and np.isnan(bins.mean_predicted[0])
    # a probability on an edge belongs to the bin below it (right-closed bins, Guo et al. 2017)
    assert reliability_bins([0, 1, 1], [0.0, 0.2, 1.0], n_bins=10).counts.tolist() == [1, 1] + [0] * 7 + [1]
    with pytest.raises(StatisticsError, match=r"\[0, 1\]"):
        expected_calibration_error(y, p + 0.2)


def test_reliability_bins_match_sklearn_calibration_curve():
    rng = np.random.default_rng(9)
    p = rng.uniform(size=300)
    y = (rng.uniform(size=300) < p**1.5).astype(int)
    p[:5] = [0.0, 0.2, 0.3, 0.7, 1.0]  # on or next to bin edges
    bins = reliability_bins(y, p, n_bins=10)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = bins.counts > 0
    np.testing.assert_allclose(bins.observed_frequency[filled], observed)
    np.testing.assert_allclose(bins.mean_predicted[filled], predicted)
    expected = (bins.counts[filled] * np.abs(observed - predicted)).sum() / 300
    assert expected_calibration_error(y, p) == pytest.approx(expected, abs=1e-12)


def test_average_precision_by_hand_and_against_sklearn():
    # ranked 1, 0, 1, 0: precision 1 at recall 1/2, 2/3 at recall 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6, abs=1e-15)
    # a tie of one positive and one negative at the top is one step: precision 1/2 at recall 1/2
    assert average_precision([1, 0, 1, 0], [0.9, 0.9, 0.7, 0.1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    rng = np.random.default_rng(3)
    for trial in range(50):
        y = rng.integers(0, 2, 30)
        y[:2] = (0, 1)
        scores = rng.integers(0, 6, 30) / 5 if trial % 2 else rng.uniform(size=30)  # with and without ties
        assert average_precision(y, scores) == pytest.approx(average_precision_score(y, scores), abs=1e-12)


def test_holm_adjust_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running maximum 0.02, 0.03, 0.06, 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and holm_adjust([0.2]) == pytest.approx([0.2])
    with pytest.raises(StatisticsError, match=r"p-values must lie in \[0, 1\]"):
        holm_adjust([0.1, 1.5])


def test_macro_auroc_against_sklearn_multiclass_and_multilabel():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 60)
    scores = rng.dirichlet(np.ones(4), 60) + 0.3 * np.eye(4)[y]
    assert macro_auroc(y, scores) == pytest.approx(roc_auc_score(y, scores / scores.sum(1, keepdims=True),
                                                                 multi_class="ovr"), abs=1e-12)
    flags = (rng.uniform(size=(60, 3)) < 0.4).astype(int)
    ties = rng.integers(0, 5, (60, 3)) / 4 + 0.2 * flags  # with ties
    assert macro_auroc(flags, ties) == pytest.approx(roc_auc_score(flags, ties, average="macro"), abs=1e-12)
    flags[:, 1] = 1  # a label on every case has no AUROC: averaged over labels 0 and 2 only
    assert macro_auroc(flags, ties) == pytest.approx(np.mean([roc_auc_score(flags[:, k], ties[:, k]) for k in (0, 2)]))
    assert macro_auroc(flags, ties, [2]) == pytest.approx(roc_auc_score(flags[:, 2], ties[:, 2]))
    with pytest.raises(StatisticsError, match="no class has both"):
        macro_auroc(np.ones((5, 2)), np.zeros((5, 2)))
