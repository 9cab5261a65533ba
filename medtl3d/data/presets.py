"""Preprocessing presets per modality: MONAI dictionary-transform ``Compose`` pipelines, 2D and 3D alike.

``preset(name, train=..., keys=("image",), label_key=None, **options)`` builds one of

=============  ==========================================================================================
``ct``         3D CT (CTPA): one channel; HU window ``window`` (PENet's [-100, 900]) scaled to [0, 1] with
               clipping; ``Orientationd`` (``orientation``, default RAS); ``Spacingd`` (``spacing`` in mm, None
               keeps the voxel grid); in-plane resize to ``resize`` then crop to ``size`` (192); train: random
               in-plane crop, small in-plane rotation/zoom, intensity scale/shift, optional flips.
``cxr``        2D X-ray: one channel (RGB(A) -> gray with ITU-R 601 luma weights, like PIL's ``convert("L")``);
               intensity scaled to [0, 1] per image (``intensity="minmax"``) or from a fixed range; resize to
               ``size`` (224); train: small rotation/zoom and contrast (gamma) jitter. No horizontal flip by
               default: chest anatomy is lateralised (heart on the left), a mirrored film is a different anatomy.
``pathology``  2D RGB patches: 8-bit range scaled to [0, 1]; resize to ``resize`` then crop to ``size`` (128);
               train: flips, 90-degree rotations and colour jitter (brightness/contrast/saturation/hue, the
               stain-agnostic augmentation of Tellez et al. 2019 minus HED: ``torchvision.ColorJitter`` through
               MONAI's ``RandTorchVisiond``).
=============  ==========================================================================================

Input: dictionaries of channel-first ``MetaTensor``s as MONAI's ``LoadImage(ensure_channel_first=True)`` (and
:func:`medtl3d.data.io.load_image`) produce them: (C, x, y[, z]), x = columns. Output, the axis order models take:
(C, H, W) for 2D (rows first, as PIL/pydicom show the image) and (C, D, H, W) for 3D with D the axial/slice axis
(PENet-style). :class:`ReverseSpatialAxesd` makes that conversion right after the affine-aware steps (orientation,
spacing); it updates the affine and is invertible, so MONAI's ``Invertd`` with the same ``Compose`` brings a
predicted mask back to the original voxel grid (see :mod:`medtl3d.inference`).

``normalize`` (every preset) comes last: ``"auto"`` (the default) applies the normalisation the pretrained
``weights`` (a catalogue name, see :mod:`medtl3d.weights.catalogue`) were trained with, mapped onto the preset's
[0, 1] output and its channel count; without weights it does nothing. An explicit value wins. A trained model
records what ``auto`` resolved to (:func:`effective_options`), so inference needs neither the catalogue nor the
weights.

``label_key`` names a segmentation mask: it goes through the same spatial transforms with nearest-neighbour
interpolation, no intensity transform, and leaves as ``int64``. Random transforms come after all deterministic ones
(so MONAI's ``CacheDataset`` and :class:`~medtl3d.data.windows.WindowDataset` cache the deterministic part).
In-plane resizing does not keep the aspect ratio (like ``torchvision.transforms.Resize((h, w))``); images are
anti-aliased when downsampled.

The transforms MONAI lacks (rank, channel and axis-order conversion) are in :mod:`medtl3d.data.transforms`.
"""

from __future__ import annotations

import ast
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    CastToTyped,
    CenterSpatialCropd,
    Compose,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandTorchVisiond,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
)

from ..errors import DataError
from ..weights import entry_for_file, get_weights, is_weights_name, weights_or_none
from .transforms import PresetCompose, RandApplyd, ReverseSpatialAxesd, ToChannelsd, ToSpatialDimsd

#: PENet's contrast window (``ct_pe_constants.CONTRAST_HU_MIN/MAX``) and the mean it subtracts after scaling.
PENET_WINDOW = (-100.0, 900.0)
PENET_MEAN = 0.15897
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESET_CHANNELS = {"ct": 1, "cxr": 1, "pathology": 3}  # the channels each preset outputs
logger = logging.getLogger("medtl3d.data")


# ----------------------------------------------------------------------------------------------- option checks
def _pair(name: str, value, preset_name: str) -> tuple[int, int]:
    size = (value, value) if isinstance(value, (int, np.integer)) else tuple(value) if value is not None else ()
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise DataError(f"preset {preset_name!r}: option {name}={value!r} must be a positive int or (height, width)")
    return int(size[0]), int(size[1])


def _range(name: str, value, preset_name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"preset {preset_name!r}: option {name}={value!r} must be a pair (low, high)") from None
    if not lo < hi:
        raise DataError(f"preset {preset_name!r}: option {name}={value!r} needs low < high")
    return lo, hi


def auto_normalization(weights, channels: int, preset_name: str) -> dict | None:
    """``normalize="auto"``: the normalisation the weights were trained with (:meth:`Preprocessing.normalization`
    of their catalogue entry, for ``channels`` channels), from a catalogue name or a catalogue entry's file; None
    without weights (random init has no convention, inputs stay in [0, 1])."""
    weights = weights_or_none(weights)
    if weights is None:
        return None
    entry = entry_for_file(weights) if Path(str(weights)).is_file() else None
    if entry is None and is_weights_name(weights):
        entry = get_weights(weights)
    if entry is None:
        raise DataError(f"preset {preset_name!r}: normalize='auto' cannot tell how weights {weights!r} expect their "
                        "input: give their full catalogue name (e.g. densenet121.imagenet; `medtl3d weights list`) "
                        "or set normalize explicitly (imagenet, penet, zscore or (mean, std))")
    return {**entry.preprocessing.normalization(channels), "weights": entry.name}


def effective_options(name: str, options: Mapping[str, Any]) -> dict:
    """``options`` of preset ``name`` with ``normalize="auto"`` (the default) replaced by what it resolves to, so
    the settings saved with a model reproduce its preprocessing without the catalogue (what inference reads)."""
    options = dict(options)
    if options.get("normalize", preset_options(name)["normalize"]) == "auto":
        options["normalize"] = auto_normalization(options.get("weights"), PRESET_CHANNELS[name], name)
    return options


def _normalize_transform(keys, normalize, channels: int, preset_name: str, weights=None):
    """``"auto"`` (from ``weights``, see :func:`auto_normalization`), ``None``, ``"imagenet"`` (gray: the channel
    mean 0.449 / 0.226, as timm does for 1-channel models), ``"penet"`` (subtract PENet's mean 0.15897),
    ``"zscore"`` (each image standardised over its non-zero voxels, as MedicalNet), ``(mean, std)`` or
    ``{"mean": [...], "std": [...]}`` per channel (what ``auto`` resolves to and a trained model records)."""
    if normalize == "auto":
        normalize = auto_normalization(weights, channels, preset_name)
        logger.info("preset %r: normalize='auto' from weights %r -> %s", preset_name, weights, normalize)
    if normalize is None:
        return []
    if normalize == "zscore" or (isinstance(normalize, Mapping) and normalize.get("zscore") == "nonzero"):
        return [NormalizeIntensityd(keys, nonzero=True, channel_wise=True)]
    try:
        if normalize == "imagenet":
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
        elif normalize == "penet":
            mean, std = (PENET_MEAN,), (1.0,)
        elif isinstance(normalize, Mapping):
            mean, std = tuple(map(float, normalize["mean"])), tuple(map(float, normalize["std"]))
        else:
            if len(normalize) != 2:
                raise ValueError
            mean, std = (float(normalize[0]),), (float(normalize[1]),)
        if min(std) <= 0 or {len(mean), len(std)} - {1, channels}:
            raise ValueError
    except (TypeError, ValueError, IndexError, KeyError):
        raise DataError(f"preset {preset_name!r}: option normalize={normalize!r} must be 'auto', None, 'imagenet', "
                        f"'penet', 'zscore', (mean, std > 0) or {{'mean': [...], 'std': [...]}} with 1 or "
                        f"{channels} values") from None
    return [NormalizeIntensityd(keys, subtrahend=np.array(mean * (channels // len(mean)), dtype=np.float32),
                                divisor=np.array(std * (channels // len(std)), dtype=np.float32),
                                channel_wise=True)]


def _spatial_chain(spatial_dims: int, keys: list, label_key, *, size, resize, train: bool, preset_name: str):
    """Resize in-plane to ``resize`` then crop to ``size`` (random crop when training), in model axis order."""
    size = _pair("size", size, preset_name)
    resize = size if resize is None else _pair("resize", resize, preset_name)
    if resize[0] < size[0] or resize[1] < size[1]:
        raise DataError(f"preset {preset_name!r}: resize={resize} must be at least size={size}")
    all_keys = keys + ([label_key] if label_key else [])
    keep_depth = (-1,) * (spatial_dims - 2)
    image_mode = "bilinear" if spatial_dims == 2 else "trilinear"
    chain = [Resized(all_keys, keep_depth + resize, mode=[image_mode] * len(keys) + ["nearest"] * bool(label_key),
                     anti_aliasing=[True] * len(keys) + [False] * bool(label_key))]
    if resize != size:
        crop = RandSpatialCropd if train else CenterSpatialCropd
        kwargs = {"random_size": False} if train else {}
        chain.append(crop(all_keys, roi_size=keep_depth + size, **kwargs))
    return chain


def _geometric_augmentation(spatial_dims: int, keys: list, label_key, *, rotate: float, zoom: float,
                            flip: bool | Sequence[int], prob: float) -> list:
    """Small in-plane rotation/zoom (rotation about the slice axis in 3D) and optional flips of the in-plane axes."""
    all_keys = keys + ([label_key] if label_key else [])
    modes = ["bilinear"] * len(keys) + ["nearest"] * bool(label_key)
    chain = []
    if rotate or zoom:
        rotate_range = (np.deg2rad(rotate),) + (0.0,) * (spatial_dims - 2)  # 3D: about the slice axis only
        scale_range = (0.0,) * (spatial_dims - 2) + (zoom, zoom)
        chain.append(RandAffined(all_keys, prob=prob, rotate_range=rotate_range, scale_range=scale_range,
                                 mode=modes, padding_mode="zeros"))
    axes = [] if not flip else list(range(spatial_dims - 2, spatial_dims)) if flip is True else list(flip)
    chain += [RandFlipd(all_keys, prob=0.5, spatial_axis=int(axis)) for axis in axes]
    return chain


# ----------------------------------------------------------------------------------------------- presets
def ct_preset(keys: list, label_key, train: bool, *, window=PENET_WINDOW, orientation: str | None = "RAS",
              spacing=None, size=192, resize=None, normalize="auto", weights=None, rotate: float = 15.0,
              zoom: float = 0.1, intensity: float = 0.05, flip=False, prob: float = 0.5) -> Compose:
    """CT volumes -> (1, D, H, W) in [0, 1] (before ``normalize``); ``size``/``resize`` are in-plane (H, W).
    ``orientation="LPS"`` makes each axial slice look as DICOM viewers show it (row 0 anterior, column 0 the
    patient's right); RAS shows it mirrored in both axes."""
    lo, hi = _range("window", window, "ct")
    all_keys = keys + ([label_key] if label_key else [])
    chain: list[Callable] = [ToSpatialDimsd(all_keys, 3), ToChannelsd(keys, 1)]
    if orientation:
        chain.append(Orientationd(all_keys, axcodes=orientation, labels=None))
    if spacing is not None:
        try:
            pixdim = tuple(float(s) for s in spacing)
            if len(pixdim) != 3 or min(pixdim) <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise DataError(f"preset 'ct': option spacing={spacing!r} must be None or 3 positive mm values "
                            "(x, y, z)") from None
        chain.append(Spacingd(all_keys, pixdim=pixdim, mode=["bilinear"] * len(keys) + ["nearest"] * bool(label_key)))
    chain.append(ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    chain.append(ReverseSpatialAxesd(all_keys))
    chain += _spatial_chain(3, keys, label_key, size=size, resize=resize, train=train, preset_name="ct")
    if train:
        chain += _geometric_augmentation(3, keys, label_key, rotate=rotate, zoom=zoom, flip=flip, prob=prob)
        if intensity:
            chain += [RandScaleIntensityd(keys, factors=intensity, prob=prob),
                      RandShiftIntensityd(keys, offsets=intensity, prob=prob)]
    return _finish(chain, keys, label_key, normalize, weights, PRESET_CHANNELS["ct"], "ct")


def cxr_preset(keys: list, label_key, train: bool, *, size=224, resize=None, intensity="minmax", normalize="auto",
               weights=None, rotate: float = 10.0, zoom: float = 0.1, gamma: float = 0.2, flip=False,
               prob: float = 0.5) -> Compose:
    """X-rays -> (1, H, W) in [0, 1] (before ``normalize``). ``intensity``: ``"minmax"`` per image, or a fixed
    ``(low, high)`` range clipped to [0, 1] (e.g. (0, 255) keeps 8-bit brightness)."""
    all_keys = keys + ([label_key] if label_key else [])
    chain: list[Callable] = [ToSpatialDimsd(all_keys, 2), ToChannelsd(keys, 1)]
    if intensity == "minmax":
        chain.append(ScaleIntensityd(keys, minv=0.0, maxv=1.0))
    else:
        lo, hi = _range("intensity", intensity, "cxr")
        chain.append(ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    chain.append(ReverseSpatialAxesd(all_keys))
    chain += _spatial_chain(2, keys, label_key, size=size, resize=resize, train=train, preset_name="cxr")
    if train:
        chain += _geometric_augmentation(2, keys, label_key, rotate=rotate, zoom=zoom, flip=flip, prob=prob)
        if gamma:
            chain.append(RandAdjustContrastd(keys, prob=prob, gamma=(1.0 - gamma, 1.0 + gamma)))
    return _finish(chain, keys, label_key, normalize, weights, PRESET_CHANNELS["cxr"], "cxr")


def pathology_preset(keys: list, label_key, train: bool, *, size=128, resize=None, intensity=(0.0, 255.0),
                     normalize="auto", weights=None, jitter=(0.25, 0.25, 0.25, 0.05), flip=True,
                     prob: float = 0.8) -> Compose:
    """RGB patches -> (3, H, W). ``jitter`` = ColorJitter's (brightness, contrast, saturation, hue), applied with
    probability ``prob``; ``flip`` adds flips of both axes and random 90-degree rotations (orientation-free tissue)."""
    all_keys = keys + ([label_key] if label_key else [])
    lo, hi = _range("intensity", intensity, "pathology")
    chain: list[Callable] = [ToSpatialDimsd(all_keys, 2), ToChannelsd(keys, 3),
                             ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
                             ReverseSpatialAxesd(all_keys)]
    chain += _spatial_chain(2, keys, label_key, size=size, resize=resize, train=train, preset_name="pathology")
    if train:
        chain += _geometric_augmentation(2, keys, label_key, rotate=0.0, zoom=0.0, flip=flip, prob=prob)
        if flip:
            chain.append(RandRotate90d(all_keys, prob=0.5, spatial_axes=(0, 1)))
        if jitter:
            try:
                brightness, contrast, saturation, hue = (float(j) for j in jitter)
            except (TypeError, ValueError):
                raise DataError(f"preset 'pathology': option jitter={jitter!r} must be (brightness, contrast, "
                                "saturation, hue)") from None
            color = RandTorchVisiond(keys, name="ColorJitter", brightness=brightness, contrast=contrast,
                                     saturation=saturation, hue=hue)
            chain.append(RandApplyd(color, prob))
    return _finish(chain, keys, label_key, normalize, weights, PRESET_CHANNELS["pathology"], "pathology")


def _finish(chain: list, keys: list, label_key, normalize, weights, channels: int, preset_name: str) -> PresetCompose:
    chain += _normalize_transform(keys, normalize, channels, preset_name, weights)
    if label_key:
        chain.append(CastToTyped(label_key, dtype=torch.int64))
    return PresetCompose(chain)


PRESETS: dict[str, Callable[..., Compose]] = {"ct": ct_preset, "cxr": cxr_preset, "pathology": pathology_preset}


def preset_options(name: str) -> dict[str, Any]:
    """The options of a preset with their defaults."""
    if name not in PRESETS:
        raise DataError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    params = inspect.signature(PRESETS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def preset(name: str, *, train: bool, keys: Sequence[str] | str = ("image",), label_key: str | None = None,
           **options) -> Compose:
    """The ``name`` preset as a MONAI ``Compose`` over ``keys`` (and the mask ``label_key``); see the module doc."""
    valid = preset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"preset {name!r} has no option {', '.join(map(repr, unknown))}; its options are "
                        + ", ".join(f"{k}={v!r}" for k, v in valid.items()))
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys or label_key in keys:
        raise DataError(f"preset {name!r}: keys={keys!r} must be non-empty and not contain label_key={label_key!r}")
    return PRESETS[name](keys, label_key, bool(train), **options)


def parse_preset_options(pairs, option: str = "--preset-option") -> dict:
    """``["size=64", "window=-100,900", "spacing=None", "orientation=LPS"]`` -> options: values are Python
    literals (numbers, tuples, None, True/False) when they parse as such, else strings; errors name ``option``."""
    options = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise DataError(f"{option} {pair!r}: expected KEY=VALUE")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        options[key.strip()] = value
    return options
