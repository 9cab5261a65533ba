"""The inputs of every similarity measure: two activation sets as finite float64 ``(datapoints, features)``
matrices of the same datapoints, flattened by one policy; the error for a similarity undefined on them."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import AnalysisError
from .activations import flatten_activations, resize_spatial

CKA_POLICY = "flatten"
CCA_POLICY = "spatial"


class UndefinedSimilarityError(AnalysisError):
    """A similarity that is undefined for these inputs (constant activations, too few datapoints): a layer
    similarity matrix records it as NaN instead of failing."""


def _tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray) or not isinstance(a, torch.Tensor):
        a = torch.as_tensor(np.asarray(a))
    if not a.is_floating_point():
        a = a.to(torch.float64)
    finite = torch.isfinite(a)
    if not bool(finite.all()):
        nan = int(torch.isnan(a).sum())
        raise AnalysisError(f"{name} contains {nan} NaN and {int((~finite).sum()) - nan} inf values "
                            f"(shape {tuple(a.shape)}): similarities need finite activations")
    return a


def as_features(a, policy: str = CKA_POLICY, spatial_size=None, channels: int | None = None, seed: int = 0,
                name: str = "activations") -> torch.Tensor:
    """A finite float64 ``(datapoints, features)`` matrix from an array/tensor (4D/5D maps follow ``policy``)."""
    a = flatten_activations(_tensor(a, name), policy, spatial_size, channels, seed).to(torch.float64)
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise AnalysisError(f"{name} has shape {tuple(a.shape)}: need at least one datapoint and one feature")
    return a


def prepare_pair(x, y, policy: str, spatial_size=None, channels: int | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten two activation sets the same way and check they have the same datapoints.

    With the ``"spatial"`` policy and maps of different spatial size (and no ``spatial_size``), both are pooled to
    the smaller grid so that their positions correspond.
    """
    x, y = _tensor(x, "x"), _tensor(y, "y")
    if policy == "spatial" and spatial_size is None and x.ndim >= 3 and y.ndim >= 3 and x.shape[2:] != y.shape[2:]:
        if x.ndim != y.ndim:
            raise AnalysisError(f"the 'spatial' policy needs maps with the same number of spatial axes, got x "
                                f"{tuple(x.shape)} and y {tuple(y.shape)}")
        common = tuple(min(a, b) for a, b in zip(x.shape[2:], y.shape[2:]))
        x, y = resize_spatial(x, common), resize_spatial(y, common)
    fx = as_features(x, policy, spatial_size, channels, seed, "x")
    fy = as_features(y, policy, spatial_size, channels, seed, "y")
    if fx.shape[0] != fy.shape[0]:
        raise AnalysisError(
            f"x has {fx.shape[0]} datapoints (rows) but y has {fy.shape[0]} (shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}, policy {policy!r}): both activation sets must come from the same inputs in the "
            "same order" + (" and, with 'spatial', share one spatial_size" if policy == "spatial" else "")
        )
    return fx, fy
