"""What a finished run leaves behind: ``result.json`` beside the checkpoints and, for a bundle, its model file."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from ...data.presets import effective_options
from ...data.splits import split_summary
from ...provenance import dataset_items
from ...reporting import atomic_write, write_text
from .._blocks import _json_safe, _rank_and_world
from .._checkpoint import load_checkpoint
from ..results import BUNDLE_CHECKPOINT_KEYS, TrainResult, settings_path

logger = logging.getLogger("medtl3d.engine")


class ExportModel:
    """At ``COMPLETED``: ``output_dir/result.json`` (the :class:`~medtl3d.engine.TrainResult` and whether the
    run stopped early), ``trainer.state.result``; with ``ckpt_path`` also the bundle's model.

    The bundle's model (``models/model.pt``) is the best checkpoint (``last.pt`` when no epoch was selected)
    without optimizer state: weights, initial state, ``model_config``, history, provenance and the ``inference``
    settings (preset, its options, ``task``), self-contained; ``model.json`` (the settings) and
    ``train_summary.json`` are written first, all stamped with the run's ``run_id``, so a reader of ``model.pt``
    never combines parts of two runs. In a distributed run every rank waits here until rank 0 has written.
    ``normalize="auto"`` in the settings is recorded as what it resolved to (inference repeats it without the
    catalogue); ``train_data`` / ``val_data`` give the split recorded in ``train_summary.json``."""

    def __init__(self, output_dir: str | Path, key_metric: str = "auroc", select: str = "key_metric",
                 ckpt_path: str | Path | None = None, task: str | None = None, inference: Mapping | None = None,
                 model=None, train_data=None, val_data=None) -> None:
        self.output_dir, self.key_metric, self.select = Path(output_dir), key_metric, select
        self.ckpt_path = None if ckpt_path is None else Path(ckpt_path)
        self.settings = {"task": task, **dict(inference or {})}
        if "preset" in self.settings:
            self.settings["preset_options"] = effective_options(self.settings["preset"],
                                                                self.settings.get("preset_options") or {})
        self.model = model
        self.parts = {"train": train_data, "val": val_data}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def result(self, engine: Engine) -> TrainResult:
        best = self.output_dir / "best.pt"
        state = engine.state
        return TrainResult(
            best_metric=float(getattr(state, "best_metric", math.nan)), best_epoch=int(getattr(state, "best_epoch", 0)),
            key_metric=self.key_metric, history=list(state.history), best_checkpoint=best if best.exists() else None,
            last_checkpoint=self.output_dir / "last.pt", epochs_run=state.epoch, select=self.select)

    def __call__(self, engine: Engine) -> None:
        rank, world = _rank_and_world()
        if world > 1:
            dist.barrier()  # rank 0 has written its checkpoints: every rank sees them from here on
        result = engine.state.result = self.result(engine)
        if rank > 0:
            return
        source = load_checkpoint(result.best_checkpoint or result.last_checkpoint)
        run_id = (source.get("provenance") or {}).get("run_id")
        summary = {**asdict(result), "stopped_early": bool(getattr(engine.state, "stopped_early", False)),
                   "run_id": run_id}
        write_text(self.output_dir / "result.json", json.dumps(_json_safe(summary), indent=2))
        if self.ckpt_path is None:
            return
        describe = self.model.describe() if hasattr(self.model, "describe") else {}
        bundle = {"run_id": run_id, "key_metric": result.key_metric, "best_metric": result.best_metric,
                  "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "checkpoint": str(self.ckpt_path),
                  "model": describe, "history": result.history,
                  "split": split_summary({k: dataset_items(v) or [] for k, v in self.parts.items()})[0]}
        write_text(settings_path(self.ckpt_path), json.dumps({"run_id": run_id, **self.settings}, indent=2))
        write_text(self.output_dir / "train_summary.json", json.dumps(bundle, indent=2, default=str))
        # weights, initial state (for the analyses), how to rebuild the model, its settings and provenance; no
        # optimizer state. Written last: it is what readers trust.
        model_file = {**{k: source[k] for k in BUNDLE_CHECKPOINT_KEYS if k in source}, "inference": self.settings,
                      "epochs_run": result.epochs_run}
        atomic_write(self.ckpt_path, partial(torch.save, model_file), durable=True)
        print(f"medtl3d: best {result.key_metric} = {result.best_metric:.4f} at epoch {result.best_epoch}; "
              f"model saved to {self.ckpt_path}")
