"""What :func:`medtl3d.engine.train` checks before it builds anything: the data's first sample, the model's
outputs on it, the options and the device."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import TrainingError
from ._tasks import IMAGE, LABEL, check_outputs, check_task, default_key_metric, task_metrics
from .metrics import AGGREGATIONS
from .optim import OPTIMIZERS

logger = logging.getLogger("medtl3d.engine")


def _first_sample(dataset, where: str) -> Mapping:
    try:
        size = len(dataset)
    except TypeError as err:
        raise TrainingError(f"{where} must be a map-style dataset with a length") from err
    if size == 0:
        raise TrainingError(f"{where} is empty")
    sample = dataset[0]
    if not isinstance(sample, Mapping) or IMAGE not in sample or LABEL not in sample:
        keys = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
        raise TrainingError(f"{where}: samples must be dicts with '{IMAGE}' and '{LABEL}' (row 0 has {keys})")
    return sample


def _probe_outputs(model: nn.Module, sample: Mapping, task: str, device: torch.device, where: str) -> int:
    """One forward pass in eval mode on the first sample: does the model take the image, and how many outputs?"""
    image = torch.as_tensor(sample[IMAGE])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(image[None].to(device))
    except Exception as err:  # noqa: BLE001 - any failure here means the model cannot take this input
        raise TrainingError(f"{where}: the model cannot take an image of shape {tuple(image.shape)} "
                            f"(channels first, no batch dim): {type(err).__name__}: {err}") from err
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise TrainingError(f"the model returns {type(out).__name__}; the engine needs one tensor of logits")
    expected = 2 + image.ndim - 1 if task == "segmentation" else 2
    if out.ndim != expected or (task == "segmentation" and out.shape[2:] != image.shape[1:]):
        raise TrainingError(f"task={task!r}: the model maps an image {tuple(image.shape)} to {tuple(out.shape[1:])}; "
                            + ("expected (C, *spatial) logits of the image's size" if task == "segmentation"
                               else "expected one logit vector per image"))
    check_outputs(task, out.shape[1])
    return out.shape[1]


def _check_options(task, epochs, lr, weight_decay, optimizer, batch_size, num_workers, grad_clip, key_metric,
                   early_stop_patience, val_every, series_key, aggregation) -> str:
    check_task(task)
    key_metric = key_metric or default_key_metric(task)
    if key_metric not in task_metrics(task):
        raise TrainingError(f"key_metric={key_metric!r} is not produced for task={task!r}; choose one of "
                            f"{', '.join(task_metrics(task))}")
    if optimizer not in OPTIMIZERS:
        raise TrainingError(f"optimizer={optimizer!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("val_every", val_every, 1),
                             ("num_workers", num_workers, 0)):
        check_count(name, value, low)
    if early_stop_patience is not None and (not isinstance(early_stop_patience, int) or early_stop_patience < 1):
        raise TrainingError(f"early_stop_patience must be None or an integer >= 1, got {early_stop_patience!r}")
    if not lr > 0:
        raise TrainingError(f"lr must be > 0, got {lr!r}")
    if weight_decay < 0:
        raise TrainingError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if grad_clip is not None:
        check_grad_clip(grad_clip)
    check_series(task, series_key, aggregation)
    return key_metric


def check_count(name: str, value, low: int) -> None:
    """An integer option (epochs, batch size, workers, ...) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainingError(f"{name} must be an integer >= {low}, got {value!r}")


def check_grad_clip(max_norm) -> None:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise TrainingError(f"grad_clip must be None or > 0, got {max_norm!r}")


def check_series(task: str, series_key: str | None, aggregation: str) -> None:
    """Window -> series aggregation: a known rule, for classification tasks only."""
    if aggregation not in AGGREGATIONS:
        raise TrainingError(f"aggregation={aggregation!r} is not supported; choose one of {', '.join(AGGREGATIONS)}")
    if series_key is not None and task == "segmentation":
        raise TrainingError("series_key (window -> series aggregation) applies to classification tasks only")


def resolve_device(device) -> torch.device:
    """A usable torch device for training or inference, or a TrainingError naming what is wrong."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise TrainingError(f"device={device!r} is not a torch device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device={str(device)!r} but CUDA is not available on this machine")
    return device


def _device_and_amp(device, amp: bool) -> tuple[torch.device, bool]:
    device = resolve_device(device)
    if amp and device.type != "cuda":
        logger.warning("amp=True: mixed precision is used on CUDA only; training on %s in float32", device)
    return device, bool(amp and device.type == "cuda")
