"""The building blocks of a training run: the evaluator, ignite handlers (epoch loss, gradient clipping, per-epoch
seeds, buffer and metric sync across ranks), trackers (TensorBoard, MLflow, progress bar), history and resume checks."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Events
from ignite.metrics import Loss
from monai.data import DataLoader
from monai.data import DistributedSampler as MonaiDistributedSampler
from monai.data.utils import set_rnd
from monai.engines import SupervisedEvaluator
from monai.utils import CommonKeys, optional_import
from torch import nn

from ..errors import TrainingError, interface
from ..reporting import write_text
from ._tasks import BatchPreparer, CaseCollector, make_loss

logger = logging.getLogger("medtl3d.engine")

ID_KEY = "id"
# options that may change when a run is resumed; every other option must match the checkpoint's
_RESUMABLE_CHANGES = ("epochs", "early_stop_patience", "device", "num_workers", "progress", "tensorboard",
                      "mlflow_uri", "num_threads")


def _evaluator(model, dataset, task, num_outputs, batch_size, num_workers, device, amp, series_key, aggregation,
               where, rank: int = 0, world: int = 1) -> tuple[SupervisedEvaluator, CaseCollector]:
    # with world > 1 each rank evaluates cases rank, rank + world, ... (no padding duplicates); the collector
    # gathers them, ignite's Loss all-reduces its sums
    sampler = None if world == 1 else MonaiDistributedSampler(dataset, even_divisible=False, num_replicas=world,
                                                              rank=rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, sampler=sampler,
                        pin_memory=device.type == "cuda")
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=loader, network=model,
        prepare_batch=BatchPreparer(task, num_outputs, series_key or ID_KEY, where), amp=amp, decollate=False,
    )
    collector = CaseCollector(task, id_key=ID_KEY, series_key=series_key, aggregation=aggregation, world=world)
    collector.attach(evaluator, "metrics")
    # the validation loss (per window with series_key): tie-breaker of model selection, the plateau schedule's signal
    Loss(make_loss(task), output_transform=lambda out: (out[CommonKeys.PRED], out[CommonKeys.LABEL]),
         device=device).attach(evaluator, "loss")
    return evaluator, collector


class _EpochLoss:
    """Mean training loss of the epoch (summed on the device: no host sync per iteration) into state.metrics; with
    ``reduce_on`` (a device, in distributed runs) the mean over every rank's batches, the same on all ranks."""

    def __init__(self, reduce_on: torch.device | None = None) -> None:
        self.reduce_on = reduce_on

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def started(self, engine) -> None:
        self.total, self.count, self.start = 0.0, 0, time.perf_counter()

    def iteration(self, engine) -> None:
        self.total = self.total + engine.state.output[CommonKeys.LOSS].detach()
        self.count += 1

    def completed(self, engine) -> None:
        total, count = float(self.total), self.count
        if self.reduce_on is not None:
            both = torch.tensor([total, count], dtype=torch.float64, device=self.reduce_on)
            dist.all_reduce(both)
            total, count = both.tolist()
        loss = total / max(count, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"training diverged: mean loss of epoch {engine.state.epoch} is {loss}; lower lr or "
                                "set grad_clip")
        engine.state.metrics["train_loss"] = loss
        engine.state.metrics["epoch_seconds"] = time.perf_counter() - self.start


class _GradClip:
    """Clip the gradient norm between backward and optimizer step (unscaling AMP gradients first)."""

    def __init__(self, params: list[nn.Parameter], max_norm: float) -> None:
        self.params, self.max_norm = params, max_norm

    def __call__(self, engine) -> None:
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)


class _EpochSeeds:
    """Worker and in-process augmentation seeds derived from (seed, rank, epoch), so any epoch replays identically
    and the ranks of a distributed run draw different augmentations."""

    def __init__(self, generator: torch.Generator, dataset, seed: int, num_workers: int, rank: int = 0) -> None:
        self.generator, self.dataset, self.seed, self.num_workers = generator, dataset, seed, num_workers
        self.rank = rank

    def __call__(self, engine) -> None:
        epoch_seed = (self.seed * 1_000_003 + self.rank * 10_007 + engine.state.epoch) % (2**31 - 1)
        self.generator.manual_seed(epoch_seed)
        if self.num_workers == 0:  # workers are seeded from the generator by MONAI's worker_init_fn
            set_rnd(self.dataset, epoch_seed)


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _SyncBuffers:
    """Rank 0's buffers (BatchNorm running statistics) to every rank before validation: DDP broadcasts them only
    at the start of each forward, so after the last step of an epoch each rank holds its own."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, engine) -> None:
        for buffer in self.model.buffers():
            dist.broadcast(buffer, src=0)


class _SameMetrics:
    """Rank 0's validation metrics on every rank, so best-checkpoint and early-stopping decisions agree even where
    the ranks' evaluations differ in the last bits (non-deterministic GPU kernels)."""

    def __init__(self, names: tuple[str, ...], device: torch.device) -> None:
        self.names, self.device = names, device

    def __call__(self, engine) -> None:
        metrics = engine.state.metrics
        values = torch.tensor([float(metrics[name]) for name in self.names], dtype=torch.float64, device=self.device)
        dist.broadcast(values, src=0)
        metrics.update(zip(self.names, values.tolist()))


def _write_history(history: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buffer.getvalue())


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _attach_trackers(trainer, evaluator, output_dir: Path, tensorboard: bool, mlflow_uri: str | None,
                     progress: bool, run_config: dict) -> list:
    """TensorBoard / MLflow (per-epoch train loss and validation metrics) and a progress bar; returns what must be
    closed when training ends."""
    epoch_of_trainer = lambda _: trainer.state.epoch  # noqa: E731 - validation is logged at the trainer's epoch
    closables = []
    if tensorboard:
        writer_cls, has_tb = optional_import("torch.utils.tensorboard", name="SummaryWriter")
        if has_tb:
            from monai.handlers import TensorBoardStatsHandler

            writer = writer_cls(log_dir=str(output_dir / "tensorboard"))
            TensorBoardStatsHandler(summary_writer=writer, iteration_log=False,
                                    output_transform=lambda _: None).attach(trainer)
            TensorBoardStatsHandler(summary_writer=writer, iteration_log=False, output_transform=lambda _: None,
                                    global_epoch_transform=epoch_of_trainer).attach(evaluator)
            closables.append(writer)
        else:
            logger.warning("tensorboard is not installed (pip install tensorboard): no TensorBoard logs written")
    if mlflow_uri:
        _, has_mlflow = optional_import("mlflow")
        if not has_mlflow:
            raise TrainingError(f"mlflow_uri={mlflow_uri!r} but mlflow is not installed (pip install mlflow)")
        from monai.handlers import MLFlowHandler

        common = {"tracking_uri": str(mlflow_uri), "experiment_name": "medtl3d", "run_name": output_dir.name,
                  "iteration_log": False, "output_transform": lambda _: None}
        try:
            MLFlowHandler(**common, experiment_param={k: str(v) for k, v in run_config.items()}).attach(trainer)
            MLFlowHandler(**common, global_epoch_transform=epoch_of_trainer).attach(evaluator)
        except ValueError as err:
            raise TrainingError(f"mlflow_uri={mlflow_uri!r}: {err}") from err
    if progress:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": out[CommonKeys.LOSS]})
    return closables


def _resume_check(saved: dict, current: dict, path: Path) -> None:
    diffs = [f"{k}: {saved.get(k)!r} (checkpoint) vs {current.get(k)!r}" for k in sorted(set(saved) | set(current))
             if k not in _RESUMABLE_CHANGES and saved.get(k) != current.get(k)]
    if diffs:
        # a bundle has no resume id: its user starts over in another folder (or removes the old run's checkpoint)
        fix = (f"use another --output_dir, or delete {path} to start over" if interface() == "bundle" else
               "pass resume=False to start over, or use another output_dir")
        raise TrainingError(f"{path} was written by a different run ({'; '.join(diffs)}); {fix}")
