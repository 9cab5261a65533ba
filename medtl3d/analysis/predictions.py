"""Comparisons of trained models' predictions: prediction similarity and feature-reuse share.

- **Prediction similarity** (Juodelyte et al. 2023, "Revisiting hidden representations"): the share of cases on
  which two models are both right or both wrong. Two independent classifiers with accuracies ``a1`` and ``a2`` agree
  that often by chance with probability ``a1*a2 + (1-a1)*(1-a2)``; the published code used ``a1**2 + (1-a1)**2``
  (the first model's accuracy twice), which is wrong whenever the accuracies differ.
- **Feature-reuse share** (Matsoukas et al. 2022): how much of the gain of weight transfer (WT) over random init
  (RI) survives when only the weight statistics are transferred (ST): ``(WT - ST) / (WT - RI)`` is the part of the
  gain that needs the actual features.

Plain counting on label vectors; written here because no library defines these two quantities.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import AnalysisError
from ._registry import register_analysis

METRICS = ("accuracy", "auroc")


def batch_images(batch) -> torch.Tensor:
    """The image tensor of a batch: a tensor, an ``(image, label, ...)`` tuple, or a dict with ``image``."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise AnalysisError(f"batch dict has no 'image' key (keys: {', '.join(map(str, batch))})")
        return batch["image"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def batch_targets(batch) -> torch.Tensor:
    """The labels of an ``(image, label, ...)`` tuple or of a dict with ``label``."""
    if isinstance(batch, dict) and "label" in batch:
        return torch.as_tensor(batch["label"])
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return torch.as_tensor(batch[1])
    raise AnalysisError("batches need labels: an (image, label) pair or a dict with 'label'")


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` (eval mode, its own device) over labelled batches: ``(outputs (N, C), targets (N,))``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    try:
        for batch in batches:
            outputs.append(model(batch_images(batch).to(device)).float().cpu())
            targets.append(batch_targets(batch).reshape(-1).long().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        raise AnalysisError("no batches to evaluate")
    scores = torch.cat(outputs)
    return scores.reshape(scores.shape[0], -1).numpy(), torch.cat(targets).numpy()


def metric_value(outputs, targets, metric: str = "accuracy") -> float:
    """``accuracy`` or ``auroc`` of logits ``(N, C)`` (C = 1: one binary logit) against integer targets.

    AUROC is binary for one logit or two classes, else macro one-vs-rest (torchmetrics).
    """
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    scores = torch.as_tensor(np.asarray(outputs, dtype=np.float32))
    scores = scores.reshape(scores.shape[0], -1)
    y = torch.as_tensor(np.asarray(targets)).long().reshape(-1)
    if metric == "accuracy":
        return float((torch.as_tensor(predicted_labels(scores.numpy())) == y).float().mean())
    if metric != "auroc":
        raise AnalysisError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if scores.shape[1] == 1:
        return float(binary_auroc(torch.sigmoid(scores[:, 0]), y))
    probabilities = torch.softmax(scores, dim=1)
    if scores.shape[1] == 2:
        return float(binary_auroc(probabilities[:, 1], y))
    return float(multiclass_auroc(probabilities, y, num_classes=scores.shape[1], average="macro"))


def predicted_labels(outputs, threshold: float = 0.5, logits: bool = True) -> np.ndarray:
    """Class labels from model outputs: argmax of ``(N, C>1)`` scores; for ``(N,)``/``(N, 1)`` binary outputs,
    ``sigmoid(output) >= threshold`` (``logits=True``) or ``output >= threshold`` (probabilities)."""
    scores = np.asarray(outputs, dtype=np.float64)
    if scores.ndim == 2 and scores.shape[1] > 1:
        return scores.argmax(axis=1)
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.ndim != 1:
        raise AnalysisError(f"outputs must be (N,), (N, 1) or (N, C) scores, got shape {scores.shape}")
    if logits:
        scores = 1.0 / (1.0 + np.exp(-scores))
    return (scores >= threshold).astype(np.int64)


def _labels(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] > 1:
        return array.argmax(axis=1)
    array = array.reshape(-1) if array.ndim == 2 and array.shape[1] == 1 else array
    if array.ndim != 1:
        raise AnalysisError(f"{name} must be a vector of class labels (or (N, C) scores), got shape {array.shape}")
    if array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise AnalysisError(
            f"{name} holds non-integer values: pass class labels (see predicted_labels() to threshold scores)"
        )
    return array.astype(np.int64)


def chance_agreement(accuracy_a: float, accuracy_b: float) -> float:
    """Probability that two independent classifiers are both right or both wrong: a1*a2 + (1-a1)*(1-a2)."""
    return accuracy_a * accuracy_b + (1.0 - accuracy_a) * (1.0 - accuracy_b)


@register_analysis("predictions", "similarity")
def prediction_similarity(predictions_a, predictions_b, targets) -> dict:
    """Agreement of two models on the same cases, with its chance baseline.

    Returns ``cases, accuracy_a, accuracy_b, both_right, both_wrong, agreement`` (= both right + both wrong),
    ``chance`` (a1*a2 + (1-a1)*(1-a2)), ``excess`` (agreement - chance) and ``same_prediction`` (identical labels,
    which differs from agreement when there are more than two classes).
    """
    a = _labels(predictions_a, "predictions_a")
    b = _labels(predictions_b, "predictions_b")
    y = _labels(targets, "targets")
    if not len(a) == len(b) == len(y):
        raise AnalysisError(f"predictions_a, predictions_b and targets differ in length: {len(a)}, {len(b)}, {len(y)}")
    if len(y) == 0:
        raise AnalysisError("prediction similarity needs at least one case")
    right_a, right_b = a == y, b == y
    accuracy_a, accuracy_b = float(right_a.mean()), float(right_b.mean())
    both_right = float((right_a & right_b).mean())
    both_wrong = float((~right_a & ~right_b).mean())
    agreement = both_right + both_wrong
    chance = chance_agreement(accuracy_a, accuracy_b)
    return {
        "cases": int(len(y)),
        "accuracy_a": accuracy_a,
        "accuracy_b": accuracy_b,
        "both_right": both_right,
        "both_wrong": both_wrong,
        "agreement": agreement,
        "chance": chance,
        "excess": agreement - chance,
        "same_prediction": float((a == b).mean()),
    }


@register_analysis("predictions", "feature_reuse")
def feature_reuse(wt: float, st: float, ri: float) -> dict:
    """Feature-reuse share ``(WT - ST) / (WT - RI)`` from one metric (higher = better) of the three inits."""
    values = {"wt": float(wt), "st": float(st), "ri": float(ri)}
    if not all(np.isfinite(v) for v in values.values()):
        raise AnalysisError(f"feature reuse needs finite metrics, got {values}")
    if values["wt"] == values["ri"]:
        raise AnalysisError(
            f"feature reuse is undefined when WT == RI (both {values['wt']}): transfer brought no gain to share out"
        )
    return {**values, "gain": values["wt"] - values["ri"],
            "feature_reuse": (values["wt"] - values["st"]) / (values["wt"] - values["ri"])}
