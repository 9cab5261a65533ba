"""``train`` and ``evaluate`` on MONAI's ignite engines (``SupervisedTrainer`` / ``SupervisedEvaluator``).

``train`` assembles, in Python, the run a bundle's ``train.yaml`` assembles in YAML, from the same pieces: the
components of :mod:`medtl3d.engine.components` (loaders, data checks, initial state, provenance, DDP wrapper,
metrics), the optimizer over :func:`~medtl3d.engine.optim.param_groups`, a schedule of
:func:`~medtl3d.engine.optim.build_scheduler`, and the handlers of :mod:`medtl3d.engine.handlers` in the YAML's
order (MONAI's ``ValidationHandler`` and TensorBoard / MLflow handlers among them). What it adds over the YAML is
the checking of its keyword options, each error naming the option.

Resume is bit-identical on CPU (per-(seed, epoch) data seeds, RNG states in every checkpoint); under ``torchrun``
(the bundles' ``multi_gpu_train.yaml``) training is data-parallel, rank 0's validation metrics decide on every
rank, and only rank 0 writes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MLFlowHandler, TensorBoardStatsHandler, ValidationHandler
from monai.utils import optional_import, set_determinism
from torch import nn

from ..errors import TrainingError
from . import components, handlers
from ._blocks import ID_KEY, _rank_and_world
from ._builders import plain_config
from ._checks import _check_options, _device_and_amp, _first_sample, _probe_outputs
from ._tasks import BatchPreparer, check_labels_upfront, default_key_metric, make_loss, task_metrics
from .optim import OPTIMIZERS, build_scheduler, check_scheduler, param_groups
from .results import EvalResult, TrainResult
from .runtime import check_num_threads, torch_threads
from .selection import check_select

logger = logging.getLogger("medtl3d.engine")


# ----------------------------------------------------------------------------------------------- public API
def train(model: nn.Module, train_data, val_data, *, task: str, output_dir, epochs: int = 10, lr: float = 1e-3,
          weight_decay: float = 0.0, optimizer: str = "adamw", batch_size: int = 8, num_workers: int = 0,
          amp: bool = False, grad_clip: float | None = None, key_metric: str | None = None,
          early_stop_patience: int | None = None, seed: int = 0, device="cpu", resume: bool = True,
          tensorboard: bool = True, mlflow_uri: str | None = None, progress: bool = True, val_every: int = 1,
          series_key: str | None = None, aggregation: str = "max", model_config: dict | None = None,
          scheduler: str = "cosine", warmup_epochs: float = 0, scheduler_options: dict | None = None,
          select: str = "key_metric", num_threads: int | None = None, ckpt_path=None,
          inference: Mapping | None = None, lock: Mapping | None = None) -> TrainResult:
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
    once; ``lock`` maps config ids to the folders to hold instead, so the error names the id), and every
    checkpoint carries a ``provenance`` record (:func:`medtl3d.provenance.build_provenance`: versions,
    pretrained weights, content hashes of the train/val data, the run's configuration). With ``ckpt_path`` the
    best checkpoint also becomes a bundle model there, with its ``inference`` settings
    (:class:`~medtl3d.engine.handlers.ExportModel`). The model is trained in place (it ends with the last
    epoch's weights; :func:`load_model` reads ``best.pt``).

    This is the run a bundle's ``train.yaml`` builds: the components of :mod:`medtl3d.engine.components`, MONAI's
    ``SupervisedTrainer`` / ``SupervisedEvaluator`` and the handlers of :mod:`medtl3d.engine.handlers`, in the
    same order.

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
    set_determinism(seed=seed)

    model.to(device)
    num_outputs = components.check_data(model, train_data, val_data, task=task, device=device, series_key=series_key)
    initial = components.initial_state(model)
    if val_every > epochs:
        logger.warning("val_every=%d > epochs=%d: no validation will run, so no best.pt", val_every, epochs)
    opt = OPTIMIZERS[optimizer](param_groups(model, lr, weight_decay), lr=lr, weight_decay=weight_decay)
    loader = components.train_loader(train_data, batch_size, num_workers=num_workers, seed=seed, device=device)
    lr_scheduler = build_scheduler(scheduler, opt, epochs=epochs, steps_per_epoch=len(loader),
                                   warmup_epochs=warmup_epochs, **scheduler_options)
    if warmup_epochs >= epochs:
        logger.warning("warmup_epochs=%g covers the whole run (epochs=%d): the learning rate only rises",
                       warmup_epochs, epochs)
    run_config = components.run_config(
        task=task, lr=lr, weight_decay=weight_decay, optimizer=optimizer, batch_size=batch_size, amp=bool(amp),
        grad_clip=grad_clip, key_metric=key_metric, seed=seed, val_every=val_every, series_key=series_key,
        aggregation=aggregation, model_config=model_config, train_size=len(train_data), val_size=len(val_data),
        scheduler=scheduler, warmup_epochs=warmup_epochs, scheduler_options=scheduler_options, select=select)
    trackers = _trackers(output_dir, tensorboard, mlflow_uri, run_config)
    evaluator = SupervisedEvaluator(
        device=device, network=model,
        val_data_loader=components.val_loader(val_data, batch_size, num_workers=num_workers, device=device),
        prepare_batch=BatchPreparer(task, num_outputs, series_key or ID_KEY, "val_data"),
        key_val_metric={key_metric: components.case_metrics(task, series_key=series_key, aggregation=aggregation)},
        additional_metrics={"loss": components.val_loss(task, device)}, amp=use_amp, decollate=False,
        val_handlers=[handlers.SameMetrics(), *trackers["validate"]],
    )
    train_handlers = [
        handlers.OutputLock(lock or [output_dir]),
        handlers.TrainingCheckpoint(output_dir, model, opt, lr_scheduler, initial_state=initial,
                                    run_config=run_config, model_config=model_config, key_metric=key_metric,
                                    provenance=components.run_provenance(model, train_data, val_data, run_config),
                                    resume=resume),
        handlers.EpochSeeds(loader, seed),
        handlers.EpochLoss(),
        *([handlers.GradClip(grad_clip)] if grad_clip is not None else []),
        handlers.SyncBuffers(model),
        handlers.LrSchedule(lr_scheduler, evaluator),
        ValidationHandler(interval=val_every, validator=evaluator, epoch_level=True),
        handlers.History(evaluator, output_dir),
        handlers.SelectModel(select, key_metric),
        *([handlers.EarlyStop(early_stop_patience, key_metric)] if early_stop_patience is not None else []),
        *trackers["train"],
        *([handlers.Progress()] if progress else []),
        handlers.ExportModel(output_dir, key_metric, select, ckpt_path=ckpt_path, task=task, inference=inference,
                             model=model, train_data=train_data, val_data=val_data),
    ]
    trainer = SupervisedTrainer(
        device=device, max_epochs=epochs, train_data_loader=loader, network=components.data_parallel(model, device),
        optimizer=opt, loss_function=make_loss(task),
        prepare_batch=BatchPreparer(task, num_outputs, series_key or ID_KEY, "train_data"), amp=use_amp,
        decollate=False, optim_set_to_none=True, train_handlers=train_handlers,
    )
    model.train()
    try:
        with torch_threads(num_threads):
            trainer.run()
    finally:
        for closable in trackers["close"]:
            closable.close()
    return trainer.state.result


def _trackers(output_dir: Path, tensorboard: bool, mlflow_uri: str | None, run_config: dict) -> dict:
    """MONAI's TensorBoard / MLflow handlers (per-epoch train loss and validation metrics, rank 0 only) for the
    trainer and the evaluator, and what must be closed when training ends."""
    out: dict = {"train": [], "validate": [], "close": []}
    if _rank_and_world()[0] > 0:
        return out
    if tensorboard:
        writer = components.DeferredSummaryWriter(output_dir / "tensorboard")
        quiet = {"summary_writer": writer, "iteration_log": False, "output_transform": lambda _: None}
        out["train"].append(TensorBoardStatsHandler(**quiet))
        out["validate"].append(TensorBoardStatsHandler(**quiet))
        out["close"].append(writer)
    if mlflow_uri:
        _, has_mlflow = optional_import("mlflow")
        if not has_mlflow:
            raise TrainingError(f"mlflow_uri={mlflow_uri!r} but mlflow is not installed (pip install mlflow)")
        common = {"tracking_uri": str(mlflow_uri), "experiment_name": "medtl3d", "run_name": output_dir.name,
                  "iteration_log": False, "output_transform": lambda _: None}
        try:
            out["train"].append(MLFlowHandler(**common, experiment_param={k: str(v) for k, v in run_config.items()}))
            out["validate"].append(MLFlowHandler(**common))
        except ValueError as err:
            raise TrainingError(f"mlflow_uri={mlflow_uri!r}: {err}") from err
    return out


def evaluate(model: nn.Module, data, *, task: str, batch_size: int = 8, device="cpu", series_key: str | None = None,
             aggregation: str = "max", amp: bool = False) -> EvalResult:
    """Metrics of ``model`` on ``data`` (same sample format as :func:`train`) and one prediction row per case.

    Rows hold ``id`` (when samples carry one), ``label`` and ``probabilities`` (classification) or ``dice`` /
    ``jaccard`` (segmentation). With ``series_key`` rows and metrics are per series, windows aggregated by
    ``aggregation`` (max or mean) — the CTPA protocol.
    """
    collector = components.case_metrics(task, series_key=series_key, aggregation=aggregation)
    device, use_amp = _device_and_amp(device, amp)
    model.to(device)
    num_outputs = _probe_outputs(model, _first_sample(data, "data"), task, device, "data")
    check_labels_upfront(data, task, num_outputs, "data", series_key or ID_KEY)
    evaluator = SupervisedEvaluator(
        device=device, network=model, val_data_loader=components.val_loader(data, batch_size, device=device),
        prepare_batch=BatchPreparer(task, num_outputs, series_key or ID_KEY, "data"),
        key_val_metric={default_key_metric(task): collector}, amp=use_amp, decollate=False)
    evaluator.run()
    metrics = {name: float(evaluator.state.metrics[name]) for name in task_metrics(task)}
    return EvalResult(metrics=metrics, predictions=collector.rows)
