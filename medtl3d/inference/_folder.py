"""Folder inference: every case of a folder (DICOM series, NIfTI, PNG/JPEG) -> one CSV row, masks as NIfTI.

A case that cannot be read or predicted is recorded with status ``failed`` and a one-line reason (the traceback
goes to the log at DEBUG level), an entry that is not a case (empty folder, unreadable folder or file, non-image
file, DICOM without pixels) with status ``skipped``; the run goes on. A case the model cannot take (2D input for a 3D
model, or the other way round; the wrong number of channels after preprocessing) fails with the expected and the
given dimensionality and channels.

One run writes an output folder at a time (:func:`~medtl3d.locking.output_lock`). Each finished case's row
is written at once to a hidden journal (``.medtl3d-run/`` in the output folder); ``predictions.csv`` and
``predictions.json`` are published atomically at the end, and the journal is removed. An interrupted run (Ctrl-C, a
crash) leaves the journal and no partial file; the same command run again predicts only the cases the journal lacks
(a case whose files changed is predicted again). A journal written with another model or other options is discarded
(a warning names what differs) and the run starts over.

Classification follows the training engine's conventions: binary = one logit -> sigmoid, multiclass = softmax,
multilabel = sigmoid per label; a decision is ``probability > threshold`` (multiclass: arg-max). With
``num_slices`` a 3D classifier sees windows of slices (:func:`~medtl3d.data.windows.slice_windows`) and the case
gets the max or mean of its window probabilities (multiclass ``max``: per-class max, renormalised to sum to 1).
Inputs of the same shape are batched across cases. Segmentation uses MONAI's ``SlidingWindowInferer`` over
windows of ``num_slices`` (whole input without it), takes the arg-max mask and brings it back to the original
voxel grid with MONAI's ``Invertd`` through the preprocessing ``Compose``; the mask is written with the input's
affine, so it overlays the input in any viewer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.transforms import Compose, InvertibleTransform, Invertd
from torch import nn

from ..data.io import decoded_size_limit, find_cases, load_image
from ..data.presets import preset as make_preset
from ..data.windows import slice_windows, take_window
from ..engine import TASKS
from ..engine._checks import resolve_device
from ..engine.runtime import on_terminal
from ..engine._tasks import check_outputs
from ..engine.metrics import AGGREGATIONS
from ..errors import DataError, OutputError, TrainingError, medtl3d_cause, one_line
from ..locking import output_lock
from ..reporting import atomic_write, write_csv, write_text
from ._journal import JOURNAL_DIR, _Journal, _model_digest  # noqa: F401  (JOURNAL_DIR: where the journal lives)
from ._network import _model_input, resolve_model

logger = logging.getLogger(__name__)

CSV_NAME, JSON_NAME, MASK_DIR = "predictions.csv", "predictions.json", "masks"


@dataclass
class InferenceSummary:
    """What :func:`infer_folder` did. ``n_failed`` counts every row that is not ``ok`` (``n_skipped`` of them are
    entries that were not cases); ``failures`` lists them as dicts (case_id, path, status, reason); ``n_resumed``
    rows were taken from an interrupted run's journal."""

    n_cases: int
    n_ok: int
    n_failed: int
    n_skipped: int
    csv_path: Path
    json_path: Path
    failures: list[dict] = field(default_factory=list)
    n_resumed: int = 0


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


class _Predictor:
    """Turns model logits into a case's row fields for one task."""

    def __init__(self, task: str, class_names: list[str] | None, threshold: float, aggregation: str) -> None:
        self.task, self.class_names, self.threshold, self.aggregation = task, class_names, threshold, aggregation

    def columns(self) -> list[str]:
        per_class = [f"prob_{name}" for name in self.class_names] if self.task in ("multiclass", "multilabel") else []
        return ["prediction", "probability", *per_class]

    def row(self, logits: torch.Tensor) -> dict:
        """``logits``: (windows, K) for one case."""
        check_outputs(self.task, logits.shape[1])
        if self.task in ("multiclass", "multilabel") and logits.shape[1] != len(self.class_names):
            raise TrainingError(f"the model outputs {logits.shape[1]} classes, class_names has "
                                f"{len(self.class_names)}: {self.class_names}")
        probs = torch.softmax(logits, 1) if self.task == "multiclass" else torch.sigmoid(logits)
        probs = probs.amax(0) if self.aggregation == "max" else probs.mean(0)
        if self.task == "multiclass":
            probs = probs / probs.sum()
        if self.task == "binary":
            p = float(probs[0])
            positive = p > self.threshold
            prediction = self.class_names[int(positive)] if self.class_names else int(positive)
            return {"prediction": prediction, "probability": f"{p:.6f}"}
        if self.task == "multiclass":
            k = int(probs.argmax())
            out = {"prediction": self.class_names[k], "probability": f"{float(probs[k]):.6f}"}
        else:
            present = [name for name, p in zip(self.class_names, probs.tolist()) if p > self.threshold]
            out = {"prediction": ";".join(present), "probability": f"{float(probs.max()):.6f}"}
        out.update({f"prob_{name}": f"{float(p):.6f}" for name, p in zip(self.class_names, probs.tolist())})
        return out


def _spatial_dims(image) -> int:
    """Spatial dimensions of a loaded (C, x, y[, z]) image; a volume of one slice counts as 2D."""
    spatial = image.ndim - 1
    return 2 if spatial == 3 and image.shape[-1] == 1 else spatial


def _check_apart(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output folder inside the input folder: the next run would read its masks as cases."""
    inside = Path(os.path.realpath(output_dir))
    source = Path(os.path.realpath(input_dir))
    if source.is_dir() and (inside == source or source in inside.parents):
        raise OutputError(f"output folder {output_dir} is inside the input folder {input_dir}: its predictions and "
                          "masks would be read as cases; choose an output folder outside the input")


def _resolve_preprocess(preprocess, options: Mapping[str, Any] | None) -> Compose:
    if isinstance(preprocess, str):
        return make_preset(preprocess, train=False, **dict(options or {}))
    if options:
        raise DataError("preset_options apply to a preset name, not to a ready-made Compose")
    if isinstance(preprocess, Compose):
        return preprocess
    raise DataError(f"preprocess must be a preset name or a MONAI Compose, got {type(preprocess).__name__}")


def infer_folder(model: nn.Module | str | os.PathLike, preprocess: Compose | str, input_dir, output_dir, *,
                 task: str = "binary", class_names: Sequence[str] | None = None, threshold: float = 0.5,
                 num_slices: int | None = None, overlap: int = 0, aggregation: str = "max", device="cpu",
                 batch_size: int = 4, irregular: str = "refuse", preset_options: Mapping[str, Any] | None = None,
                 max_decoded_mb: float | None = None, progress: bool = True) -> InferenceSummary:
    """Predict every case under ``input_dir``; write ``predictions.csv``, ``predictions.json`` (and
    ``masks/<case_id>.nii.gz`` for segmentation) under ``output_dir``, holding its lock for the whole run (a second
    run on the same output raises :class:`~medtl3d.errors.OutputLockedError`) and resuming an interrupted run.

    ``model``: a module or a checkpoint (:func:`medtl3d.engine.load_model`). ``preprocess``: a ``Compose`` over
    ``{"image": MetaTensor}`` (the loaded case) or a preset name built with ``train=False`` and ``preset_options``.
    ``class_names``: names of the classes/labels (multiclass/multilabel: default ``model.num_classes`` names
    "0".."K-1"; binary: two names for the 0/1 decision). ``threshold``: classification decisions (segmentation
    takes the arg-max class). ``num_slices``/``overlap``: windows of slices for 3D
    inputs (C, D, H, W). ``irregular`` is passed to :func:`~medtl3d.data.io.load_image` for DICOM series with
    missing slices, uneven spacing or tilt. ``max_decoded_mb``: images whose headers claim more are refused
    (:func:`~medtl3d.data.io.decoded_size_limit`: default ``$MEDTL3D_MAX_DECODED_MB`` or 2048). Bad arguments raise
    :class:`~medtl3d.errors.Medtl3dError` before any case is read; a case that fails never stops the run.
    """
    started = time.perf_counter()
    if task not in TASKS:
        raise TrainingError(f"task={task!r} is not supported; choose one of {', '.join(TASKS)}")
    if aggregation not in AGGREGATIONS:
        raise TrainingError(f"aggregation={aggregation!r} is not supported; choose one of {', '.join(AGGREGATIONS)}")
    if not 0.0 <= threshold <= 1.0:
        raise TrainingError(f"threshold={threshold} must be in [0, 1]")
    if int(batch_size) != batch_size or batch_size < 1:
        raise TrainingError(f"batch_size={batch_size} must be a positive integer")
    if num_slices is not None:
        slice_windows(num_slices, num_slices, overlap)  # validates num_slices and overlap
    elif overlap:
        raise TrainingError("overlap applies to windows of slices; set num_slices too")
    limit_mb = decoded_size_limit(max_decoded_mb)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _check_apart(input_dir, output_dir)
    device = resolve_device(device)
    transform = _resolve_preprocess(preprocess, preset_options)
    model = resolve_model(model, device)
    class_names = _class_names(task, class_names, model)
    predictor = _Predictor(task, class_names, threshold, aggregation)

    settings = {"input_dir": str(input_dir.resolve()), "task": task, "class_names": class_names,
                "threshold": threshold, "num_slices": num_slices, "overlap": overlap, "aggregation": aggregation,
                "irregular": irregular, "max_decoded_mb": limit_mb,
                "preprocess": preprocess if isinstance(preprocess, str) else
                [type(t).__name__ for t in transform.flatten().transforms],
                "preset_options": {k: repr(v) for k, v in (preset_options or {}).items()}}
    columns = ["case_id", "path", "kind", "status", "reason", "windows"]
    columns += ["mask", "labels", "foreground_voxels"] if task == "segmentation" else predictor.columns()

    cases, skipped = find_cases(input_dir)
    with output_lock(output_dir):
        journal = _Journal(output_dir, {"model": _model_digest(model), **settings})
        if task == "segmentation":
            (output_dir / MASK_DIR).mkdir(exist_ok=True)
        run = _Run(model, transform, predictor, task, num_slices, overlap, device, int(batch_size), irregular,
                   limit_mb, output_dir, journal)
        run.all(cases, progress)
        rows = [run.rows[i] for i in range(len(cases))]
        rows += [{"case_id": "", "path": str(path), "kind": "", "status": "skipped", "reason": why}
                 for path, why in skipped]
        statuses = [row["status"] for row in rows]
        failures = [{k: row.get(k, "") for k in ("case_id", "path", "status", "reason")}
                    for row in rows if row["status"] != "ok"]
        summary = InferenceSummary(n_cases=len(statuses), n_ok=statuses.count("ok"), n_failed=len(failures),
                                   n_skipped=statuses.count("skipped"), csv_path=output_dir / CSV_NAME,
                                   json_path=output_dir / JSON_NAME, failures=failures, n_resumed=run.resumed)
        report = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(summary).items()}, **settings,
                  "device": str(device), "seconds": round(time.perf_counter() - started, 3)}
        write_csv(summary.csv_path, rows, columns)
        write_text(summary.json_path, json.dumps(report, indent=2) + "\n")
        journal.remove()
    logger.info("%d case(s): %d ok, %d failed -> %s", summary.n_cases, summary.n_ok, summary.n_failed,
                summary.csv_path)
    return summary


def _class_names(task: str, class_names, model: nn.Module) -> list[str] | None:
    num_classes = getattr(model, "num_classes", None)
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


class _Run:
    """One pass over the cases: preprocess, batch, predict, write rows (and masks)."""

    def __init__(self, model, transform, predictor, task, num_slices, overlap, device, batch_size, irregular,
                 limit_mb, output_dir, journal) -> None:
        self.model, self.transform, self.predictor, self.task = model, transform, predictor, task
        self.num_slices, self.overlap, self.device, self.batch_size = num_slices, overlap, device, batch_size
        self.irregular, self.limit_mb, self.output_dir, self.journal = irregular, limit_mb, output_dir, journal
        self.model_input = _model_input(model)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (case index, one input) waiting for a batch
        self.outputs: dict[int, list[torch.Tensor]] = {}  # case index -> logits received so far
        self.expected: dict[int, int] = {}  # case index -> number of inputs
        self.base: dict[int, dict] = {}  # case index -> row fields known before prediction
        self.cases: dict = {}  # case index -> Case, until its row is written
        self.rows: dict[int, dict] = {}  # case index -> finished row
        self.counts = {"ok": 0, "failed": 0}
        self.resumed = 0
        if task == "segmentation":
            roi = None if num_slices is None else (num_slices, -1, -1)
            self.inferer = SimpleInferer() if roi is None else SlidingWindowInferer(
                roi, sw_batch_size=batch_size, overlap=(overlap / num_slices, 0.0, 0.0))
            self.invert = Invertd("pred", transform=transform, orig_keys="image", nearest_interp=True) \
                if any(isinstance(t, InvertibleTransform) for t in transform.flatten().transforms) else None

    def all(self, cases, progress: bool) -> None:
        bar = _progress_bar(len(cases), progress)
        for index, case in enumerate(cases):
            done = self.journal.finished(case)
            if done is not None:
                self.rows[index], self.resumed = done, self.resumed + 1
                self.counts[done["status"]] += 1
            else:
                self.base[index] = {"case_id": case.case_id, "path": str(case.path), "kind": case.kind}
                self.cases[index] = case
                try:
                    self.case(index, case)
                except Exception as err:  # noqa: BLE001 - any failure of one case is recorded, the run goes on
                    self.fail(index, err)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(self.counts, refresh=False)
        self.flush()
        if bar is not None:
            bar.set_postfix(self.counts, refresh=False)
            bar.close()
        if self.resumed:
            logger.info("resumed an interrupted run: %d of %d case(s) taken from %s", self.resumed, len(cases),
                        self.journal.folder)

    def case(self, index: int, case) -> None:
        image = load_image(case, irregular=self.irregular, max_decoded_mb=self.limit_mb)
        self.check_dimensionality(case, image)
        data = self.transform({"image": image})
        x = data["image"]
        self.check_channels(case, x)
        if self.num_slices is not None and x.ndim != 4:
            raise DataError(f"num_slices needs 3D (C, D, H, W) inputs; the preprocessing gave {tuple(x.shape)}")
        if self.task == "segmentation":
            self.segment(index, image, data)
            return
        if self.num_slices is None:
            inputs = [x.as_tensor()]
        else:
            inputs = [take_window(x, a, b) for a, b in slice_windows(x.shape[1], self.num_slices, self.overlap)]
        self.expected[index], self.outputs[index] = len(inputs), []
        for tensor in inputs:
            if self.pending and self.pending[0][1].shape != tensor.shape:
                self.flush()
            self.pending.append((index, tensor))
            if len(self.pending) == self.batch_size:
                self.flush()

    def check_dimensionality(self, case, image) -> None:
        """Refuse a case of other spatial dimensions than the model's, as loaded (a preset may add a slice axis)."""
        if self.model_input is None or _spatial_dims(image) == self.model_input[0]:
            return
        dims, got = self.model_input[0], _spatial_dims(image)
        raise DataError(f"{case.path}: the model takes {dims}D input, this case is {got}D (shape "
                        f"{tuple(image.shape)}): give {dims}D cases to this model, or use a {got}D model")

    def check_channels(self, case, x) -> None:
        """Refuse a case of other channels than the model's, after preprocessing (which may convert them)."""
        if self.model_input is None or int(x.shape[0]) == self.model_input[1]:
            return
        channels, got = self.model_input[1], int(x.shape[0])
        raise DataError(f"{case.path}: the model takes {channels}-channel input, this case has {got} channel(s) "
                        f"after preprocessing (shape {tuple(x.shape)}): use a preset that converts it to {channels} "
                        f"channel(s), or a {got}-channel model")

    def flush(self) -> None:
        """Run the pending inputs as one batch; finish the cases whose inputs have all been predicted."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        owners = [i for i, _ in batch]
        try:
            with torch.no_grad():
                logits = self.model(torch.stack([t for _, t in batch]).to(self.device)).float().cpu()
            if logits.ndim != 2 or logits.shape[0] != len(batch):
                raise TrainingError(f"the model returned shape {tuple(logits.shape)} for a batch of {len(batch)}; "
                                    f"task={self.task!r} needs (batch, classes) logits")
        except Exception as err:  # noqa: BLE001 - the cases of this batch fail, the run goes on
            for index in dict.fromkeys(owners):
                if index in self.outputs:
                    self.fail(index, err)
            return
        for index, row in zip(owners, logits):
            if index not in self.outputs:  # already failed
                continue
            self.outputs[index].append(row)
            if len(self.outputs[index]) == self.expected[index]:
                try:
                    fields = self.predictor.row(torch.stack(self.outputs.pop(index)))
                except Exception as err:  # noqa: BLE001
                    self.fail(index, err)
                    continue
                self.ok(index, {"windows": self.expected[index], **fields})

    def segment(self, index: int, image, data: dict) -> None:
        x = data["image"]
        with torch.no_grad():
            logits = self.inferer(x.as_tensor()[None].to(self.device), self.model)
        if logits.ndim != x.ndim + 1 or tuple(logits.shape[2:]) != tuple(x.shape[1:]):
            raise TrainingError(f"the model returned shape {tuple(logits.shape)} for input {tuple(x[None].shape)}; "
                                "segmentation needs (batch, classes, *spatial) logits of the input's size")
        check_outputs(self.task, logits.shape[1])
        mask = logits[0].argmax(0, keepdim=True).to(torch.float32).cpu()
        if self.invert is not None:
            mask = self.invert({**data, "pred": MetaTensor(mask)})["pred"]
        mask = torch.as_tensor(mask)[0].round().to(torch.uint8).numpy()
        if mask.shape != tuple(image.shape[1:]):
            raise DataError(f"the mask came back as {mask.shape}, the image is {tuple(image.shape[1:])}: the "
                            "preprocessing has a spatial transform MONAI cannot invert")
        path = self.output_dir / MASK_DIR / f"{self.base[index]['case_id']}.nii.gz"
        affine = np.asarray(image.affine, dtype=np.float64)
        atomic_write(path, lambda temp: nib.save(nib.Nifti1Image(mask, affine), temp), suffix=".nii.gz")
        labels = [int(v) for v in np.unique(mask) if v]
        self.ok(index, {"windows": "", "mask": str(path), "labels": ";".join(map(str, labels)),
                        "foreground_voxels": int(np.count_nonzero(mask))})

    def ok(self, index: int, fields: dict) -> None:
        self.counts["ok"] += 1
        self.finish(index, {**self.base.pop(index), "status": "ok", "reason": "", **fields})

    def fail(self, index: int, err: BaseException) -> None:
        self.outputs.pop(index, None)
        self.pending = [(i, t) for i, t in self.pending if i != index]
        self.counts["failed"] += 1
        reason = _reason(err)
        logger.info("%s failed: %s", self.base[index]["case_id"], reason)
        logger.debug("%s failed", self.base[index]["case_id"], exc_info=err)
        self.finish(index, {**self.base.pop(index), "status": "failed", "reason": reason})

    def finish(self, index: int, row: dict) -> None:
        self.rows[index] = row
        self.journal.put(self.cases.pop(index), row)


def _progress_bar(total: int, enabled: bool):
    """A bar on a terminal only: in a log file it would be a run of carriage-return lines."""
    if not (enabled and on_terminal()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="inference", unit="case")
