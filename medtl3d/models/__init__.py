"""Task models built on a (truncated) backbone other than the classifier of :mod:`medtl3d.strategies`.

``create_unet`` / :class:`TruncatedUNet`: segmentation U-Net whose encoder is a pretrained backbone cut at any cut
point, 2D or 3D.
"""

from .unet import TruncatedUNet, UpStage, create_unet, plan_decoder, select_skip_cuts

__all__ = ["TruncatedUNet", "UpStage", "create_unet", "plan_decoder", "select_skip_cuts"]
