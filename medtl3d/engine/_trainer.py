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

import functools
import json
import logging
import math
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Events
from ignite.handlers import EarlyStopping
from monai.data import DataLoader
from monai.engines import IterationEvents, SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.utils import set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from ..errors import TrainingError
from ..locking import output_lock
from ..provenance import build_provenance, data_hash, dataset_items
from ..reporting import write_text
from ._blocks import (ID_KEY, _attach_trackers, _EpochLoss, _EpochSeeds, _evaluator, _GradClip, _json_safe,
                      _rank_and_world, _resume_check, _SameMetrics, _SyncBuffers, _write_history)
from ._builders import plain_config
from ._checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ._checks import _check_options, _device_and_amp, _first_sample, _probe_outputs
from ._tasks import BatchPreparer, check_labels_upfront, check_task, make_loss, task_metrics
from .metrics import AGGREGATIONS
from .optim import OPTIMIZERS, attach_scheduler, build_scheduler, check_scheduler, param_groups
from .runtime import check_num_threads, on_terminal, torch_threads
from .selection import ModelSelection, check_select

logger = logging.getLogger("medtl3d.engine")

_PAUSE_AFTER: ContextVar[int | None] = ContextVar("medtl3d_pause_after", default=None)


@contextmanager
def pause_after(epoch: int | None):
    """Runs of :func:`train` started inside stop after ``epoch`` (None: no pause) and keep ``last.pt``: a pause,
    not an early stop. The schedule still spans the run's ``epochs``, and a later run of the same configuration
    outside the pause (or with a later one) resumes from ``last.pt`` as if it had never stopped. A context rather
    than an argument: the caller that pauses (the cutoff search's early termination) runs bundles whose fixed
    ``run`` expressions cannot forward a search-only option."""
    token = _PAUSE_AFTER.set(None if epoch is None else int(epoch))
    try:
        yield
    finally:
        _PAUSE_AFTER.reset(token)


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
    pause = _PAUSE_AFTER.get()
    if resume and (output_dir / "last.pt").exists():
        saved = _restore(run, trainer, output_dir / "last.pt")
        if run.stopped_early or trainer.state.epoch >= min(epochs, pause or epochs):
            logger.info("%s: run already at epoch %d; nothing to train", output_dir, trainer.state.epoch)
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
    if pause is not None:  # after epoch_completed: a pause is not recorded as an early stop
        trainer.add_event_handler(Events.EPOCH_COMPLETED(event_filter=lambda _, epoch: epoch == pause),
                                  lambda engine: engine.terminate())
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
