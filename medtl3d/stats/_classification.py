"""Binary classification at a threshold and calibration: AUROC, average precision, ROC points, a threshold chosen
by a recorded rule, sensitivity / specificity / PPV / NPV with their counts, and the expected calibration error with
the reliability diagram's bins."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ._checks import StatisticsError, binary_labels, case_scores, class_counts


def auroc(y_true, y_score) -> float:
    """AUROC as the Mann-Whitney statistic ``P(score+ > score-) + P(=) / 2`` (Hanley & McNeil 1982, Radiology
    143:29-36): for each positive, the negatives below it plus half those equal, counted by binary search in the
    sorted negatives (``O(N log N)``, fast enough to be the bootstrap's statistic)."""
    positives = binary_labels(y_true)
    m, n = class_counts(positives, 1, "AUROC")
    scores = case_scores(y_score, positives.size)
    negatives = np.sort(scores[~positives])
    below = np.searchsorted(negatives, scores[positives], side="left")
    not_above = np.searchsorted(negatives, scores[positives], side="right")
    return float((below.sum() + not_above.sum()) / (2.0 * m * n))


def macro_auroc(y_true, y_score, columns=None) -> float:
    """One-vs-rest AUROC averaged over classes (the unweighted "macro" mean of
    ``sklearn.metrics.roc_auc_score(multi_class="ovr")``, Provost & Domingos 2000): ``y_true`` holds class indices
    ``(N,)`` (multi-class) or 0/1 flags ``(N, K)`` (multi-label), ``y_score`` the ``(N, K)`` scores. ``columns``:
    the classes to average over (default every class with both positive and negative cases); fixing them keeps a
    bootstrap's statistic the same quantity in every resample."""
    scores = np.asarray(y_score, dtype=float)
    labels = np.asarray(y_true)
    if scores.ndim != 2 or labels.shape[0] != scores.shape[0] or labels.ndim not in (1, 2):
        raise StatisticsError(f"macro AUROC needs (N, K) scores and (N,) class indices or (N, K) flags, got "
                              f"shapes {labels.shape} and {scores.shape}")
    flags = labels if labels.ndim == 2 else labels[:, None] == np.arange(scores.shape[1])
    if columns is None:
        columns = [c for c in range(scores.shape[1]) if 0 < flags[:, c].sum() < flags.shape[0]]
    if not len(columns):
        raise StatisticsError("macro AUROC: no class has both positive and negative cases")
    return float(np.mean([auroc(flags[:, c], scores[:, c]) for c in columns]))


def roc_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` with one point per distinct score, thresholds descending, a case positive when
    ``score >= threshold``; the first point ``(0, 0)`` has threshold ``+inf`` (as ``sklearn.metrics.roc_curve``
    without dropping collinear points)."""
    positives = binary_labels(y_true)
    m, n = class_counts(positives, 1, "a ROC curve")
    scores = case_scores(y_score, positives.size)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], positives[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(sorted_scores)), scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_each]
    false_positives = last_of_each + 1 - true_positives
    return (np.r_[0.0, false_positives / n], np.r_[0.0, true_positives / m],
            np.r_[np.inf, sorted_scores[last_of_each]])


def average_precision(y_true, y_score) -> float:
    """AUPRC as average precision ``sum_k (R_k - R_(k-1)) P_k`` over the distinct thresholds, highest first: the
    step-wise area of ``sklearn.metrics.average_precision_score`` (no interpolation; Manning, Raghavan & Schuetze
    2008, ch. 8.4), from :func:`roc_curve`'s counts so that it is cheap enough to bootstrap."""
    positives = binary_labels(y_true)
    m, n = class_counts(positives, 1, "average precision")
    fpr, tpr, _ = roc_curve(positives, y_score)
    true_positives, false_positives = tpr[1:] * m, fpr[1:] * n
    precision = true_positives / (true_positives + false_positives)
    return float(np.sum(np.diff(tpr) * precision))


@dataclass(frozen=True)
class ThresholdChoice:
    """A decision threshold (positive when ``score >= threshold``), the rule that chose it and where it sits on the
    data it was chosen on."""

    threshold: float
    rule: str
    sensitivity: float
    specificity: float

    def as_dict(self) -> dict:
        return asdict(self)


def threshold_at(y_true, y_score, *, target_sensitivity: float | None = None) -> ThresholdChoice:
    """Choose a threshold on validation data, to be applied unchanged to the test data.

    Default: Youden's index, the threshold maximising ``sensitivity + specificity - 1`` (Youden 1950, Cancer
    3:32-35), the highest such threshold on a tie. With ``target_sensitivity``: the highest threshold whose
    sensitivity reaches the target, i.e. the best specificity that keeps it.
    """
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # the +inf point calls nothing positive
    if target_sensitivity is None:
        index, rule = int(np.argmax(tpr - fpr)), "youden"
    else:
        if not 0 < target_sensitivity <= 1:
            raise StatisticsError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        index, rule = int(np.argmax(tpr >= target_sensitivity)), f"sensitivity >= {target_sensitivity:g}"
    return ThresholdChoice(float(thresholds[index]), rule, float(tpr[index]), float(1.0 - fpr[index]))


@dataclass(frozen=True)
class OperatingPoint:
    """Counts and rates at one threshold; a rate whose denominator is 0 is NaN."""

    threshold: float
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int
    sensitivity: float
    specificity: float
    ppv: float
    npv: float

    def as_dict(self) -> dict:
        return asdict(self)


def _rate(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def operating_point(y_true, y_score, threshold: float) -> OperatingPoint:
    """Sensitivity, specificity, PPV and NPV (with the 2x2 counts) of "positive when ``score >= threshold``"."""
    positives = binary_labels(y_true)
    called = case_scores(y_score, positives.size) >= threshold
    tp, fp = int((called & positives).sum()), int((called & ~positives).sum())
    tn, fn = int((~called & ~positives).sum()), int((~called & positives).sum())
    return OperatingPoint(float(threshold), tp, fp, tn, fn, _rate(tp, tp + fn), _rate(tn, tn + fp),
                          _rate(tp, tp + fp), _rate(tn, tn + fn))


@dataclass(frozen=True)
class ReliabilityBins:
    """The reliability diagram: per equal-width bin of predicted probability, its case count, mean prediction
    and observed frequency of positives (NaN for an empty bin)."""

    edges: np.ndarray
    counts: np.ndarray
    mean_predicted: np.ndarray
    observed_frequency: np.ndarray


def reliability_bins(y_true, y_prob, n_bins: int = 10) -> ReliabilityBins:
    """Bin the predicted probabilities of the positive class into ``n_bins`` equal-width bins of [0, 1]: bin ``i``
    is ``(i/B, (i+1)/B]``, the first one closed, as in Guo et al. (2017) and
    ``sklearn.calibration.calibration_curve(strategy="uniform")``."""
    positives = binary_labels(y_true)
    probabilities = case_scores(y_prob, positives.size, "y_prob")
    if n_bins < 1:
        raise StatisticsError(f"n_bins must be >= 1, got {n_bins}")
    if probabilities.min(initial=0.0) < 0 or probabilities.max(initial=1.0) > 1:
        raise StatisticsError("y_prob must be probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges[1:-1], probabilities, side="left")
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, probabilities, n_bins) / counts
        observed = np.bincount(index, positives.astype(float), n_bins) / counts
    return ReliabilityBins(edges, counts, mean_predicted, observed)


def expected_calibration_error(y_true, y_prob, n_bins: int = 10) -> float:
    """ECE ``sum_b (n_b / N) |observed_b - mean_predicted_b|`` over the non-empty equal-width bins of the
    positive-class probability (Naeini, Cooper & Hauskrecht 2015, AAAI; Guo et al. 2017, ICML, eq. 3 uses the
    top-label confidence instead, which for two classes bins ``max(p, 1 - p)``)."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    filled = bins.counts > 0
    gaps = np.abs(bins.observed_frequency[filled] - bins.mean_predicted[filled])
    return float((bins.counts[filled] * gaps).sum() / bins.counts.sum())
