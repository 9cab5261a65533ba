"""Gradient-norm clipping between backward and optimizer step."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines import IterationEvents

from .._checks import check_grad_clip


class GradClip:
    """Clip the norm of the gradients of every parameter the trainer's optimizer steps to ``max_norm``, after the
    backward pass (AMP gradients unscaled first)."""

    def __init__(self, max_norm: float) -> None:
        check_grad_clip(max_norm)
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)
