"""Case-level uncertainty of one evaluation: every metric with a 95% interval from resampling the test cases.

Binary classification: AUROC (stratified BCa bootstrap and DeLong), AUPRC and the expected calibration error
(bootstrap), and sensitivity / specificity / PPV / NPV / accuracy / F1 / Cohen's kappa at a threshold chosen on
validation data (:func:`choose_threshold`), never at a fixed 0.5: an untrained model that calls every case positive
can reach AUROC 0.78-0.96 and a flattering accuracy at 0.5. Multi-class and multi-label: the macro AUROC and each
class's one-vs-rest AUROC and AUPRC. Segmentation: mean Dice, Jaccard and HD95 over cases, each over the cases where
it is defined (HD95 in its rows' ``hd95_unit``, mm or px). The statistics are :mod:`medtl3d.stats`; this module
decides which interval goes with which metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import precision_recall_curve

from ..errors import EvaluationError
from ..stats import (StatisticsError, ThresholdChoice, auroc, average_precision, bootstrap_ci, delong_ci,
                     expected_calibration_error, macro_auroc, operating_point, reliability_bins, roc_curve, threshold_at)

SEGMENTATION_COLUMNS = ("dice", "jaccard", "hd95")
THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "kappa")


@dataclass
class CaseReport:
    """What :func:`case_report` found: one row per (metric, interval), the threshold and its operating point
    (binary), and the points of the curves to draw."""

    task: str
    cases: int
    metrics: list[dict]
    threshold: dict | None = None
    operating_point: dict | None = None
    curves: dict = field(default_factory=dict)


def binary_arrays(rows: Sequence[dict], what: str = "predictions") -> tuple[np.ndarray, np.ndarray]:
    """``(labels, positive-class probabilities)`` of binary prediction rows (``label``, ``probabilities``)."""
    try:
        labels = np.array([int(np.ravel(row["label"])[0]) for row in rows])
        scores = np.array([float(np.ravel(row["probabilities"])[0]) for row in rows])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise EvaluationError(f"{what}: binary rows need 'label' and 'probabilities' ({err})") from None
    return labels, scores


def multi_arrays(rows: Sequence[dict], task: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, scores)`` of multi-class / multi-label prediction rows: class indices (N,) or 0/1 flags (N, K),
    and the (N, K) probabilities."""
    try:
        scores = np.array([np.ravel(row["probabilities"]) for row in rows], dtype=float)
        labels = np.array([np.ravel(row["label"]) for row in rows]).astype(int)
    except (KeyError, TypeError, ValueError) as err:
        raise EvaluationError(f"{what}: {task} rows need a 'label' and one probability per class ({err})") from None
    classes = scores.shape[1] if scores.ndim == 2 else 0
    multiclass = task == "multiclass"
    fits = (labels.shape == (len(rows), 1 if multiclass else classes)
            and ((labels >= 0) & (labels < (classes if multiclass else 2))).all())
    if not classes or not fits:
        raise EvaluationError(f"{what}: {task} labels of shape {labels.shape} do not fit the probabilities' "
                              f"{scores.shape} (class indices for multiclass, 0/1 per label for multilabel)")
    return (labels[:, 0] if task == "multiclass" else labels), scores


def _at_threshold(name: str, threshold: float) -> Callable[[np.ndarray, np.ndarray], float]:
    """``metric(y, p)`` of "positive when ``p >= threshold``", from :func:`medtl3d.stats.operating_point`'s counts."""
    def metric(y, p) -> float:
        point = operating_point(y, p, threshold)
        tp, fp, tn, fn = point.true_positives, point.false_positives, point.true_negatives, point.false_negatives
        n = tp + fp + tn + fn
        if name == "accuracy":
            return (tp + tn) / n
        if name == "f1":
            return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
        if name == "kappa":  # Cohen (1960): (p_o - p_e) / (1 - p_e), p_e from the marginals
            chance = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
            return ((tp + tn) / n - chance) / (1 - chance) if chance < 1 else math.nan
        return getattr(point, name)
    return metric


def choose_threshold(val_rows: Sequence[dict] | None, *, target_sensitivity: float | None = None) -> ThresholdChoice:
    """The binary decision threshold, chosen on validation rows (Youden, or the highest threshold reaching
    ``target_sensitivity``); without validation rows, 0.5 with a rule that says it was not chosen on data."""
    if not val_rows:
        return ThresholdChoice(0.5, "fixed 0.5 (no validation data given: not chosen on data)", math.nan, math.nan)
    labels, scores = binary_arrays(val_rows, "validation predictions")
    try:
        chosen = threshold_at(labels, scores, target_sensitivity=target_sensitivity)
    except StatisticsError as err:
        raise EvaluationError(f"cannot choose a threshold on the validation data: {err}") from None
    return ThresholdChoice(chosen.threshold, f"{chosen.rule} on {labels.size} validation cases", chosen.sensitivity,
                           chosen.specificity)


class _Intervals:
    """Rows ``{metric, estimate, low, high, interval, cases}``: one bootstrap setting for every metric of a report."""

    def __init__(self, level: float, n_resamples: int, seed: int) -> None:
        self.options = dict(level=level, n_resamples=n_resamples, seed=seed)
        self.rows: list[dict] = []

    def add(self, name: str, metric: Callable, y, values, *, stratified: bool = True) -> None:
        cases = len(values)
        try:
            interval = bootstrap_ci(metric, y, values, stratified=stratified, **self.options)
        except StatisticsError as err:  # undefined on the data or on some resamples: the estimate without interval
            try:
                estimate = float(metric(values) if y is None else metric(y, values))
            except StatisticsError:
                estimate = None
            self.rows.append({"metric": name, "estimate": estimate, "low": None, "high": None,
                              "interval": f"none: {err}", "cases": cases})
            return
        self.rows.append({"metric": name, "estimate": interval.estimate, "low": interval.low, "high": interval.high,
                          "interval": interval.method, "cases": cases})

    def delong(self, name: str, y, p) -> None:
        try:
            interval = delong_ci(y, p, self.options["level"])
        except StatisticsError as err:
            self.rows.append({"metric": name, "estimate": None, "low": None, "high": None,
                              "interval": f"DeLong: none: {err}", "cases": len(p)})
            return
        self.rows.append({"metric": name, "estimate": interval.estimate, "low": interval.low, "high": interval.high,
                          "interval": "DeLong", "cases": len(p)})


def _binary(rows, threshold: ThresholdChoice, intervals: _Intervals) -> CaseReport:
    y, p = binary_arrays(rows)
    y = y.astype(bool)  # checked once here, not in every resample
    intervals.add("auroc", auroc, y, p)  # with one class only: rows saying why there is no value
    intervals.delong("auroc", y, p)
    intervals.add("auprc", average_precision, y, p)
    intervals.add("ece", expected_calibration_error, y, p)
    for name in THRESHOLD_METRICS:
        intervals.add(name, _at_threshold(name, threshold.threshold), y, p)
    point = operating_point(y, p, threshold.threshold).as_dict()
    if len(np.unique(y)) < 2:
        return CaseReport("binary", y.size, intervals.rows, threshold.as_dict(), point)
    fpr, tpr, _ = roc_curve(y, p)
    precision, recall, _ = precision_recall_curve(y, p)
    bins = reliability_bins(y, p)
    curves = {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
              "pr": {"recall": recall.tolist(), "precision": precision.tolist(), "prevalence": float(y.mean())},
              "reliability": {"edges": bins.edges.tolist(), "counts": bins.counts.tolist(),
                              "mean_predicted": bins.mean_predicted.tolist(),
                              "observed_frequency": bins.observed_frequency.tolist()}}
    return CaseReport("binary", y.size, intervals.rows, threshold.as_dict(), point, curves)


def _multi(rows, task: str, intervals: _Intervals, class_names: Sequence[str] | None) -> CaseReport:
    labels, scores = multi_arrays(rows, task, "predictions")
    onehot = np.eye(scores.shape[1], dtype=int)[labels] if task == "multiclass" else labels
    names = list(class_names or range(scores.shape[1]))
    columns = [c for c in range(scores.shape[1]) if 0 < onehot[:, c].sum() < len(rows)]

    def macro(index) -> float:
        return macro_auroc(onehot[index], scores[index], columns)

    # resample case indices; multiclass stratified by class, multilabel plain (its label sets are too many strata)
    strata = labels if task == "multiclass" else None
    intervals.add("auroc (macro)", (lambda y, index: macro(index)) if strata is not None else macro, strata,
                  np.arange(len(rows)), stratified=strata is not None)
    curves = {}
    for c in columns:
        y, p = onehot[:, c], scores[:, c]
        intervals.add(f"auroc [{names[c]}]", auroc, y, p)
        intervals.delong(f"auroc [{names[c]}]", y, p)
        intervals.add(f"auprc [{names[c]}]", average_precision, y, p)
        fpr, tpr, _ = roc_curve(y, p)
        curves[str(names[c])] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return CaseReport(task, len(rows), intervals.rows, curves={"roc_per_class": curves})


def _segmentation(rows, intervals: _Intervals) -> CaseReport:
    for name in SEGMENTATION_COLUMNS:
        values = np.array([row.get(name, math.nan) for row in rows], dtype=float)
        defined = values[np.isfinite(values)]  # the cases where it is defined ("cases" says how many)
        if defined.size:
            intervals.add(name, np.mean, None, defined)
        else:
            intervals.rows.append({"metric": name, "estimate": None, "low": None, "high": None,
                                   "interval": "none: no case defines it", "cases": 0})
    hd95 = next(row for row in intervals.rows if row["metric"] == "hd95")  # mm, or px where no spacing is known
    hd95["unit"] = "/".join(sorted({row.get("hd95_unit", "px") for row in rows}))
    return CaseReport("segmentation", len(rows), intervals.rows)


def case_report(rows: Sequence[dict], task: str, *, threshold: ThresholdChoice | None = None, level: float = 0.95,
                n_resamples: int = 2000, seed: int = 0, class_names: Sequence[str] | None = None) -> CaseReport:
    """Every metric of ``rows`` (an evaluation's per-case predictions) with its interval over cases.

    ``threshold`` (binary only) is applied unchanged; choose it on validation data with :func:`choose_threshold`.
    Bootstraps are stratified by class (classification) and reproducible from ``seed``.
    """
    if not rows:
        raise EvaluationError("no per-case predictions to report")
    intervals = _Intervals(level, n_resamples, seed)
    if task == "segmentation":
        return _segmentation(rows, intervals)
    if task == "binary":
        return _binary(rows, threshold or choose_threshold(None), intervals)
    return _multi(rows, task, intervals, class_names)
