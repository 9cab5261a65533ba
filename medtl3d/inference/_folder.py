"""Folder inference: every case of a folder (DICOM series, NIfTI, PNG/JPEG) -> one CSV row, masks as NIfTI, run
by a MONAI ``SupervisedEvaluator`` built from the pieces the bundles' ``inference.yaml`` lists.

The pieces: :class:`CaseDataset` (items that never raise: a case that cannot be read or preprocessed becomes a
``failed`` row with a one-line reason, an entry that is not a case a ``skipped`` one), :func:`collate_cases` and
:func:`prepare_cases` (the readable cases' inputs, of any shapes), :class:`CaseInferer` (per case logits or the
error: a case the model fails on fails alone), :class:`CaseRows` (postprocessing: probabilities and decisions, or
masks on the input's grid) and the handlers :class:`~medtl3d.engine.handlers.OutputLock` (one run writes an
output folder at a time), :class:`PredictionWriter` (``predictions.csv`` and ``predictions.json``, published
atomically at the end), :class:`Journal` (each finished case's row in ``.medtl3d-run/`` in the output folder, so
the same command run again after an interruption predicts only the cases the journal lacks; a journal written
with another model or other options is discarded with a warning naming what differs) and :class:`CaseProgress`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose
from torch import nn

from ..engine._checks import resolve_device
from ..engine.handlers import OutputLock
from ._dataset import CaseDataset, collate_cases, prepare_cases
from ._inferer import CaseInferer
from ._journal import Journal
from ._network import resolve_model
from ._progress import CaseProgress
from ._rows import CaseRows
from ._writer import InferenceSummary, PredictionWriter


def run_settings(dataset: CaseDataset, inferer: CaseInferer, postprocessing: CaseRows) -> dict:
    """What a run's predictions depend on besides the model: recorded in ``predictions.json`` and compared by
    the journal before it resumes."""
    return {**dataset.settings, **inferer.settings, **postprocessing.settings}


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
    takes the arg-max class). ``num_slices``/``overlap``: windows of slices for 3D inputs (C, D, H, W); a
    classifier's case gets the ``aggregation`` (max or mean) of its windows' probabilities. Inputs of the same
    shape are batched ``batch_size`` at a time across cases. ``irregular`` is passed to
    :func:`~medtl3d.data.io.load_image` for DICOM series with missing slices, uneven spacing or tilt.
    ``max_decoded_mb``: images whose headers claim more are refused
    (:func:`~medtl3d.data.io.decoded_size_limit`: default ``$MEDTL3D_MAX_DECODED_MB`` or 2048). Bad arguments raise
    :class:`~medtl3d.errors.Medtl3dError` before any case is read; a case that fails never stops the run.
    """
    inferer = CaseInferer(task, num_slices=num_slices, overlap=overlap, batch_size=batch_size)
    device = resolve_device(device)
    model = resolve_model(model, device)
    dataset = CaseDataset(input_dir, preprocess, network=model, preset_options=preset_options, irregular=irregular,
                          max_decoded_mb=max_decoded_mb)
    rows = CaseRows(task, class_names=class_names, threshold=threshold, aggregation=aggregation, network=model,
                    output_dir=output_dir, transform=dataset.transform)
    settings = run_settings(dataset, inferer, rows)
    writer = PredictionWriter(output_dir, settings, rows.columns())
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=DataLoader(dataset, batch_size=inferer.batch_size, collate_fn=collate_cases),
        network=model, prepare_batch=prepare_cases, inferer=inferer, postprocessing=rows, decollate=False,
        val_handlers=[OutputLock([output_dir]), writer, Journal(output_dir, settings), CaseProgress(progress)])
    evaluator.run()
    return writer.summary
