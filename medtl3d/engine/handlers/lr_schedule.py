"""Step any learning-rate scheduler at the right moment, with MONAI's ``LrScheduleHandler``."""

from __future__ import annotations

from ignite.engine import Engine
from monai.handlers import LrScheduleHandler
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ...errors import TrainingError


class LrSchedule:
    """``ReduceLROnPlateau``: after each validation, on the validation loss (``evaluator.state.metrics["loss"]``);
    the schedules of :func:`medtl3d.engine.optim.build_scheduler` (closed-form in the iteration): after every
    iteration; any other torch scheduler (``StepLR``, ``CosineAnnealingLR``, ...): after every epoch.
    ``per_iteration`` overrides the last two."""

    def __init__(self, lr_scheduler, evaluator: Engine | None = None, per_iteration: bool | None = None) -> None:
        if isinstance(lr_scheduler, ReduceLROnPlateau) and evaluator is None:
            raise TrainingError("ReduceLROnPlateau steps on the validation loss: give LrSchedule the evaluator")
        self.scheduler, self.evaluator = lr_scheduler, evaluator
        self.per_iteration = getattr(lr_scheduler, "per_iteration", False) if per_iteration is None else per_iteration

    def attach(self, engine: Engine) -> None:
        if isinstance(self.scheduler, ReduceLROnPlateau):
            LrScheduleHandler(self.scheduler, print_lr=False, epoch_level=True,
                              step_transform=lambda e: e.state.metrics["loss"]).attach(self.evaluator)
        else:
            LrScheduleHandler(self.scheduler, print_lr=False, epoch_level=not self.per_iteration).attach(engine)
