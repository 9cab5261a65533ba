"""The epoch's mean training loss and duration, and the divergence check."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from ...errors import TrainingError
from .._blocks import _rank_and_world


class EpochLoss:
    """Mean training loss of the epoch (summed on the device: no host sync per iteration) into
    ``state.metrics["train_loss"]`` and its duration into ``state.metrics["epoch_seconds"]``; in a distributed run
    the mean over every rank's batches, the same on all ranks. A non-finite mean stops the run."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.total, self.count, self.start = 0.0, 0, time.perf_counter()

    def iteration(self, engine: Engine) -> None:
        self.total = self.total + engine.state.output[CommonKeys.LOSS].detach()
        self.count += 1

    def completed(self, engine: Engine) -> None:
        total, count = float(self.total), self.count
        if _rank_and_world()[1] > 1:
            both = torch.tensor([total, count], dtype=torch.float64, device=engine.state.device)
            dist.all_reduce(both)
            total, count = both.tolist()
        loss = total / max(count, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"training diverged: mean loss of epoch {engine.state.epoch} is {loss}; lower lr or "
                                "set grad_clip")
        engine.state.metrics["train_loss"] = loss
        engine.state.metrics["epoch_seconds"] = time.perf_counter() - self.start
