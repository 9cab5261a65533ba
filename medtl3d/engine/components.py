"""The pieces a training run is built from, as functions a bundle config references (``_target_`` or ``$``) and
:func:`medtl3d.engine.train` calls: one code path for the YAML and the Python API.

Each is rank-aware, so the same config trains in one process or data-parallel under ``torchrun`` (the bundles'
``multi_gpu_train.yaml`` only picks the device and starts the process group).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from ignite.metrics import Loss
from monai.data import DataLoader
from monai.data import DistributedSampler as MonaiDistributedSampler
from monai.utils import CommonKeys
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from ..provenance import build_provenance, data_hash, dataset_items
from ._blocks import ID_KEY, _rank_and_world
from ._builders import plain_config
from ._checks import _first_sample, _probe_outputs, check_count, check_series, resolve_device
from ._tasks import CaseCollector, check_labels_upfront, check_task, make_loss


def train_loader(dataset, batch_size: int, *, num_workers: int = 0, seed: int = 0, device="cpu") -> DataLoader:
    """The training loader: a ``DistributedSampler`` (one replica per rank; a single one without a process group)
    shuffles with seed + epoch (MONAI's workflow calls its ``set_epoch``), so an epoch's order never depends on how
    earlier epochs consumed a shared generator and each rank gets an equal share; the loader's own generator
    (reseeded per epoch by :class:`~medtl3d.engine.handlers.EpochSeeds`) only seeds workers and transforms. A last
    batch of one sample is dropped: it cannot train batch norm."""
    check_count("batch_size", batch_size, 1)
    check_count("num_workers", num_workers, 0)
    rank, world = _rank_and_world()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    single_last = len(sampler) % batch_size == 1 and len(sampler) > 1
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      generator=torch.Generator(), pin_memory=resolve_device(device).type == "cuda",
                      drop_last=single_last)


def val_loader(dataset, batch_size: int, *, num_workers: int = 0, device="cpu") -> DataLoader:
    """The validation loader, in dataset order; with several ranks each evaluates cases rank, rank + world, ...
    (no padding duplicates; :class:`~medtl3d.engine._tasks.CaseCollector` gathers them back)."""
    check_count("batch_size", batch_size, 1)
    check_count("num_workers", num_workers, 0)
    rank, world = _rank_and_world()
    sampler = None if world == 1 else MonaiDistributedSampler(dataset, even_divisible=False, num_replicas=world,
                                                              rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, sampler=sampler,
                      pin_memory=resolve_device(device).type == "cuda")


def check_data(model: nn.Module, train_data, val_data, *, task: str, device="cpu", series_key: str | None = None,
               names: tuple[str, str] = ("train_data", "val_data")) -> int:
    """Check both datasets' first sample, the model's output on it and every label that can be read up front;
    returns the model's number of outputs (what the batches' labels are checked against). ``names`` are what the
    errors call the two datasets (evaluation passes its test data first)."""
    _first_sample(train_data, names[0])
    num_outputs = _probe_outputs(model, _first_sample(val_data, names[1]), task, resolve_device(device), names[1])
    check_labels_upfront(train_data, task, num_outputs, names[0], series_key or ID_KEY)
    check_labels_upfront(val_data, task, num_outputs, names[1], series_key or ID_KEY)
    return num_outputs


def data_parallel(model: nn.Module, device="cpu") -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when several ranks train, else ``model`` itself (the
    trainer steps through the wrapper; checkpoints, evaluation and parameter groups use the model)."""
    if _rank_and_world()[1] == 1:
        return model
    device = resolve_device(device)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def initial_state(model: nn.Module) -> dict:
    """The weights fine-tuning starts from (stored in every checkpoint for the analyses): a ``TransferModel``'s
    own detached copy, else a snapshot taken now."""
    initial = getattr(model, "initial_state", None)
    if initial:
        return {k: v.detach().cpu() for k, v in initial.items()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def model_config(model: nn.Module) -> dict | None:
    """How to rebuild ``model`` from a checkpoint (plain data only), when it records one."""
    config = getattr(model, "model_config", None)
    return None if config is None else plain_config(dict(config), "model_config")


def run_provenance(model: nn.Module, train_data, val_data, run_config: Mapping) -> dict | None:
    """The provenance record of the run (versions, pretrained weights, content hashes of the data, its
    configuration); None on the ranks > 0 of a distributed run, which write nothing."""
    if _rank_and_world()[0] > 0:
        return None
    backbone = getattr(model, "backbone", None)  # its load record (entry, file, SHA-256, tensors), else its source
    weights = getattr(backbone, "weights_record", None) or getattr(backbone, "weights_source", None)
    return build_provenance(weights=weights,
                            config=dict(run_config),
                            data={"train": data_hash(dataset_items(train_data)), "val": data_hash(dataset_items(val_data))})


def run_config(**fields) -> dict:
    """What a resumed run must share with the checkpoint it continues (and the provenance records): ``fields``,
    plus ``world_size`` in a distributed run (a different world size changes the batches)."""
    world = _rank_and_world()[1]
    return {**fields, **({"world_size": world} if world > 1 else {})}


def case_metrics(task: str, *, series_key: str | None = None, aggregation: str = "max",
                 postprocessing=None) -> CaseCollector:
    """Every metric of ``task`` from the whole validation epoch (per series with ``series_key``), scoring what
    ``postprocessing`` makes of the logits (default :func:`~medtl3d.engine._tasks.post_transform`)."""
    check_task(task)
    check_series(task, series_key, aggregation)
    return CaseCollector(task, id_key=ID_KEY, series_key=series_key, aggregation=aggregation,
                         world=_rank_and_world()[1], postprocessing=postprocessing)


class DeferredSummaryWriter:
    """A TensorBoard ``SummaryWriter`` for ``log_dir`` made on its first use, not when the config is parsed: the
    event file then appears only once the run holds its output folder's lock
    (:class:`~medtl3d.engine.handlers.OutputLock`), so a run refused on a locked folder writes nothing there."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self._writer = str(log_dir), None

    def __getattr__(self, name: str):
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        return getattr(self._writer, name)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def val_loss(task: str, device="cpu") -> Loss:
    """The validation loss (per window with a series key): model selection's tie-breaker, the plateau schedule's
    signal."""
    return Loss(make_loss(task), output_transform=lambda out: (out[CommonKeys.PRED], out[CommonKeys.LABEL]),
                device=resolve_device(device))
