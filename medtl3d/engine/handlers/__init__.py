"""The training run's ignite handlers, one per file, so a bundle's ``train#handlers`` list names each one and a
user can remove, reorder or add handlers (MONAI's and ignite's own included) in the YAML.

Order matters where one handler reads what another wrote on ``trainer.state`` at the same event:
:class:`OutputLock` first (it takes the folders' locks at ``STARTED``, before :class:`TrainingCheckpoint` resumes),
``ValidationHandler`` before :class:`History`, then :class:`SelectModel` and :class:`EarlyStop`, which read the
history. :class:`TrainingCheckpoint` saves after every other ``EPOCH_COMPLETED`` handler wherever it is listed, and
:class:`ExportModel` writes the run's result at ``COMPLETED``. Everything a resumed run needs besides the weights,
optimizer and scheduler is a function of ``trainer.state.history``.
"""

from .checkpoint import TrainingCheckpoint, pause_after
from .distributed import SameMetrics, SyncBuffers
from .early_stopping import EarlyStop
from .epoch_loss import EpochLoss
from .epoch_seeds import EpochSeeds
from .export import ExportModel
from .grad_clip import GradClip
from .history import History
from .lock import OutputLock
from .lr_schedule import LrSchedule
from .progress import Progress
from .selection import SelectModel

__all__ = [
    "pause_after",
    "EarlyStop",
    "EpochLoss",
    "EpochSeeds",
    "ExportModel",
    "GradClip",
    "History",
    "LrSchedule",
    "OutputLock",
    "Progress",
    "SameMetrics",
    "SelectModel",
    "SyncBuffers",
    "TrainingCheckpoint",
]
