"""What keeps the ranks of a data-parallel run in step; both do nothing in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn

from .._blocks import _rank_and_world


class SyncBuffers:
    """Rank 0's buffers (BatchNorm running statistics) to every rank after each epoch, before validation: DDP
    broadcasts them only at the start of each forward, so after the last step each rank holds its own. List it
    before ``ValidationHandler``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attach(self, engine: Engine) -> None:
        if _rank_and_world()[1] > 1:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for buffer in self.model.buffers():
            dist.broadcast(buffer, src=0)


class SameMetrics:
    """Rank 0's validation metrics on every rank (an evaluator handler), so best-checkpoint and early-stopping
    decisions agree even where the ranks' evaluations differ in the last bits (non-deterministic GPU kernels)."""

    def attach(self, engine: Engine) -> None:
        if _rank_and_world()[1] > 1:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        names = sorted(metrics)
        values = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64,
                              device=engine.state.device)
        dist.broadcast(values, src=0)
        metrics.update(zip(names, values.tolist()))
