"""medtl3d: how much of a pretrained 2D/3D network to reuse for a medical-imaging task, what it costs, and why."""

from .backbones import Backbone, CutPoint, create_backbone, list_backbones
from .strategies import STRATEGIES, TransferModel, apply_strategy, create_model

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "Backbone",
    "CutPoint",
    "TransferModel",
    "__version__",
    "apply_strategy",
    "create_backbone",
    "create_model",
    "list_backbones",
]
