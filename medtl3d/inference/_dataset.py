"""The cases of a folder as a MONAI ``Dataset`` whose items never raise, and the collate that keeps them apart.

A DataLoader stops at the first item that raises; folder inference must record such a case and go on. So an item
is a dict holding the case's ``row`` (case_id, path, kind) and either its preprocessed ``data`` (for the model) or a
finished row: ``failed`` with its one-line reason (the traceback goes to the log at DEBUG level), ``skipped`` for an
entry of the folder that is not a case, or the row of an interrupted run's journal (``resumed``, the case not read
again: see :class:`~medtl3d.inference.Journal`). :func:`collate_cases` keeps the items as a list and gathers the
model inputs of the readable ones under ``image``; :func:`prepare_cases` moves those to the device.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from monai.data import Dataset, MetaTensor
from monai.transforms import Compose
from torch import nn

from ..data.io import decoded_size_limit, find_cases, load_image
from ..data.presets import preset as make_preset
from ..errors import DataError, medtl3d_cause, one_line
from ._network import _model_input

logger = logging.getLogger(__name__)


def failed(row: Mapping[str, Any], err: BaseException) -> dict:
    """``row`` as a failed case: the reason in one line, the traceback in the log (DEBUG)."""
    reason = _reason(err)
    logger.info("%s failed: %s", row["case_id"], reason)
    logger.debug("%s failed", row["case_id"], exc_info=err)
    return {**row, "status": "failed", "reason": reason}


def _reason(err: BaseException) -> str:
    """One line: the message of the medtl3d error behind ``err`` (MONAI wraps transform errors), else the root
    cause's type and message."""
    ours = medtl3d_cause(err)
    if ours is not None:
        return one_line(ours)
    root, seen = err, {id(err)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    return one_line(f"{type(root).__name__}: {root}")


def _spatial_dims(image) -> int:
    """Spatial dimensions of a loaded (C, x, y[, z]) image; a volume of one slice counts as 2D."""
    spatial = image.ndim - 1
    return 2 if spatial == 3 and image.shape[-1] == 1 else spatial


def _resolve_preprocess(preprocess, options: Mapping[str, Any] | None) -> Compose:
    if isinstance(preprocess, str):
        return make_preset(preprocess, train=False, **dict(options or {}))
    if options:
        raise DataError("preset_options apply to a preset name, not to a ready-made Compose")
    if isinstance(preprocess, Compose):
        return preprocess
    raise DataError(f"preprocess must be a preset name or a MONAI Compose, got {type(preprocess).__name__}")


class CaseDataset(Dataset):
    """Every case under ``input_dir`` (:func:`~medtl3d.data.io.find_cases`), then every entry that is not one.

    ``preprocess``: a ``Compose`` over ``{"image": MetaTensor}`` or a preset name built with ``train=False`` and
    ``preset_options``. ``network``: the model the cases are for; a case of other spatial dimensions (as loaded) or
    channels (after preprocessing) fails naming both. ``irregular`` and ``max_decoded_mb`` go to
    :func:`~medtl3d.data.io.load_image`. ``resume``: a case -> finished row (or None) lookup, set by the journal.
    """

    def __init__(self, input_dir: str | os.PathLike, preprocess: Compose | str, *, network: nn.Module | None = None,
                 preset_options: Mapping[str, Any] | None = None, irregular: str = "refuse",
                 max_decoded_mb: float | None = None) -> None:
        self.limit_mb = decoded_size_limit(max_decoded_mb)
        transform = _resolve_preprocess(preprocess, preset_options)
        self.input_dir, self.irregular = Path(input_dir), irregular
        self.model_input = None if network is None else _model_input(network)
        self.cases, self.skipped = find_cases(self.input_dir)
        super().__init__(data=[*self.cases, *self.skipped], transform=transform)
        self.resume: Callable[[Any], dict | None] | None = None
        self.settings = {"input_dir": str(self.input_dir.resolve()), "irregular": irregular,
                         "max_decoded_mb": self.limit_mb,
                         "preprocess": preprocess if isinstance(preprocess, str) else
                         [type(t).__name__ for t in self.transform.flatten().transforms],
                         "preset_options": {k: repr(v) for k, v in (preset_options or {}).items()}}

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        case = self.data[index]
        if isinstance(case, tuple):  # (path, why): not a case
            return {"row": {"case_id": "", "path": str(case[0]), "kind": "", "status": "skipped",
                            "reason": case[1]}}
        done = self.resume(case) if self.resume is not None else None
        if done is not None:
            return {"row": done, "resumed": True}
        row = {"case_id": case.case_id, "path": str(case.path), "kind": case.kind}
        try:
            image = load_image(case, irregular=self.irregular, max_decoded_mb=self.limit_mb)
            self._check_dimensionality(case, image)
            data = self.transform({"image": image})
            self._check_channels(case, data["image"])
        except Exception as err:  # noqa: BLE001 - any failure of one case is recorded, the run goes on
            return {"row": failed(row, err), "source": case}
        return {"row": row, "source": case, "data": data, "affine": image.affine,
                "shape": tuple(image.shape[1:])}

    def _check_dimensionality(self, case, image) -> None:
        """Refuse a case of other spatial dimensions than the model's, as loaded (a preset may add a slice axis)."""
        if self.model_input is None or _spatial_dims(image) == self.model_input[0]:
            return
        dims, got = self.model_input[0], _spatial_dims(image)
        raise DataError(f"{case.path}: the model takes {dims}D input, this case is {got}D (shape "
                        f"{tuple(image.shape)}): give {dims}D cases to this model, or use a {got}D model")

    def _check_channels(self, case, x) -> None:
        """Refuse a case of other channels than the model's, after preprocessing (which may convert them)."""
        if self.model_input is None or int(x.shape[0]) == self.model_input[1]:
            return
        channels, got = self.model_input[1], int(x.shape[0])
        raise DataError(f"{case.path}: the model takes {channels}-channel input, this case has {got} channel(s) "
                        f"after preprocessing (shape {tuple(x.shape)}): use a preset that converts it to {channels} "
                        f"channel(s), or a {got}-channel model")


def collate_cases(items: list[dict]) -> dict:
    """A batch of cases: ``cases`` (every item, in order) and ``image`` (the model inputs of the readable ones;
    the failed, skipped and resumed are dropped from it). Inputs of different shapes may share a batch."""
    return {"image": [item["data"]["image"] for item in items if "data" in item], "cases": items}


def prepare_cases(batch: dict, device: torch.device | str | None = None, non_blocking: bool = False,
                  **kwargs: Any) -> tuple[list[torch.Tensor], None]:
    """A ``SupervisedEvaluator`` ``prepare_batch``: the readable cases' inputs, as plain tensors on ``device``."""
    inputs = [x.as_tensor() if isinstance(x, MetaTensor) else x for x in batch["image"]]
    return [x.to(device, non_blocking=non_blocking, **kwargs) for x in inputs], None
