"""The postprocessing of folder inference: each case's output becomes its CSV row (and, for segmentation, its mask).

Classification follows the training engine's conventions: binary = one logit -> sigmoid, multiclass = softmax,
multilabel = sigmoid per label; a decision is ``probability > threshold`` (multiclass: arg-max). A case of several
windows gets the max or mean of its window probabilities (multiclass ``max``: per-class max, renormalised to sum
to 1). Segmentation takes the arg-max mask, brings it back to the original voxel grid with MONAI's ``Invertd``
through the preprocessing ``Compose`` and writes it as ``masks/<case_id>.nii.gz`` with the input's affine, so it
overlays the input in any viewer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, InvertibleTransform, Invertd
from torch import nn

from ..engine import TASKS
from ..engine._tasks import check_outputs
from ..engine.metrics import AGGREGATIONS
from ..errors import DataError, TrainingError
from ..reporting import atomic_write
from ._dataset import failed

MASK_DIR = "masks"
BASE_COLUMNS = ["case_id", "path", "kind", "status", "reason", "windows"]


class Finished(NamedTuple):
    """A case's final row; ``source`` (its :class:`~medtl3d.data.io.Case`) when it was read in this run."""

    row: dict
    source: object | None
    resumed: bool


class CaseRows:
    """Postprocessing (``SupervisedEvaluator(postprocessing=...)``, ``decollate=False``): adds ``rows``, the
    :class:`Finished` row of every case of the batch, to the engine's output.

    ``class_names``: names of the classes/labels (multiclass/multilabel: default ``network.num_classes`` names
    "0".."K-1"; binary: two names for the 0/1 decision). ``output_dir`` and ``transform`` (the preprocessing, to
    invert) are for segmentation masks.
    """

    def __init__(self, task: str = "binary", *, class_names: Sequence[str] | None = None, threshold: float = 0.5,
                 aggregation: str = "max", network: nn.Module | None = None,
                 output_dir: str | os.PathLike | None = None, transform: Compose | None = None) -> None:
        if task not in TASKS:
            raise TrainingError(f"task={task!r} is not supported; choose one of {', '.join(TASKS)}")
        if aggregation not in AGGREGATIONS:
            raise TrainingError(f"aggregation={aggregation!r} is not supported; choose one of "
                                f"{', '.join(AGGREGATIONS)}")
        if not 0.0 <= threshold <= 1.0:
            raise TrainingError(f"threshold={threshold} must be in [0, 1]")
        if task == "segmentation" and output_dir is None:
            raise TrainingError("task='segmentation' writes masks: give output_dir")
        self.task, self.threshold, self.aggregation = task, threshold, aggregation
        self.class_names = _class_names(task, class_names, network)
        self.mask_dir = None if output_dir is None else Path(output_dir) / MASK_DIR
        self.invert = None
        if task == "segmentation" and transform is not None and \
                any(isinstance(t, InvertibleTransform) for t in transform.flatten().transforms):
            self.invert = Invertd("pred", transform=transform, orig_keys="image", nearest_interp=True)
        self.settings = {"class_names": self.class_names, "threshold": threshold, "aggregation": aggregation}

    def columns(self) -> list[str]:
        if self.task == "segmentation":
            return [*BASE_COLUMNS, "mask", "labels", "foreground_voxels"]
        per_class = [f"prob_{name}" for name in self.class_names] if self.task in ("multiclass", "multilabel") else []
        return [*BASE_COLUMNS, "prediction", "probability", *per_class]

    def __call__(self, data: dict) -> dict:
        outputs, rows = iter(data["pred"]), []
        for item in data["cases"]:
            row, source = item["row"], item.get("source")
            if "data" in item:
                row = self._row(item, next(outputs))
            rows.append(Finished(row, source, bool(item.get("resumed"))))
        data["rows"] = rows
        return data

    def _row(self, item: dict, out: torch.Tensor | Exception) -> dict:
        """The row of a case the model saw: ``out`` is its logits or the error that stopped it."""
        if isinstance(out, Exception):
            return failed(item["row"], out)
        try:
            fields = self._mask(item, out) if self.task == "segmentation" else self._classify(out)
        except Exception as err:  # noqa: BLE001 - the case fails, the run goes on
            return failed(item["row"], err)
        return {**item["row"], "status": "ok", "reason": "", **fields}

    def _classify(self, logits: torch.Tensor) -> dict:
        """``logits``: (windows, K) for one case."""
        check_outputs(self.task, logits.shape[1])
        if self.task in ("multiclass", "multilabel") and logits.shape[1] != len(self.class_names):
            raise TrainingError(f"the model outputs {logits.shape[1]} classes, class_names has "
                                f"{len(self.class_names)}: {self.class_names}")
        probs = torch.softmax(logits, 1) if self.task == "multiclass" else torch.sigmoid(logits)
        probs = probs.amax(0) if self.aggregation == "max" else probs.mean(0)
        if self.task == "multiclass":
            probs = probs / probs.sum()
        out: dict = {"windows": logits.shape[0]}
        if self.task == "binary":
            p = float(probs[0])
            positive = p > self.threshold
            prediction = self.class_names[int(positive)] if self.class_names else int(positive)
            return {**out, "prediction": prediction, "probability": f"{p:.6f}"}
        if self.task == "multiclass":
            k = int(probs.argmax())
            out.update({"prediction": self.class_names[k], "probability": f"{float(probs[k]):.6f}"})
        else:
            present = [name for name, p in zip(self.class_names, probs.tolist()) if p > self.threshold]
            out.update({"prediction": ";".join(present), "probability": f"{float(probs.max()):.6f}"})
        out.update({f"prob_{name}": f"{float(p):.6f}" for name, p in zip(self.class_names, probs.tolist())})
        return out

    def _mask(self, item: dict, logits: torch.Tensor) -> dict:
        mask = logits.argmax(0, keepdim=True).to(torch.float32)
        if self.invert is not None:
            mask = self.invert({**item["data"], "pred": MetaTensor(mask)})["pred"]
        mask = torch.as_tensor(mask)[0].round().to(torch.uint8).numpy()
        if mask.shape != item["shape"]:
            raise DataError(f"the mask came back as {mask.shape}, the image is {item['shape']}: the "
                            "preprocessing has a spatial transform MONAI cannot invert")
        path = self.mask_dir / f"{item['row']['case_id']}.nii.gz"
        affine = np.asarray(item["affine"], dtype=np.float64)
        atomic_write(path, lambda temp: nib.save(nib.Nifti1Image(mask, affine), temp), suffix=".nii.gz")
        labels = [int(v) for v in np.unique(mask) if v]
        return {"windows": "", "mask": str(path), "labels": ";".join(map(str, labels)),
                "foreground_voxels": int(np.count_nonzero(mask))}


def _class_names(task: str, class_names, network: nn.Module | None) -> list[str] | None:
    num_classes = getattr(network, "num_classes", None)
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        expected = 2 if task == "binary" else num_classes
        if task != "segmentation" and expected is not None and len(class_names) != expected:
            raise TrainingError(f"class_names {class_names} has {len(class_names)} names; task={task!r} with this "
                                f"model needs {expected}")
        return class_names
    if task in ("multiclass", "multilabel"):
        if num_classes is None:
            raise TrainingError(f"task={task!r}: pass class_names (the model does not say its num_classes)")
        return [str(k) for k in range(num_classes)]
    return None
