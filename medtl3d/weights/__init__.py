"""Weight files and hub names in, backbone (and published head) tensors out; see :mod:`._loading`."""

from ._adapt import adapt_input_channels, inflate_kernel, inflate_state_dict, replicate_depth_padding_
from ._hub import timm_weights, torchvision_weights
from ._loading import LoadReport, flatten_checkpoint, load_backbone_state, read_checkpoint, resolve_weights

__all__ = [
    "LoadReport",
    "adapt_input_channels",
    "flatten_checkpoint",
    "inflate_kernel",
    "inflate_state_dict",
    "load_backbone_state",
    "read_checkpoint",
    "replicate_depth_padding_",
    "resolve_weights",
    "timm_weights",
    "torchvision_weights",
]
