"""A progress bar on a terminal only: a log file would fill with carriage-return lines."""

from __future__ import annotations

from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.utils import CommonKeys

from .._blocks import _rank_and_world
from ..runtime import on_terminal


class Progress:
    """ignite's ``ProgressBar`` with the running loss, attached when stderr is a terminal, on rank 0."""

    def attach(self, engine: Engine) -> None:
        if on_terminal() and _rank_and_world()[0] == 0:
            ProgressBar(persist=False).attach(engine, output_transform=lambda out: {"loss": out[CommonKeys.LOSS]})
