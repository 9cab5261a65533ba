"""Evaluation metrics from collected probabilities / masks, and window-to-series aggregation.

Classification metrics come from ``torchmetrics.functional``; segmentation metrics from MONAI's ``compute_dice`` /
``compute_iou`` / ``compute_hausdorff_distance``. What is ours is the policy around them:

- AUROC and AUPRC are computed one-vs-rest per class (multiclass) or per label (multilabel) and macro-averaged.
  A class whose AUROC is undefined (only one of positive/negative present) or whose AUPRC is undefined (no
  positives) is left out of the mean with a warning; when no class is defined the metric is ``nan`` — never the
  silent 0 torchmetrics returns for a degenerate column.
- ``accuracy`` is the fraction of correct decisions (binary: ``p > threshold``; multiclass: arg-max; multilabel:
  per-label ``p > threshold``, averaged over labels). ``f1`` is macro over classes/labels, ``kappa`` is Cohen's
  kappa (multilabel: mean of the per-label kappas, which torchmetrics does not offer).
- Segmentation: Dice and Jaccard (and per case the 95th-percentile Hausdorff distance) with the background channel
  excluded, averaged over every (case, class) pair that is defined: a class absent from both prediction and label
  is skipped, a class predicted where the label has none scores 0 (the nnU-Net convention; MONAI's
  ``ignore_empty=True`` would skip such false positives). HD95 is in millimetres where the masks' files record
  their spacing (NIfTI, DICOM: :func:`mask_spacing` reads it off each case's affine after the preset's resizing),
  else in pixels/voxels of the grid the network saw (PNG/JPEG record none); :data:`HD95_UNITS` names the two.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.networks.utils import one_hot
from torchmetrics.functional import classification as tmf

from ..errors import TrainingError

CLASSIFICATION_TASKS = ("binary", "multiclass", "multilabel")
CLASSIFICATION_METRICS = ("auroc", "auprc", "accuracy", "f1", "kappa")
SEGMENTATION_METRICS = ("dice", "jaccard")
AGGREGATIONS = ("max", "mean")
HD95_UNITS = ("mm", "px")
#: ``meta["kind"]`` of the files whose affine is in millimetres (:func:`medtl3d.data.io.load_image`).
PHYSICAL_KINDS = ("nifti", "dicom")


def metric_range(name: str) -> tuple[float, float]:
    """The values metric ``name`` can take: Cohen's kappa lies in [-1, 1], every other metric here in [0, 1]."""
    return (-1.0, 1.0) if name == "kappa" else (0.0, 1.0)


def _as_tensor(values, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values) if not isinstance(values, torch.Tensor) else values.detach()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TrainingError(f"{name} cannot be read as a numeric array: {err}") from err
    tensor = tensor.cpu()
    return tensor.to(dtype) if dtype is not None else tensor


def _check_labels(labels: torch.Tensor, low: int, high: int, what: str) -> None:
    """Raise naming the first row whose label lies outside ``[low, high]`` (or is not an integer)."""
    bad = (labels < low) | (labels > high) | (labels != labels.round())
    if bad.any():
        row = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0]) if labels.ndim else 0
        value = labels[row].tolist() if labels.ndim else labels.item()
        raise TrainingError(f"label of row {row} is {value}; {what} labels must be integers in [{low}, {high}]")


def _per_column(fn, probs: torch.Tensor, targets: torch.Tensor, defined: torch.Tensor, metric: str) -> float:
    """Macro mean of ``fn`` over the columns where the metric is defined (warn about the others)."""
    columns = [c for c in range(probs.shape[1]) if defined[c]]
    undefined = [c for c in range(probs.shape[1]) if not defined[c]]
    if undefined:
        where = "the labels" if probs.shape[1] == 1 else f"class/label column(s) {undefined}"
        reason = "no positive" if metric == "auprc" else "a single class"
        warnings.warn(f"{metric} is undefined for {where} ({reason} present); "
                      + ("returning nan" if not columns else f"averaging over columns {columns} only"),
                      RuntimeWarning, stacklevel=3)
    if not columns:
        return math.nan
    return float(torch.stack([fn(probs[:, c], targets[:, c]) for c in columns]).mean())


def classification_metrics(probs, labels, task: str, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, AUPRC, accuracy, F1 and Cohen's kappa of predicted probabilities against labels.

    ``probs``: binary ``(N,)`` or ``(N, 1)`` positive-class probabilities; multiclass ``(N, C)`` class
    probabilities; multilabel ``(N, K)`` per-label probabilities. ``labels``: ``(N,)`` class indices (binary: 0/1),
    or ``(N, K)`` 0/1 for multilabel.
    """
    if task not in CLASSIFICATION_TASKS:
        raise TrainingError(f"task={task!r} is not a classification task; choose one of {CLASSIFICATION_TASKS}")
    probs = _as_tensor(probs, "probabilities", torch.float64)
    labels = _as_tensor(labels, "labels", torch.float64)
    if probs.shape[0] == 0:
        raise TrainingError("no predictions to compute metrics from (empty input)")
    if probs.shape[0] != labels.shape[0]:
        raise TrainingError(f"{probs.shape[0]} probability rows but {labels.shape[0]} labels")
    if torch.isnan(probs).any():
        raise TrainingError("probabilities contain NaN (did training diverge?)")
    threshold = float(threshold)

    if task == "binary":
        if probs.ndim == 2 and probs.shape[1] == 1:
            probs = probs[:, 0]
        if probs.ndim != 1:
            raise TrainingError(f"binary probabilities must be (N,) or (N, 1), got {tuple(probs.shape)}")
        labels = labels.reshape(-1)
        if labels.shape[0] != probs.shape[0]:
            raise TrainingError(f"binary labels must be one per row, got shape {tuple(labels.shape)}")
        _check_labels(labels, 0, 1, "binary")
        target = labels.long()
        columns_p, columns_t = probs[:, None], target[:, None]
        hard = {
            "accuracy": tmf.binary_accuracy(probs, target, threshold=threshold),
            "f1": tmf.binary_f1_score(probs, target, threshold=threshold),
            "kappa": tmf.binary_cohen_kappa(probs, target, threshold=threshold),
        }
    elif task == "multiclass":
        if probs.ndim != 2 or probs.shape[1] < 2:
            raise TrainingError(f"multiclass probabilities must be (N, C) with C >= 2, got {tuple(probs.shape)}")
        num_classes = probs.shape[1]
        labels = labels.reshape(-1)
        _check_labels(labels, 0, num_classes - 1, f"{num_classes}-class")
        target = labels.long()
        columns_p, columns_t = probs, torch.nn.functional.one_hot(target, num_classes)
        hard = {
            "accuracy": tmf.multiclass_accuracy(probs, target, num_classes, average="micro"),
            "f1": tmf.multiclass_f1_score(probs, target, num_classes, average="macro"),
            "kappa": tmf.multiclass_cohen_kappa(probs, target, num_classes),
        }
    else:
        if probs.ndim != 2 or labels.shape != probs.shape:
            raise TrainingError(f"multilabel probabilities and labels must both be (N, K); got "
                                f"{tuple(probs.shape)} and {tuple(labels.shape)}")
        _check_labels(labels, 0, 1, "multilabel")
        target = labels.long()
        num_labels = probs.shape[1]
        columns_p, columns_t = probs, target
        hard = {
            "accuracy": tmf.multilabel_accuracy(probs, target, num_labels, threshold=threshold, average="macro"),
            "f1": tmf.multilabel_f1_score(probs, target, num_labels, threshold=threshold, average="macro"),
            "kappa": torch.stack([tmf.binary_cohen_kappa(probs[:, k], target[:, k], threshold=threshold)
                                  for k in range(num_labels)]).mean(),
        }

    positives = columns_t.sum(dim=0)
    metrics = {
        "auroc": _per_column(tmf.binary_auroc, columns_p, columns_t,
                             (positives > 0) & (positives < columns_t.shape[0]), "auroc"),
        "auprc": _per_column(tmf.binary_average_precision, columns_p, columns_t, positives > 0, "auprc"),
    }
    metrics.update({name: float(value) for name, value in hard.items()})
    return {name: metrics[name] for name in CLASSIFICATION_METRICS}


def _as_label_map(masks, name: str) -> torch.Tensor:
    """``(N, *spatial)`` or ``(N, 1, *spatial)`` integer maps -> ``(N, 1, *spatial)``."""
    masks = _as_tensor(masks, name)
    if masks.ndim < 3:
        raise TrainingError(f"{name} must be (N, *spatial) or (N, 1, *spatial) label maps, got {tuple(masks.shape)}")
    return masks if masks.ndim >= 4 and masks.shape[1] == 1 else masks.unsqueeze(1)


def mask_spacing(masks) -> torch.Tensor | None:
    """Each case's pixel/voxel spacing in mm along the array's spatial axes, ``(N, spatial_dims)``, of a batch of
    masks ``(N, 1, *spatial)`` loaded as ``MetaTensor`` (collated by MONAI); ``None`` unless every case was read
    from a file that records its spacing (``meta["kind"]`` in :data:`PHYSICAL_KINDS`; a PNG's affine is the
    identity, pixels not millimetres).

    The spacing is the length of each array axis's column of the affine, which MONAI's spatial transforms
    (``Resized``, ``Spacingd``, crops, our axis reversal) update as they go, so it is that of the grid scored, not
    the file's. (``monai.data.utils.affine_to_spacing`` reads only the first ``spatial_dims`` rows: for a 2D
    image it would drop the world's third axis.)"""
    meta = getattr(masks, "meta", None) or {}
    kinds = meta.get("kind")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds) if kinds is not None else []
    if not kinds or any(kind not in PHYSICAL_KINDS for kind in kinds):
        return None
    spatial = masks.ndim - 2
    affine = torch.as_tensor(masks.affine, dtype=torch.float64).reshape(-1, *masks.affine.shape[-2:])
    spacing = torch.linalg.vector_norm(affine[:, :-1, :spatial], dim=1)
    return spacing.expand(masks.shape[0], spatial)


def segmentation_case_scores(pred_masks, labels, num_classes: int, spacing=None) -> tuple[torch.Tensor, ...]:
    """Per-case, per-foreground-class Dice, Jaccard and 95th-percentile Hausdorff distance ``(N, num_classes - 1)``.

    Dice and Jaccard are ``nan`` where prediction and label are both empty; HD95 (MONAI's
    ``compute_hausdorff_distance(percentile=95)``) is ``nan`` where either is empty (no surface to measure from).
    HD95 is in the units of ``spacing``, one row per case along the masks' spatial axes (:func:`mask_spacing`:
    mm), or in pixels/voxels of the masks' grid without it."""
    if num_classes < 2:
        raise TrainingError(f"segmentation needs num_classes >= 2 (background + foreground), got {num_classes}")
    pred = _as_label_map(pred_masks, "predicted masks")
    label = _as_label_map(labels, "label masks")
    if pred.shape != label.shape:
        raise TrainingError(f"predicted masks {tuple(pred.shape)} and label masks {tuple(label.shape)} differ in shape")
    for tensor, name in ((pred, "predicted mask"), (label, "label mask")):
        _check_labels(tensor.float(), 0, num_classes - 1, f"{num_classes}-class {name}")
    pred = one_hot(pred.long(), num_classes)
    label = one_hot(label.long(), num_classes)
    dice = compute_dice(pred, label, include_background=False, ignore_empty=False)
    iou = compute_iou(pred, label, include_background=False, ignore_empty=False)
    spatial = tuple(range(2, pred.ndim))
    predicted, present = pred[:, 1:].sum(spatial) > 0, label[:, 1:].sum(spatial) > 0
    with warnings.catch_warnings():  # MONAI warns per empty mask; those are the nan cells
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(pred, label, include_background=False, percentile=95,
                                          spacing=None if spacing is None else torch.as_tensor(spacing).tolist())
    both_empty = ~predicted & ~present
    return (dice.masked_fill(both_empty, math.nan), iou.masked_fill(both_empty, math.nan),
            hd95.float().masked_fill(~(predicted & present), math.nan))


def _nanmean(values: torch.Tensor) -> float:
    return float(values.nanmean()) if values.numel() and not torch.isnan(values).all() else math.nan


def segmentation_metrics(pred_masks, labels, num_classes: int) -> dict[str, float]:
    """Mean Dice and Jaccard (background excluded) of integer label maps ``(N, [1,] *spatial)``."""
    dice, iou, _ = segmentation_case_scores(pred_masks, labels, num_classes)
    if torch.isnan(dice).all():
        warnings.warn("no foreground class present in any prediction or label: dice/jaccard are nan",
                      RuntimeWarning, stacklevel=2)
    return {"dice": _nanmean(dice), "jaccard": _nanmean(iou)}


def aggregate_series(probs, series_ids: Sequence[Hashable], how: str = "max") -> tuple[list, torch.Tensor]:
    """Window-level rows -> one row per series (max or mean over its windows), series in order of first appearance.

    That is the CTPA protocol: models see windows of slices, a study is judged on its series-level probability.
    """
    if how not in AGGREGATIONS:
        raise TrainingError(f"aggregation={how!r} is not supported; choose one of {AGGREGATIONS}")
    probs = _as_tensor(probs, "probabilities", torch.float64)
    series_ids = list(series_ids)
    if len(series_ids) != probs.shape[0]:
        raise TrainingError(f"{len(series_ids)} series ids for {probs.shape[0]} probability rows")
    index: dict[Hashable, int] = {}
    for sid in series_ids:
        index.setdefault(sid, len(index))
    rows = torch.tensor([index[sid] for sid in series_ids], dtype=torch.long)
    out = torch.zeros((len(index), *probs.shape[1:]), dtype=probs.dtype)
    rows = rows.reshape(-1, *([1] * (probs.ndim - 1))).expand_as(probs)
    out.scatter_reduce_(0, rows, probs, "amax" if how == "max" else "mean", include_self=False)
    return list(index), out


__all__ = [
    "AGGREGATIONS",
    "CLASSIFICATION_METRICS",
    "HD95_UNITS",
    "PHYSICAL_KINDS",
    "SEGMENTATION_METRICS",
    "aggregate_series",
    "classification_metrics",
    "mask_spacing",
    "segmentation_case_scores",
    "segmentation_metrics",
]
