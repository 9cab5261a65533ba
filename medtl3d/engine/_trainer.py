"""``train`` and ``evaluate`` on MONAI's ignite engines (``SupervisedTrainer`` / ``SupervisedEvaluator``).

The engines, ``ValidationHandler``, ignite ``EarlyStopping`` / ``ProgressBar`` and MONAI's TensorBoard / MLflow
handlers do the work; this module wires them for a task and adds what they lack for this project:

- per-(seed, epoch) deterministic shuffling and augmentation seeds, and RNG states in every checkpoint, so a run
  killed mid-epoch resumes from ``last.pt`` and ends bit-identical (on CPU) to an uninterrupted run;
- one checkpoint format holding the model's initial state and the config to rebuild it (see ``_checkpoint``);
- options and labels checked before the first iteration, with errors naming the option / row;
- data-parallel training when ``torch.distributed`` is initialised with more than one process (``torchrun``, the
  bundles' ``multi_gpu_train.yaml``): ``DistributedDataParallel`` around the model, each rank its share of every
  epoch, rank 0's validation metrics on every rank (identical best-checkpoint and early-stopping decisions), and
  only rank 0 writing checkpoints, history and logs.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Events
from ignite.handlers import EarlyStopping
from ignite.metrics import Loss
from monai.data import DataLoader
from monai.data import DistributedSampler as MonaiDistributedSampler
from monai.data.utils import set_rnd
from monai.engines import IterationEvents, SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.utils import CommonKeys, optional_import, set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from ..errors import TrainingError, interface
from ..locking import output_lock
from ..provenance import build_provenance, data_hash, dataset_items
from ..reporting import write_text
from ._builders import plain_config
from ._checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ._tasks import (
    IMAGE,
    LABEL,
    BatchPreparer,
    CaseCollector,
    check_labels_upfront,
    check_outputs,
    check_task,
    default_key_metric,
    make_loss,
    task_metrics,
)
from .metrics import AGGREGATIONS
from .optim import attach_scheduler, build_scheduler, check_scheduler, param_groups
from .runtime import check_num_threads, on_terminal, torch_threads
from .selection import ModelSelection, check_select

logger = logging.getLogger("medtl3d.engine")

OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": partial(torch.optim.SGD, momentum=0.9),
}
ID_KEY = "id"
# options that may change when a run is resumed; every other option must match the checkpoint's
_RESUMABLE_CHANGES = ("epochs", "early_stop_patience", "device", "num_workers", "progress", "tensorboard",
                      "mlflow_uri", "num_threads")


@dataclass
class TrainResult:
    """What a training run produced (``best_metric`` is nan when no validation had a defined key metric)."""

    best_metric: float
    best_epoch: int
    key_metric: str
    history: list[dict] = field(default_factory=list)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    epochs_run: int = 0
    select: str = "key_metric"


@dataclass
class EvalResult:
    """Metrics of an evaluation and one prediction row per case (per series with ``series_key``)."""

    metrics: dict[str, float]
    predictions: list[dict]


# ----------------------------------------------------------------------------------------------- checks
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
    if aggregation not in AGGREGATIONS:
        raise TrainingError(f"aggregation={aggregation!r} is not supported; choose one of {', '.join(AGGREGATIONS)}")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("val_every", val_every, 1),
                             ("num_workers", num_workers, 0)):
        if not isinstance(value, int) or value < low:
            raise TrainingError(f"{name} must be an integer >= {low}, got {value!r}")
    if early_stop_patience is not None and (not isinstance(early_stop_patience, int) or early_stop_patience < 1):
        raise TrainingError(f"early_stop_patience must be None or an integer >= 1, got {early_stop_patience!r}")
    if not lr > 0:
        raise TrainingError(f"lr must be > 0, got {lr!r}")
    if weight_decay < 0:
        raise TrainingError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise TrainingError(f"grad_clip must be None or > 0, got {grad_clip!r}")
    if series_key is not None and task == "segmentation":
        raise TrainingError("series_key (window -> series aggregation) applies to classification tasks only")
    return key_metric


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


# ----------------------------------------------------------------------------------------------- building blocks
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


@dataclass
class _Run:
    """Bookkeeping of one run, written into every checkpoint at the end of each epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    evaluator: SupervisedEvaluator
    output_dir: Path
    key_metric: str
    metric_names: tuple[str, ...]
    val_every: int
    initial_state: dict
    model_config: dict | None
    run_config: dict
    provenance: dict | None = None  # built by the writing rank only
    early_stopping: EarlyStopping | None = None
    scheduler: object = None  # a torch learning-rate scheduler (its state goes into every checkpoint)
    selection: ModelSelection = field(default_factory=ModelSelection)
    writes: bool = True  # False on the ranks > 0 of a distributed run: bookkeeping only
    history: list = field(default_factory=list)
    best_metric: float = math.nan
    best_epoch: int = 0
    stopped_early: bool = False

    def state(self, trainer) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "engine": {"epoch": trainer.state.epoch, "iteration": trainer.state.iteration,
                       "epoch_length": trainer.state.epoch_length},
            "key_metric": self.key_metric,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "early_stopping": dict(self.early_stopping.state_dict()) if self.early_stopping else None,
            "stopped_early": self.stopped_early,
            "history": self.history,
            "rng": rng_state(),
            "initial_state": self.initial_state,
            "model_config": self.model_config,
            "run_config": self.run_config,
            "provenance": self.provenance,
        }

    def epoch_completed(self, trainer) -> None:
        epoch = trainer.state.epoch
        record = {"epoch": epoch, "train_loss": trainer.state.metrics["train_loss"],
                  "seconds": round(trainer.state.metrics["epoch_seconds"], 3)}
        improved = False
        if epoch % self.val_every == 0:
            metrics = self.evaluator.state.metrics
            record.update({f"val_{name}": float(metrics[name]) for name in self.metric_names})
            record["val_loss"] = float(metrics["loss"])
            improved = self.selection.update(record)
            if improved:
                self.best_metric, self.best_epoch = record[f"val_{self.key_metric}"], epoch
        self.history.append(record)
        self.stopped_early = bool(trainer.should_terminate) and epoch < trainer.state.max_epochs
        if not self.writes:
            return
        state = self.state(trainer)
        if improved:  # best first: a kill between the two writes replays this epoch and rewrites both
            save_checkpoint(state, self.output_dir / "best.pt")
        save_checkpoint(state, self.output_dir / "last.pt")
        _write_history(self.history, self.output_dir / "history.csv")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch", "seconds"))
        logger.info("epoch %d/%d: %s%s", epoch, trainer.state.max_epochs, shown,
                    " (best)" if improved else "")

    def result(self, epochs_run: int) -> TrainResult:
        best = self.output_dir / "best.pt"
        return TrainResult(
            best_metric=self.best_metric, best_epoch=self.best_epoch, key_metric=self.key_metric,
            history=list(self.history), best_checkpoint=best if best.exists() else None,
            last_checkpoint=self.output_dir / "last.pt", epochs_run=epochs_run, select=self.selection.select,
        )


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


# ----------------------------------------------------------------------------------------------- public API
def _one_writer(train_fn):
    """Hold ``output_dir``'s lock for the whole run on the rank that writes (rank 0; the other ranks of a
    distributed run write nothing and take no lock, so they cannot deadlock on it)."""

    @functools.wraps(train_fn)
    def locked(model, train_data, val_data, *, output_dir, **options):
        writes = _rank_and_world()[0] == 0
        with output_lock(output_dir) if writes else nullcontext():
            return train_fn(model, train_data, val_data, output_dir=output_dir, **options)

    return locked


@_one_writer
def train(model: nn.Module, train_data, val_data, *, task: str, output_dir, epochs: int = 10, lr: float = 1e-3,
          weight_decay: float = 0.0, optimizer: str = "adamw", batch_size: int = 8, num_workers: int = 0,
          amp: bool = False, grad_clip: float | None = None, key_metric: str | None = None,
          early_stop_patience: int | None = None, seed: int = 0, device="cpu", resume: bool = True,
          tensorboard: bool = True, mlflow_uri: str | None = None, progress: bool = True, val_every: int = 1,
          series_key: str | None = None, aggregation: str = "max", model_config: dict | None = None,
          scheduler: str = "cosine", warmup_epochs: float = 0, scheduler_options: dict | None = None,
          select: str = "key_metric", num_threads: int | None = None) -> TrainResult:
    """Fine-tune ``model`` on ``train_data``, validating on ``val_data`` every ``val_every`` epochs.

    Samples are dicts with ``"image"`` (C, *spatial) and ``"label"`` (class index; 0/1 vector for multilabel;
    (1, *spatial) or (*spatial) mask for segmentation), optionally an ``"id"`` and, for window-level CTPA data, a
    series id under ``series_key`` (validation metrics are then computed per series, ``aggregation`` max/mean).
    ``output_dir`` receives ``last.pt`` (every epoch), ``best.pt`` (best ``key_metric``), ``history.csv``,
    ``result.json`` and ``tensorboard/``. With ``resume`` an existing ``last.pt`` of the same run is continued.
    ``scheduler`` (cosine, step, plateau, constant; ``warmup_epochs`` of linear warm-up, ``scheduler_options``)
    is :func:`medtl3d.engine.optim.build_scheduler`'s; weight decay spares norms, biases, embeddings and position
    tables (:func:`~medtl3d.engine.optim.param_groups`). ``select`` is the best-checkpoint rule (key_metric, loss,
    last, ema; ties broken by the validation loss, see :mod:`medtl3d.engine.selection`). ``num_threads`` sets
    torch's CPU thread count for the run (restored afterwards). A progress bar is shown only on a terminal.
    One run writes to ``output_dir`` at a time (:func:`medtl3d.locking.output_lock`: another one is refused at
    once), and every checkpoint carries a ``provenance`` record (:func:`medtl3d.provenance.build_provenance`:
    versions, pretrained weights, content hashes of the train/val data, the run's configuration).
    The model is trained in place (it ends with the last epoch's weights; :func:`load_model` reads ``best.pt``).

    When ``torch.distributed`` is initialised with more than one process, every rank calls ``train`` with the same
    arguments (``device`` its own GPU, or ``"cpu"`` with gloo): training is data-parallel with ``batch_size`` per
    rank, each rank validates its share of ``val_data`` and the predictions are gathered (the metrics equal a
    single process's), every rank uses rank 0's metrics, only rank 0 writes to
    ``output_dir``, and every rank returns once the files are written. Checkpoints hold the unwrapped model.
    """
    key_metric = _check_options(task, epochs, lr, weight_decay, optimizer, batch_size, num_workers, grad_clip,
                                key_metric, early_stop_patience, val_every, series_key, aggregation)
    scheduler_options = check_scheduler(scheduler, warmup_epochs, scheduler_options)
    check_select(select)
    check_num_threads(num_threads)
    device, use_amp = _device_and_amp(device, amp)
    model_config = None if model_config is None else plain_config(dict(model_config), "model_config")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed=seed)
    rank, world = _rank_and_world()

    model.to(device)
    _first_sample(train_data, "train_data")
    num_outputs = _probe_outputs(model, _first_sample(val_data, "val_data"), task, device, "val_data")
    check_labels_upfront(train_data, task, num_outputs, "train_data", series_key or ID_KEY)
    check_labels_upfront(val_data, task, num_outputs, "val_data", series_key or ID_KEY)

    initial = getattr(model, "initial_state", None)  # a TransferModel's own detached copy, else a snapshot now
    initial_state = ({k: v.detach().cpu() for k, v in initial.items()} if initial
                     else {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    if val_every > epochs:
        logger.warning("val_every=%d > epochs=%d: no validation will run, so no best.pt", val_every, epochs)
    groups = param_groups(model, lr, weight_decay)
    opt = OPTIMIZERS[optimizer](groups, lr=lr, weight_decay=weight_decay)
    # the trainer steps through the DDP wrapper; checkpoints, evaluation and param groups use the model itself
    network = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)

    # A DistributedSampler (one replica per rank; a single one without a process group) shuffles with seed + epoch
    # (MONAI's Workflow calls its set_epoch), so an epoch's order never depends on how earlier epochs consumed a
    # shared generator, and each rank gets an equal share; the loader's own generator (reseeded per epoch) only
    # seeds the workers.
    sampler = DistributedSampler(train_data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    generator = torch.Generator()
    # a last batch of one sample cannot train batch norm ("expected more than 1 value per channel"): drop it
    single_last = len(sampler) % batch_size == 1 and len(sampler) > 1
    loader = DataLoader(train_data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        generator=generator, pin_memory=device.type == "cuda", drop_last=single_last)
    lr_scheduler = build_scheduler(scheduler, opt, epochs=epochs, steps_per_epoch=len(loader),
                                   warmup_epochs=warmup_epochs, **scheduler_options)
    if warmup_epochs >= epochs:
        logger.warning("warmup_epochs=%g covers the whole run (epochs=%d): the learning rate only rises",
                       warmup_epochs, epochs)
    evaluator, _ = _evaluator(model, val_data, task, num_outputs, batch_size, num_workers, device, use_amp,
                              series_key, aggregation, "val_data", rank, world)
    trainer = SupervisedTrainer(
        device=device, max_epochs=epochs, train_data_loader=loader, network=network, optimizer=opt,
        loss_function=make_loss(task), prepare_batch=BatchPreparer(task, num_outputs, series_key or ID_KEY,
                                                                   "train_data"),
        amp=use_amp, decollate=False, optim_set_to_none=True,
    )
    run_config = {
        "task": task, "lr": lr, "weight_decay": weight_decay, "optimizer": optimizer, "batch_size": batch_size,
        "amp": bool(amp), "grad_clip": grad_clip, "key_metric": key_metric, "seed": seed, "val_every": val_every,
        "series_key": series_key, "aggregation": aggregation, "model_config": model_config,
        "train_size": len(train_data), "val_size": len(val_data), "scheduler": scheduler,
        "warmup_epochs": warmup_epochs, "scheduler_options": scheduler_options, "select": select,
    }
    if world > 1:  # a different world size changes the batches: such a checkpoint does not resume
        run_config["world_size"] = world
    provenance = None if rank else build_provenance(
        weights=getattr(getattr(model, "backbone", None), "weights_source", None), config=run_config,
        data={"train": data_hash(dataset_items(train_data)), "val": data_hash(dataset_items(val_data))})
    run = _Run(model, opt, evaluator, output_dir, key_metric, task_metrics(task), val_every, initial_state,
               model_config, run_config, provenance=provenance, scheduler=lr_scheduler,
               selection=ModelSelection(select, key_metric), writes=rank == 0)
    if early_stop_patience is not None:
        score = lambda e: _score(e.state.metrics[key_metric])  # noqa: E731
        run.early_stopping = EarlyStopping(patience=early_stop_patience, score_function=score, trainer=trainer)

    saved = None
    if resume and (output_dir / "last.pt").exists():
        saved = _restore(run, trainer, output_dir / "last.pt")
        if run.stopped_early or trainer.state.epoch >= epochs:
            logger.info("%s: run already finished at epoch %d; nothing to train", output_dir, trainer.state.epoch)
            return _finish(run, trainer.state.epoch, world)
        if saved["scaler"] is not None and use_amp:  # the trainer creates its GradScaler when it starts
            trainer.add_event_handler(Events.STARTED, lambda e: e.scaler.load_state_dict(saved["scaler"]))
        logger.info("resuming %s after epoch %d", output_dir, trainer.state.epoch)

    trainer.add_event_handler(Events.EPOCH_STARTED, _EpochSeeds(generator, train_data, seed, num_workers, rank))
    _EpochLoss(device if world > 1 else None).attach(trainer)
    if grad_clip is not None:
        params = [p for g in groups for p in g["params"]]
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, _GradClip(params, grad_clip))
    if world > 1:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, _SyncBuffers(model))  # before validation
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, _SameMetrics((*task_metrics(task), "loss"), device))
    attach_scheduler(lr_scheduler, trainer, evaluator)  # after _SameMetrics: plateau steps on rank 0's loss
    ValidationHandler(interval=val_every, validator=evaluator, epoch_level=True).attach(trainer)
    if run.early_stopping is not None:
        evaluator.add_event_handler(Events.COMPLETED, run.early_stopping)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, run.epoch_completed)
    closables = (_attach_trackers(trainer, evaluator, output_dir, tensorboard, mlflow_uri,
                                  progress and on_terminal(), run_config) if rank == 0 else [])

    model.train()
    if saved is not None:
        set_rng_state(saved["rng"])  # last: nothing may draw random numbers between this and the first batch
    try:
        with torch_threads(num_threads):
            trainer.run()
    finally:
        for closable in closables:
            closable.close()
    return _finish(run, trainer.state.epoch, world)


def _score(value: float) -> float:
    """Early-stopping score: an undefined metric (nan) never counts as an improvement."""
    return -math.inf if math.isnan(value) else value


def _restore(run: _Run, trainer: SupervisedTrainer, last: Path) -> dict:
    """Load ``last.pt`` of the same run into the model, optimizer, bookkeeping and engine counters."""
    saved = load_checkpoint(last)
    _resume_check(saved["run_config"], run.run_config, last)
    try:
        run.model.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.scheduler.load_state_dict(saved["scheduler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise TrainingError(f"{last} does not fit this model/optimizer: {err}") from err
    run.history, run.best_metric, run.best_epoch = saved["history"], saved["best_metric"], saved["best_epoch"]
    run.initial_state, run.stopped_early = saved["initial_state"], saved["stopped_early"]
    for record in run.history:  # the selection rule's state (best score, EMA) is a function of the history
        if "val_loss" in record:
            run.selection.update(record)
    if run.early_stopping is not None and saved["early_stopping"] is not None:
        run.early_stopping.load_state_dict(saved["early_stopping"])
    trainer.state.epoch, trainer.state.iteration = saved["engine"]["epoch"], saved["engine"]["iteration"]
    return saved


def _finish(run: _Run, epochs_run: int, world: int = 1) -> TrainResult:
    if world > 1:
        dist.barrier()  # rank 0 has written its checkpoints: every rank sees them from here on
    result = run.result(epochs_run)
    if run.writes:
        summary = {**asdict(result), "stopped_early": run.stopped_early, "run_id": run.provenance["run_id"]}
        write_text(run.output_dir / "result.json", json.dumps(_json_safe(summary), indent=2))
    return result


def evaluate(model: nn.Module, data, *, task: str, batch_size: int = 8, device="cpu", series_key: str | None = None,
             aggregation: str = "max", amp: bool = False) -> EvalResult:
    """Metrics of ``model`` on ``data`` (same sample format as :func:`train`) and one prediction row per case.

    Rows hold ``id`` (when samples carry one), ``label`` and ``probabilities`` (classification) or ``dice`` /
    ``jaccard`` (segmentation). With ``series_key`` rows and metrics are per series, windows aggregated by
    ``aggregation`` (max or mean) — the CTPA protocol.
    """
    check_task(task)
    if aggregation not in AGGREGATIONS:
        raise TrainingError(f"aggregation={aggregation!r} is not supported; choose one of {', '.join(AGGREGATIONS)}")
    if series_key is not None and task == "segmentation":
        raise TrainingError("series_key (window -> series aggregation) applies to classification tasks only")
    device, use_amp = _device_and_amp(device, amp)
    model.to(device)
    num_outputs = _probe_outputs(model, _first_sample(data, "data"), task, device, "data")
    check_labels_upfront(data, task, num_outputs, "data", series_key or ID_KEY)
    evaluator, collector = _evaluator(model, data, task, num_outputs, batch_size, 0, device, use_amp, series_key,
                                      aggregation, "data")
    evaluator.run()
    metrics = {name: float(evaluator.state.metrics[name]) for name in task_metrics(task)}
    return EvalResult(metrics=metrics, predictions=collector.rows)
