"""Weight files and catalogue names in, backbone (and published head) tensors out; see :mod:`._loading` and the
weights catalogue (:mod:`.catalogue`, entries in :mod:`._entries`)."""

from ._adapt import adapt_input_channels, inflate_kernel, inflate_state_dict, replicate_depth_padding_
from ._hub import timm_weights
from . import _entries  # noqa: F401  (registers the hand-listed catalogue entries)
from .catalogue import (Preprocessing, WeightsEntry, cache_folder, cached_file, entry_file, entry_for_file, full_name,
                        get_weights, is_cached, is_weights_name, list_weights, register_weights, weights_for,
                        weights_or_none)
from ._loading import LoadReport, flatten_checkpoint, load_backbone_state, read_checkpoint, resolve_weights

__all__ = [
    "LoadReport",
    "Preprocessing",
    "WeightsEntry",
    "cache_folder",
    "cached_file",
    "entry_file",
    "entry_for_file",
    "get_weights",
    "is_cached",
    "is_weights_name",
    "list_weights",
    "register_weights",
    "weights_for",
    "weights_or_none",
    "adapt_input_channels",
    "flatten_checkpoint",
    "full_name",
    "inflate_kernel",
    "inflate_state_dict",
    "load_backbone_state",
    "read_checkpoint",
    "replicate_depth_padding_",
    "resolve_weights",
    "timm_weights",
]
