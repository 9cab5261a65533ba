"""Evaluation metrics against hand-computed values, degenerate inputs, and window -> series aggregation."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch

from medtl3d.engine import aggregate_series, classification_metrics, segmentation_metrics
from medtl3d.errors import TrainingError


def _pairwise_auc(scores, positive):
    """AUROC as the share of (positive, negative) pairs ranked correctly, ties counting 1/2 (Mann-Whitney)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg))
    return wins / (len(pos) * len(neg))


def _kappa(confusion):
    confusion = np.asarray(confusion, dtype=float)
    n = confusion.sum()
    observed = np.trace(confusion) / n
    expected = (confusion.sum(0) * confusion.sum(1)).sum() / n**2
    return (observed - expected) / (1 - expected)


def test_binary_metrics_match_hand_computed_values():
    probs = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2]
    labels = [0, 0, 1, 1, 1, 0]
    m = classification_metrics(probs, labels, "binary")
    # positives 0.35, 0.8, 0.7 vs negatives 0.1, 0.4, 0.2: 8 of 9 pairs ranked right (0.35 < 0.4)
    assert m["auroc"] == pytest.approx(8 / 9, abs=1e-6)
    # ranked: .8(+) .7(+) .4(-) .35(+) .2 .1 -> AP = (1/1 + 2/2 + 3/4) / 3
    assert m["auprc"] == pytest.approx((1 + 1 + 0.75) / 3, abs=1e-6)
    # threshold 0.5: predictions 0 0 0 1 1 0 -> TP 2, FN 1, TN 3, FP 0
    assert m["accuracy"] == pytest.approx(5 / 6, abs=1e-6)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1), abs=1e-6)
    assert m["kappa"] == pytest.approx(_kappa([[3, 0], [1, 2]]), abs=1e-6)
    assert m["kappa"] == pytest.approx(2 / 3, abs=1e-6)
    # (N, 1) probabilities are the same thing, and the threshold moves the decisions only
    assert classification_metrics(torch.tensor(probs)[:, None], labels, "binary") == m
    low = classification_metrics(probs, labels, "binary", threshold=0.38)  # 0.35 now missed, 0.4 a false alarm
    assert low["auroc"] == m["auroc"] and low["accuracy"] == pytest.approx(4 / 6, abs=1e-6)


def test_multiclass_metrics_are_one_vs_rest_macro_and_kappa_from_the_confusion_matrix():
    probs = torch.tensor([
        [0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1],
        [0.1, 0.3, 0.6], [0.2, 0.7, 0.1], [0.6, 0.1, 0.3], [0.3, 0.3, 0.4],
    ])
    labels = [0, 1, 2, 1, 2, 1, 0, 0]
    m = classification_metrics(probs, labels, "multiclass")
    aucs = [_pairwise_auc(probs[:, c].tolist(), [y == c for y in labels]) for c in range(3)]
    assert m["auroc"] == pytest.approx(sum(aucs) / 3, abs=1e-6)
    predicted = probs.argmax(1).tolist()  # 0 1 2 0 2 1 0 2
    confusion = np.zeros((3, 3))
    for y, p in zip(labels, predicted):
        confusion[y, p] += 1
    assert m["accuracy"] == pytest.approx(np.trace(confusion) / 8, abs=1e-6)  # 6/8
    assert m["kappa"] == pytest.approx(_kappa(confusion), abs=1e-6)
    f1 = [2 * confusion[c, c] / (confusion[c, :].sum() + confusion[:, c].sum()) for c in range(3)]
    assert m["f1"] == pytest.approx(sum(f1) / 3, abs=1e-6)


def test_multilabel_metrics_are_label_macro_averages():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.3, 0.8], [0.2, 0.4], [0.7, 0.1], [0.4, 0.6]])
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0], [0, 0], [1, 1]])
    m = classification_metrics(probs, labels, "multilabel")
    aucs = [_pairwise_auc(probs[:, k].tolist(), labels[:, k].tolist()) for k in range(2)]
    assert m["auroc"] == pytest.approx(np.mean(aucs), abs=1e-6)
    hard = (probs > 0.5).long()
    assert m["accuracy"] == pytest.approx((hard == labels).float().mean().item(), abs=1e-6)
    kappas = []
    for k in range(2):
        confusion = np.zeros((2, 2))
        for y, p in zip(labels[:, k].tolist(), hard[:, k].tolist()):
            confusion[y, p] += 1
        kappas.append(_kappa(confusion))
    assert m["kappa"] == pytest.approx(np.mean(kappas), abs=1e-6)


def test_auroc_is_nan_with_a_warning_when_only_one_class_is_present():
    with pytest.warns(RuntimeWarning, match="auroc is undefined"):
        m = classification_metrics([0.2, 0.6, 0.9], [1, 1, 1], "binary")
    assert math.isnan(m["auroc"])
    assert m["auprc"] == pytest.approx(1.0)  # all positive: precision is 1 at every recall
    with pytest.warns(RuntimeWarning) as record:
        m = classification_metrics([0.2, 0.6, 0.9], [0, 0, 0], "binary")
    messages = " | ".join(str(w.message) for w in record)
    assert "auroc is undefined" in messages and "auprc is undefined" in messages
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"])
    assert m["accuracy"] == pytest.approx(1 / 3, abs=1e-6)  # 0.6 and 0.9 are false alarms


def test_multiclass_auroc_averages_over_the_classes_that_are_defined():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    labels = [0, 1, 0, 1]  # class 2 never occurs
    with pytest.warns(RuntimeWarning, match=r"column\(s\) \[2\]"):
        m = classification_metrics(probs, labels, "multiclass")
    assert m["auroc"] == pytest.approx(1.0)


def test_bad_metric_inputs_name_the_row_or_shape():
    with pytest.raises(TrainingError, match="row 2 is 2"):
        classification_metrics([0.1, 0.2, 0.3], [0, 1, 2], "binary")
    with pytest.raises(TrainingError, match=r"row 1 is 3.*\[0, 2\]"):
        classification_metrics(torch.full((2, 3), 1 / 3), [0, 3], "multiclass")
    with pytest.raises(TrainingError, match="3 probability rows but 2 labels"):
        classification_metrics([0.1, 0.2, 0.3], [0, 1], "binary")
    with pytest.raises(TrainingError, match="not a classification task"):
        classification_metrics([0.1], [0], "segmentation")
    with pytest.raises(TrainingError, match="empty"):
        classification_metrics([], [], "binary")


def test_segmentation_dice_and_jaccard_of_known_masks_exclude_background_and_empty_classes():
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    label = torch.zeros(2, 4, 4, dtype=torch.long)
    pred[0, 0, :4] = 1          # 4 pixels of class 1
    label[0, 0, 1:4] = 1        # 3 of them right ...
    label[0, 1, :3] = 1         # ... and 3 missed: |label| = 6
    pred[0, 3, 3] = 2           # class 2 predicted once, absent from the label -> Dice 0 (not skipped)
    pred[1, 2:, 2:] = 2         # case 2: class 2 exact (4 pixels); class 1 empty in both -> ignored
    label[1, 2:, 2:] = 2
    m = segmentation_metrics(pred, label, num_classes=3)
    dice = [2 * 3 / (4 + 6), 0.0, 1.0]
    jaccard = [3 / 7, 0.0, 1.0]
    assert m["dice"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert m["jaccard"] == pytest.approx(np.mean(jaccard), abs=1e-6)
    # channel-first (N, 1, H, W) maps are the same thing
    assert segmentation_metrics(pred[:, None], label[:, None], 3) == pytest.approx(m)
    with pytest.raises(TrainingError, match="integers in \\[0, 1\\]"):
        segmentation_metrics(pred, label, num_classes=2)


def test_aggregate_series_max_and_mean_keep_first_appearance_order():
    probs = torch.tensor([0.2, 0.9, 0.4, 0.1, 0.6])
    ids = ["s2", "s1", "s2", "s3", "s1"]
    order, high = aggregate_series(probs, ids, "max")
    assert order == ["s2", "s1", "s3"]
    assert high.tolist() == pytest.approx([0.4, 0.9, 0.1])
    _, mean = aggregate_series(probs, ids, "mean")
    assert mean.tolist() == pytest.approx([0.3, 0.75, 0.1])
    _, per_label = aggregate_series(torch.tensor([[0.1, 0.8], [0.5, 0.2]]), [7, 7], "max")
    assert per_label.shape == (1, 2) and per_label[0].tolist() == pytest.approx([0.5, 0.8])
    with pytest.raises(TrainingError, match="aggregation='median'"):
        aggregate_series(probs, ids, "median")
    with pytest.raises(TrainingError, match="4 series ids for 5"):
        aggregate_series(probs, ids[:4], "max")
