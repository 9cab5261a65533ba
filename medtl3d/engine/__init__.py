"""Training and evaluation on MONAI's ignite engines: losses and metrics per task, LWFT parameter groups,
gradient clipping, AMP, early stopping, TensorBoard/MLflow, atomic checkpoints that carry the model's initial
state, and bit-exact resume.

``train(model, train_data, val_data, task=...)`` fine-tunes and checkpoints, ``evaluate(model, data, task=...)``
scores (optionally per series), ``load_model(path)`` rebuilds a checkpointed model from its ``model_config`` with
a registered builder (``register_builder(name, fn)`` adds one; any other name in a file is refused).
:mod:`medtl3d.engine.components` and :mod:`medtl3d.engine.handlers` are the pieces ``train`` and the bundles'
``train.yaml`` build a run from.
"""

from ._builders import available_builders, register_builder
from ._checkpoint import load_checkpoint, load_model
from ._tasks import TASKS, BatchPreparer, default_key_metric, make_loss, post_transform, task_metrics
from ._trainer import OPTIMIZERS, evaluate, train
from .results import EvalResult, TrainResult
from .metrics import aggregate_series, classification_metrics, segmentation_metrics
from .handlers import pause_after
from .optim import build_scheduler, param_groups

__all__ = [
    "BatchPreparer",
    "OPTIMIZERS",
    "TASKS",
    "EvalResult",
    "TrainResult",
    "aggregate_series",
    "available_builders",
    "build_scheduler",
    "classification_metrics",
    "default_key_metric",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "make_loss",
    "param_groups",
    "pause_after",
    "post_transform",
    "register_builder",
    "segmentation_metrics",
    "task_metrics",
    "train",
]
