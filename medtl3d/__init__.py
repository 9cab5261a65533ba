"""medtl3d: how much of a pretrained 2D/3D network to reuse for a medical-imaging task, what it costs, and why."""

from ._version import __version__
from .backbones import Backbone, CutPoint, create_backbone, list_backbones
from .strategies import STRATEGIES, TransferModel, apply_strategy, create_model

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
