"""The inferer of folder inference: one output (or the error) per case, so a case the model fails on fails alone.

MONAI's inferers take one batch tensor; a folder's cases differ in shape and, for a 3D classifier over windows of
``num_slices`` slices, in number of inputs. :class:`CaseInferer` takes the list of the batch's case inputs and
returns, per case, its logits or the exception that stopped it. Classification cuts each (C, D, H, W) case into
windows (:func:`~medtl3d.data.windows.slice_windows`) and runs windows of the same shape ``batch_size`` at a time,
across cases; segmentation runs MONAI's ``SlidingWindowInferer`` over windows of ``num_slices`` slices (the whole
input without it), one case at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

from ..data.windows import slice_windows, take_window
from ..engine import TASKS
from ..engine._tasks import check_outputs
from ..errors import DataError, TrainingError


class CaseInferer(Inferer):
    """Per case: (windows, K) logits for classification, (K, *spatial) for segmentation, or the exception."""

    def __init__(self, task: str = "binary", num_slices: int | None = None, overlap: int = 0,
                 batch_size: int = 4) -> None:
        if task not in TASKS:
            raise TrainingError(f"task={task!r} is not supported; choose one of {', '.join(TASKS)}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise TrainingError(f"batch_size={batch_size} must be a positive integer")
        if num_slices is not None:
            slice_windows(num_slices, num_slices, overlap)  # validates num_slices and overlap
        elif overlap:
            raise TrainingError("overlap applies to windows of slices; set num_slices too")
        super().__init__()
        self.task, self.num_slices, self.overlap, self.batch_size = task, num_slices, overlap, int(batch_size)
        self.settings = {"task": task, "num_slices": num_slices, "overlap": overlap}
        if task == "segmentation":
            self.window_inferer = SimpleInferer() if num_slices is None else SlidingWindowInferer(
                (num_slices, -1, -1), sw_batch_size=self.batch_size, overlap=(overlap / num_slices, 0.0, 0.0))

    def __call__(self, inputs: list[torch.Tensor], network: Any, *args: Any, **kwargs: Any) -> list:
        if self.task == "segmentation":
            return [self._guarded(self._segment, x, network) for x in inputs]
        return _Windows(self, network).run(inputs)

    def _check(self, x: torch.Tensor) -> None:
        if self.num_slices is not None and x.ndim != 4:
            raise DataError(f"num_slices needs 3D (C, D, H, W) inputs; the preprocessing gave {tuple(x.shape)}")

    @staticmethod
    def _guarded(step, *args) -> torch.Tensor | Exception:
        try:
            return step(*args)
        except Exception as err:  # noqa: BLE001 - the case fails, the run goes on
            return err

    def _segment(self, x: torch.Tensor, network) -> torch.Tensor:
        self._check(x)
        logits = self.window_inferer(x[None], network)
        if logits.ndim != x.ndim + 1 or tuple(logits.shape[2:]) != tuple(x.shape[1:]):
            raise TrainingError(f"the model returned shape {tuple(logits.shape)} for input {tuple(x[None].shape)}; "
                                "segmentation needs (batch, classes, *spatial) logits of the input's size")
        check_outputs(self.task, logits.shape[1])
        return logits[0].float().cpu()


class _Windows:
    """One batch of classification cases: their windows, run ``batch_size`` of one shape at a time."""

    def __init__(self, inferer: CaseInferer, network) -> None:
        self.inferer, self.network = inferer, network
        self.pending: list[tuple[int, torch.Tensor]] = []  # (case, window) waiting for a batch
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.errors: dict[int, Exception] = {}

    def run(self, inputs: list[torch.Tensor]) -> list:
        for k, x in enumerate(inputs):
            try:
                self.inferer._check(x)
                num_slices, overlap = self.inferer.num_slices, self.inferer.overlap
                windows = [x] if num_slices is None else \
                    [take_window(x, a, b) for a, b in slice_windows(x.shape[1], num_slices, overlap)]
            except Exception as err:  # noqa: BLE001
                self.errors[k] = err
                continue
            self.outputs[k] = []
            for window in windows:
                if self.pending and self.pending[0][1].shape != window.shape:
                    self.flush()
                if k in self.errors:  # failed with an earlier window
                    break
                self.pending.append((k, window))
                if len(self.pending) == self.inferer.batch_size:
                    self.flush()
        self.flush()
        return [self.errors[k] if k in self.errors else torch.stack(self.outputs[k]) for k in range(len(inputs))]

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            logits = self.network(torch.stack([t for _, t in batch])).float().cpu()
            if logits.ndim != 2 or logits.shape[0] != len(batch):
                raise TrainingError(f"the model returned shape {tuple(logits.shape)} for a batch of {len(batch)}; "
                                    f"task={self.inferer.task!r} needs (batch, classes) logits")
        except Exception as err:  # noqa: BLE001 - the cases of this batch fail, the run goes on
            for k, _ in batch:
                self.errors.setdefault(k, err)
            return
        for (k, _), row in zip(batch, logits):
            if k not in self.errors:
                self.outputs[k].append(row)
