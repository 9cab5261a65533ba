"""Training and evaluation on MONAI's ignite engines: losses and metrics per task, LWFT parameter groups,
gradient clipping, AMP, early stopping, TensorBoard/MLflow, atomic checkpoints that carry the model's initial
state, and bit-exact resume.

``train(model, train_data, val_data, task=...)`` fine-tunes and checkpoints, ``evaluate(model, data, task=...)``
scores (optionally per series), ``load_model(path)`` rebuilds a checkpointed model from its ``model_config`` with
a registered builder (``register_builder(name, fn)`` adds one; any other name in a file is refused).
"""

from ._builders import available_builders, register_builder
from ._checkpoint import load_checkpoint, load_model
from ._tasks import TASKS, default_key_metric
from ._trainer import OPTIMIZERS, EvalResult, TrainResult, evaluate, pause_after, train
from .metrics import aggregate_series, classification_metrics, segmentation_metrics

__all__ = [
    "OPTIMIZERS",
    "TASKS",
    "EvalResult",
    "TrainResult",
    "aggregate_series",
    "available_builders",
    "classification_metrics",
    "default_key_metric",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "pause_after",
    "register_builder",
    "segmentation_metrics",
    "train",
]
