"""What a task means to the engines: its loss, how a batch's labels are checked and shaped, and how predictions
become metrics (an ignite ``Metric`` that collects probabilities per case, so AUROC & co. see the whole epoch and
window-level outputs can be aggregated per series first).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.transforms import Activations, AsDiscrete
from monai.utils import CommonKeys
from torch import nn

from ..errors import TrainingError
from .metrics import (
    CLASSIFICATION_METRICS,
    HD95_UNITS,
    SEGMENTATION_METRICS,
    _nanmean,
    aggregate_series,
    classification_metrics,
    mask_spacing,
    segmentation_case_scores,
)

TASKS = ("binary", "multiclass", "multilabel", "segmentation")
IMAGE, LABEL = CommonKeys.IMAGE, CommonKeys.LABEL


def check_task(task: str) -> None:
    if task not in TASKS:
        raise TrainingError(f"task={task!r} is not supported; choose one of {', '.join(TASKS)}")


def task_metrics(task: str) -> tuple[str, ...]:
    return SEGMENTATION_METRICS if task == "segmentation" else CLASSIFICATION_METRICS


def post_transform(task: str):
    """What the metrics score, from a batch of logits (MONAI's ``Activations`` / ``AsDiscrete``): sigmoid (binary,
    multilabel), softmax over the classes (multiclass), the arg-max mask (segmentation)."""
    check_task(task)
    if task == "segmentation":
        return AsDiscrete(argmax=True, dim=1, keepdim=True)
    return Activations(softmax=True, dim=1) if task == "multiclass" else Activations(sigmoid=True)


def default_key_metric(task: str) -> str:
    return "dice" if task == "segmentation" else "auroc"


def make_loss(task: str) -> nn.Module:
    """BCE-with-logits (binary: one logit; multilabel), cross-entropy (multiclass), Dice+CE (segmentation)."""
    if task in ("binary", "multilabel"):
        return nn.BCEWithLogitsLoss()
    if task == "multiclass":
        return nn.CrossEntropyLoss()
    return DiceCELoss(to_onehot_y=True, softmax=True)


def check_outputs(task: str, num_outputs: int) -> None:
    """The model's output channel count must fit the task."""
    if task == "binary" and num_outputs != 1:
        raise TrainingError(f"task='binary' needs a model with a single output logit (num_classes=1); this model "
                            f"outputs {num_outputs} — use num_classes=1, or task='multiclass'")
    if task in ("multiclass", "segmentation") and num_outputs < 2:
        raise TrainingError(f"task={task!r} needs a model with >= 2 output channels, this one outputs {num_outputs}")


def _label_problem(task: str, label: torch.Tensor, num_outputs: int) -> str | None:
    """Why one sample's label does not fit the task (None when it does)."""
    label = label.float()
    if task == "multilabel":
        if label.numel() != num_outputs:
            return f"has {label.numel()} entries, the model outputs {num_outputs} labels"
        valid = (label == 0) | (label == 1)
        what = "0/1 values"
    else:
        if task != "segmentation" and label.numel() != 1:
            return f"has shape {tuple(label.shape)}; a {task} label is one class index"
        high = 1 if task == "binary" else num_outputs - 1
        valid = (label >= 0) & (label <= high) & (label == label.round())
        what = f"integers in [0, {high}]"
    if not bool(valid.all()):
        bad = label[~valid]
        return f"holds {bad.reshape(-1)[:5].tolist()}; {task} labels must be {what}"
    return None


def _ids(batch: Mapping, id_key: str | None, size: int) -> list | None:
    if id_key is None or id_key not in batch:
        return None
    ids = batch[id_key]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return ids if len(ids) == size else None


def _plain_tensor(value) -> torch.Tensor:
    """MetaTensor -> torch.Tensor: the metadata is not needed past this point and costs time in every op."""
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)


class BatchPreparer:
    """``prepare_batch`` for the MONAI engines: checks labels against the task (naming the case) and shapes them
    for the loss — binary ``(B, 1)`` float, multiclass ``(B,)`` long, multilabel ``(B, K)`` float, segmentation
    ``(B, 1, *spatial)`` — then moves image and label to the device."""

    def __init__(self, task: str, num_outputs: int, id_key: str | None = None, where: str = "data") -> None:
        self.task, self.num_outputs, self.id_key, self.where = task, num_outputs, id_key, where

    def __call__(self, batch: Mapping, device=None, non_blocking: bool = False, **kwargs):
        if not isinstance(batch, Mapping) or IMAGE not in batch or LABEL not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise TrainingError(f"{self.where}: each sample must be a dict with '{IMAGE}' and '{LABEL}'; got {keys}")
        image, label = _plain_tensor(batch[IMAGE]), _plain_tensor(batch[LABEL])
        label = self.shape_label(label, image)
        if self.task == "multilabel":
            if label.shape[1] != self.num_outputs:
                self._raise(batch, 0, label, image.shape[0])
            bad = (label != 0) & (label != 1)
        else:
            high = 1 if self.task == "binary" else self.num_outputs - 1
            bad = (label < 0) | (label > high) | (label != label.round())
        if bad.any():  # one vectorised test per batch; the message is built only on failure
            self._raise(batch, int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0]), label, image.shape[0])
        return (image.to(device, non_blocking=non_blocking, **kwargs),
                label.to(device, non_blocking=non_blocking, **kwargs))

    def shape_label(self, label: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[0]
        if self.task == "segmentation":
            if label.ndim == image.ndim - 1:
                label = label.unsqueeze(1)
            if label.shape[0] != size or label.shape[1] != 1 or label.shape[2:] != image.shape[2:]:
                raise TrainingError(f"{self.where}: segmentation labels must be (1, *spatial) masks matching the "
                                    f"image {tuple(image.shape[1:])}, got {tuple(label.shape[1:])} per sample")
            return label
        if self.task == "multilabel":
            return label.reshape(size, -1).float()
        if label.numel() != size:
            raise TrainingError(f"{self.where}: a {self.task} label is one class index per sample, got labels of "
                                f"shape {tuple(label.shape)} for a batch of {size}")
        return label.reshape(size, 1).float() if self.task == "binary" else label.reshape(size).long()

    def _raise(self, batch: Mapping, row: int, label: torch.Tensor, size: int) -> None:
        ids = _ids(batch, self.id_key, size)
        who = f"case {ids[row]!r}" if ids else f"row {row} of a batch"
        problem = _label_problem(self.task, label[row], self.num_outputs)
        raise TrainingError(f"{self.where}: label of {who} {problem}")


def check_labels_upfront(dataset, task: str, num_outputs: int, where: str, id_key: str | None = None) -> None:
    """Validate every label before the first iteration when the dataset exposes its rows (MONAI ``Dataset.data``
    with numeric labels); other datasets are checked batch by batch as they are read."""
    rows = getattr(dataset, "data", None)
    if task == "segmentation" or not isinstance(rows, Sequence) or not rows or not isinstance(rows[0], Mapping):
        return
    for index, row in enumerate(rows):
        if LABEL not in row:
            raise TrainingError(f"{where}: row {index} has no '{LABEL}' (keys: {sorted(row)})")
        value = row[LABEL]
        if isinstance(value, (str, bytes)):
            return  # labels are loaded by transforms (e.g. files); checked per batch
        try:
            label = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return
        problem = _label_problem(task, label, num_outputs)
        if problem:
            name = f" ({id_key}={row[id_key]!r})" if id_key and id_key in row else ""
            raise TrainingError(f"{where}: label of row {index}{name} {problem}")


class CaseCollector(Metric):
    """Collects per-case outputs of an evaluator epoch and computes every metric of the task at its end.

    ``postprocessing`` turns a batch of logits into what is scored (default :func:`post_transform`: probabilities,
    or the arg-max mask). Classification keeps the probabilities and labels; with ``series_key`` the rows are
    aggregated per series (max or mean) first. Segmentation keeps per-case Dice, Jaccard and HD95 of the mask,
    never the masks; HD95 in mm where the batch's label ``MetaTensor`` records the spacing
    (:func:`~medtl3d.engine.metrics.mask_spacing`), else in pixels, its unit in each row's ``hd95_unit``.
    ``rows`` holds the per-case (or per-series) predictions after ``compute``.
    Attached in ``flatten`` mode, so each metric lands in ``engine.state.metrics`` under its own name. With ``world > 1``
    each rank has seen the cases ``rank, rank + world, ...`` (MONAI's ``DistributedSampler`` without padding):
    ``compute`` gathers every rank's cases back into dataset order first, so the metrics are the single-process
    ones.
    """

    def __init__(self, task: str, id_key: str | None = None, series_key: str | None = None,
                 aggregation: str = "max", world: int = 1, postprocessing=None) -> None:
        self.task, self.id_key, self.series_key, self.aggregation = task, id_key, series_key, aggregation
        self.postprocessing = postprocessing or post_transform(task)
        self.world = world
        self.rows: list[dict] = []
        super().__init__(metrics_result_mode="flatten")

    def completed(self, engine, name: str) -> None:
        """Each metric under its own name; ``name`` may be one of them (the evaluator's key metric), which
        ignite's own flattening refuses."""
        engine.state.metrics.update(self.compute())

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._ids: list = []

    def iteration_completed(self, engine) -> None:
        # the ids live in the collated batch, which the default output-only path does not pass on
        # and the label's spacing, which the prepared (plain-tensor) label no longer carries
        output, batch = engine.state.output, engine.state.batch
        pred, label = output[CommonKeys.PRED], output[CommonKeys.LABEL]
        loaded = batch.get(LABEL) if isinstance(batch, Mapping) else None
        spacing = mask_spacing(loaded) if self.task == "segmentation" else None
        self.update((pred, label, _ids(batch, self.series_key or self.id_key, pred.shape[0]), spacing))

    def update(self, output: tuple) -> None:
        """``(pred, label, ids[, spacing])``: ``spacing`` (segmentation) as :func:`mask_spacing` gives it."""
        pred, label, ids, spacing = (*output, None)[:4]
        pred, label = pred.detach().float(), label.detach()
        if self.task == "segmentation":
            masks = torch.as_tensor(self.postprocessing(pred)).cpu()
            scores = segmentation_case_scores(masks, label.cpu(), pred.shape[1], spacing)
            in_mm = torch.full_like(scores[0], float(spacing is not None))  # a column, so ranks gather it too
            self._scores.append(torch.stack((*scores, in_mm), dim=1))
        else:
            check_outputs(self.task, pred.shape[1])
            self._scores.append(torch.as_tensor(self.postprocessing(pred)).float().cpu())
            self._labels.append(label.cpu())
        if self.series_key and ids is None:
            raise TrainingError(f"series_key={self.series_key!r} is not a key of the evaluation samples")
        self._ids.extend(ids if ids is not None else [None] * pred.shape[0])

    def _gathered(self) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
        """(scores, labels, ids) of every rank's cases in dataset order (rank r holds cases r, r + world, ...)."""
        local = (torch.cat(self._scores) if self._scores else None,
                 torch.cat(self._labels) if self._labels else None, self._ids)
        if self.world == 1:
            return local
        parts: list = [None] * self.world
        dist.all_gather_object(parts, local)
        merged = []
        for field in range(3):
            pieces = [part[field] for part in parts if part[field] is not None and len(part[field])]
            if not pieces:
                merged.append(None if field < 2 else [])
                continue
            size = sum(len(p) for p in pieces)
            out = torch.empty((size, *pieces[0].shape[1:]), dtype=pieces[0].dtype) if field < 2 else [None] * size
            for rank, part in enumerate(parts):
                if part[field] is not None and len(part[field]):
                    out[rank::self.world] = part[field]
            merged.append(out)
        return merged[0], merged[1], merged[2]

    def compute(self) -> dict[str, float]:
        scores, gathered_labels, ids = self._gathered()
        if scores is None:
            raise TrainingError("the evaluation data produced no batches")
        has_ids = any(i is not None for i in ids)
        if self.task == "segmentation":
            dice, iou, hd95, in_mm = scores[:, 0], scores[:, 1], scores[:, 2], scores[:, 3, 0].bool()
            if in_mm.any() and not in_mm.all():  # one interval over cases must not mix mm and pixels
                warnings.warn(f"HD95 left out: {int(in_mm.sum())} of {len(in_mm)} test masks record their spacing "
                              "(mm), the others do not (pixels); give them all in one format", RuntimeWarning,
                              stacklevel=2)
                hd95 = torch.full_like(hd95, math.nan)
            metrics = {"dice": _nanmean(dice), "jaccard": _nanmean(iou)}
            self.rows = [{**({"id": ids[i]} if has_ids else {}), "dice": _nanmean(dice[i]),
                          "jaccard": _nanmean(iou[i]), "hd95": _nanmean(hd95[i]),
                          "hd95_unit": HD95_UNITS[0] if in_mm[i] else HD95_UNITS[1]} for i in range(scores.shape[0])]
            return metrics
        labels = gathered_labels
        if self.task == "binary":
            labels = labels.reshape(-1).long()
        elif self.task == "multilabel":
            labels = labels.long()
        if self.series_key:
            window_ids = ids
            _, per_series = aggregate_series(scores, window_ids, self.aggregation)
            ids, series_labels = aggregate_series(labels, window_ids, "max")
            if self.task == "multiclass":
                _, lowest = aggregate_series(-labels.double(), window_ids, "max")
                mixed = [sid for sid, hi, lo in zip(ids, series_labels, -lowest) if hi != lo]
                if mixed:
                    raise TrainingError(f"series {mixed[:5]} have windows with different multiclass labels; a "
                                        "series needs one label")
            scores, labels = per_series.float(), series_labels.long()
        metrics = classification_metrics(scores, labels, self.task)
        self.rows = [
            {**({"id": ids[i]} if has_ids else {}),
             "label": labels[i].tolist(),
             "probabilities": scores[i].reshape(-1).tolist()}
            for i in range(scores.shape[0])
        ]
        return metrics
