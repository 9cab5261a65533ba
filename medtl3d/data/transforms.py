"""The small MONAI transforms the presets are made of where MONAI has no equivalent, and the unwrapping of our
errors from MONAI's transform wrappers.

MONAI's ``Transposed`` leaves the affine stale (so later inverses break), and it has no rank or colour-space
conversion for channel-first images; torchvision's ColorJitter alone always fires (:class:`RandApplyd`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Hashable, Mapping

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, InvertibleTransform, MapTransform, RandomizableTransform

from ..errors import DataError, medtl3d_cause

_LUMA = (0.299, 0.587, 0.114)


def _source(img) -> str:
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return f"{name}: " if name else ""


class ToSpatialDimsd(MapTransform, InvertibleTransform):
    """Make images ``spatial_dims``-D: a single slice (C, x, y) becomes a one-slice volume (C, x, y, 1) for 3D, a
    one-frame volume (C, x, y, 1) becomes (C, x, y) for 2D; any other mismatch is a :class:`DataError`."""

    def __init__(self, keys, spatial_dims: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            have = img.ndim - 1
            if have == self.spatial_dims:
                change = 0
            elif have == 2 and self.spatial_dims == 3:
                img, change = img.unsqueeze(-1), 1
            elif have == 3 and self.spatial_dims == 2 and img.shape[-1] == 1:
                img, change = img.squeeze(-1), -1
            else:
                raise DataError(
                    f"{_source(img)}{key!r} has shape {tuple(img.shape)} (channels + {have} spatial axes); this "
                    f"preset needs a {self.spatial_dims}D image"
                    + (" (a 3D volume cannot go through a 2D preset)" if have == 3 else "")
                )
            d[key] = img
            self.push_transform(d, key, extra_info={"change": change})
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            change = self.pop_transform(d, key)["extra_info"]["change"]
            if change == 1:
                d[key] = d[key].squeeze(-1)
            elif change == -1:
                d[key] = d[key].unsqueeze(-1)
        return d


class ToChannelsd(MapTransform):
    """Bring images to ``channels`` (1 or 3): RGB(A) -> gray with ITU-R 601 luma weights (PIL's ``convert("L")``),
    gray -> RGB by repetition, alpha dropped."""

    def __init__(self, keys, channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels!r}")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            have = img.shape[0]
            if have in (2, 4):  # gray + alpha, RGB + alpha
                img, have = img[: have - 1], have - 1
            if have == 3 and self.channels == 1:
                weights = torch.tensor(_LUMA, dtype=img.dtype, device=img.device).view(3, *[1] * (img.ndim - 1))
                img = (img * weights).sum(0, keepdim=True)
            elif have == 1 and self.channels == 3:
                img = img.repeat(3, *[1] * (img.ndim - 1))
            elif have != self.channels:
                raise DataError(f"{_source(img)}{key!r} has {d[key].shape[0]} channels; cannot make {self.channels}")
            d[key] = img
        return d


class ReverseSpatialAxesd(MapTransform, InvertibleTransform):
    """MONAI's (C, x, y[, z]) -> the models' (C, [z,] y, x): rows first, slices first. Reverses the spatial axes and
    the matching affine columns (so the image keeps its place in the world); its own inverse."""

    @staticmethod
    def _reverse(img):
        spatial = img.ndim - 1
        out = img.permute(0, *range(spatial, 0, -1))
        if isinstance(out, MetaTensor):
            affine = out.affine.clone()
            affine[:, :spatial] = affine[:, list(range(spatial - 1, -1, -1))]
            out.affine = affine
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._reverse(d[key])
            self.push_transform(d, key)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.pop_transform(d, key)
            d[key] = self._reverse(d[key])
        return d




class RandApplyd(RandomizableTransform, MapTransform):
    """Apply a map transform with probability ``prob`` (torchvision's ColorJitter alone always fires)."""

    def __init__(self, transform: MapTransform, prob: float) -> None:
        MapTransform.__init__(self, transform.keys)
        RandomizableTransform.__init__(self, prob)
        self.transform = transform

    def __call__(self, data):
        self.randomize(None)
        return self.transform(data) if self._do_transform else dict(data)



@contextmanager
def monai_errors_unwrapped():
    """Let a medtl3d error out as itself when MONAI wrapped it in ``RuntimeError("applying transform ...")``."""
    try:
        yield
    except RuntimeError as err:
        cause = medtl3d_cause(err)
        if cause is None:
            raise
        raise type(cause)(str(cause)) from err


class PresetCompose(Compose):
    """A ``Compose`` that lets our own errors (a 3D volume given to a 2D preset, ...) out as they are."""

    def __call__(self, input_, *args, **kwargs):
        with monai_errors_unwrapped():
            return super().__call__(input_, *args, **kwargs)


