"""medtl3d: how much of a pretrained 2D/3D network to reuse for a medical-imaging task, what it costs, and why."""

from .backbones import Backbone, CutPoint, create_backbone, list_backbones

__version__ = "0.1.0"

__all__ = ["Backbone", "CutPoint", "__version__", "create_backbone", "list_backbones"]
