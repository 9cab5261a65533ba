"""Windows of N axial slices for 3D CTPA: window-level training, series-level evaluation (the PENet protocol).

:func:`slice_windows` cuts a depth into windows of ``num_slices`` with ``overlap`` slices shared by neighbours; the
last window is aligned to the end of the volume, so every slice is covered and no window runs past the end. A
volume shorter than ``num_slices`` gives one window ``(0, num_slices)`` that :func:`take_window` pads *after* the
last slice with the volume's minimum (air once the HU window is applied: PENet pads with air, ``AIR_HU_VAL``) and
masks with 0.

:class:`WindowDataset` loads and preprocesses each volume once (MONAI ``CacheDataset`` over the deterministic part
of the transform), then serves windows; random transforms of the pipeline run on each window, not on the whole
volume. Our own code because MONAI's patch samplers (``GridPatchDataset``, ``RandSpatialCropSamplesd``) neither
align the last window to the end nor keep the window -> series bookkeeping series-level aggregation needs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, Randomizable

from ..errors import DataError
from .io import LoadCased
from .transforms import monai_errors_unwrapped

LABEL_SOURCES = ("series", "mask")


def slice_windows(depth: int, num_slices: int, overlap: int = 0) -> list[tuple[int, int]]:
    """``(start, stop)`` slice ranges of ``num_slices`` covering ``range(depth)``, neighbours sharing ``overlap``.

    Starts step by ``num_slices - overlap``; a final window ``(depth - num_slices, depth)`` is added when the steps
    do not end exactly at ``depth``. ``depth < num_slices`` gives ``[(0, num_slices)]`` (padded by
    :func:`take_window`).
    """
    for name, value in (("depth", depth), ("num_slices", num_slices), ("overlap", overlap)):
        if int(value) != value:
            raise DataError(f"{name} must be an integer, got {value!r}")
    if depth < 1 or num_slices < 1:
        raise DataError(f"depth={depth} and num_slices={num_slices} must be >= 1")
    if not 0 <= overlap < num_slices:
        raise DataError(f"overlap={overlap} must be in [0, num_slices={num_slices})")
    if depth <= num_slices:
        return [(0, num_slices)]
    step = num_slices - overlap
    starts = list(range(0, depth - num_slices + 1, step))
    if starts[-1] != depth - num_slices:
        starts.append(depth - num_slices)
    return [(s, s + num_slices) for s in starts]


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def take_window(volume: torch.Tensor, start: int, stop: int, pad_value: float | None = None) -> torch.Tensor:
    """Slices ``start:stop`` of a (C, D, H, W) volume as a new plain tensor; past the end it is padded with
    ``pad_value`` (default: the volume's minimum). A copy, never a view: transforms that work in place (MONAI's
    ``NormalizeIntensity`` when no random transform before it fired) must not change the cached volume, or a later
    epoch - and a run resumed from a checkpoint, which starts from a fresh cache - would see other data."""
    volume = _plain(volume)
    window = volume[:, start:stop].clone()
    missing = stop - start - window.shape[1]
    if missing > 0:
        value = volume.min() if pad_value is None else pad_value
        pad = torch.full((volume.shape[0], missing, *volume.shape[2:]), float(value), dtype=volume.dtype)
        window = torch.cat([window, pad], dim=1)
    return window


def split_transform(transform: Compose | Sequence | None) -> tuple[Compose, Compose]:
    """(deterministic prefix, rest from the first random transform on) of a ``Compose``/list of transforms."""
    if transform is None:
        return Compose([]), Compose([])
    transforms = list((transform if isinstance(transform, Compose) else Compose(transform)).flatten().transforms)
    first_random = next((i for i, t in enumerate(transforms) if isinstance(t, Randomizable)), len(transforms))
    return Compose(transforms[:first_random]), Compose(transforms[first_random:])


class WindowDataset(torch.utils.data.Dataset):
    """Windows of ``num_slices`` axial slices from 3D volumes, each yielded as a dict:

    ``image`` (C, N, H, W) float tensor; ``label``: the series label (``label_from="series"``) or 1 iff the
    lesion mask ``mask_key`` has foreground voxels in the window before random transforms (``"mask"``, int64;
    the mask window itself is returned too); ``series``: the id to aggregate windows by (the item's ``series``
    entry, else its image path or case id); ``window``: the window's index within its series; ``start``: its first
    slice.

    ``items`` hold ``image`` (path or :class:`~medtl3d.data.io.Case`), ``label`` and, for ``label_from="mask"``,
    ``mask_key``. ``transform`` is the preprocessing (e.g. ``preset("ct", train=..., label_key=mask_key)``) and must
    output (C, D, H, W) with D the slice axis; its random transforms must keep D. Volumes are loaded with
    :class:`~medtl3d.data.io.LoadCased` (``irregular`` passed on) and the deterministic part of ``transform`` is
    applied once: kept in memory with ``cache=True`` (MONAI ``CacheDataset``, ``num_workers`` threads, its
    "Loading dataset" bar with ``progress``: the bundles show it on a terminal only; each window is
    copied out of it, so in-place transforms leave it intact), recomputed at every access with ``cache=False``
    (then each volume is also preprocessed once up front to count windows).
    """

    def __init__(self, items: Sequence[Mapping[str, Any]], transform: Compose | Sequence | None,
                 num_slices: int = 24, overlap: int = 0, label_from: str = "series", mask_key: str = "lesion",
                 cache: bool = True, num_workers: int = 1, irregular: str = "refuse", progress: bool = True) -> None:
        if label_from not in LABEL_SOURCES:
            raise DataError(f"label_from={label_from!r}: expected one of {LABEL_SOURCES}")
        slice_windows(num_slices, num_slices, overlap)  # validates num_slices / overlap
        self.items = [dict(item) for item in items]
        for i, item in enumerate(self.items):
            needed = ["image"] + (["label"] if label_from == "series" else [mask_key])
            missing = [k for k in needed if item.get(k) is None]
            if missing:
                raise DataError(f"item {i} ({item.get('image', '?')}) has no {', '.join(map(repr, missing))} "
                                f"(needed for label_from={label_from!r})")
        self.num_slices, self.overlap = int(num_slices), int(overlap)
        self.label_from, self.mask_key = label_from, mask_key
        self.keys = ["image"] + ([mask_key] if label_from == "mask" else [])
        deterministic, self.random = split_transform(transform)
        prepare = Compose([LoadCased(self.keys, irregular=irregular), *deterministic.transforms])
        with monai_errors_unwrapped():
            self._volumes = (CacheDataset(self.items, prepare, cache_rate=1.0, num_workers=num_workers,
                                          copy_cache=False, progress=progress)
                             if cache else Dataset(self.items, prepare))
        self.series = [str(item.get("series") or getattr(item["image"], "case_id", item["image"]))
                       for item in self.items]
        self.windows: list[tuple[int, int, int, int]] = []  # (item, window index, start, stop)
        for i in range(len(self.items)):
            volume = self._volume(i)
            for w, (start, stop) in enumerate(slice_windows(volume["image"].shape[1], self.num_slices,
                                                            self.overlap)):
                self.windows.append((i, w, start, stop))

    def _volume(self, i: int) -> dict:
        with monai_errors_unwrapped():
            data = self._volumes[i]
        image = data["image"]
        if image.ndim != 4:
            raise DataError(f"{self.items[i]['image']}: the transform gave shape {tuple(image.shape)}; windows need "
                            "(C, D, H, W) volumes (use a 3D preset such as preset('ct', ...))")
        if self.label_from == "mask" and tuple(data[self.mask_key].shape[1:]) != tuple(image.shape[1:]):
            raise DataError(f"{self.items[i][self.mask_key]}: mask shape {tuple(data[self.mask_key].shape)} after "
                            f"the transform differs from the image's {tuple(image.shape)}; build the transform with "
                            f"label_key={self.mask_key!r}")
        return data

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        i, w, start, stop = self.windows[index]
        data = self._volume(i)
        window = {"image": take_window(data["image"], start, stop)}
        if self.label_from == "mask":
            window[self.mask_key] = take_window(data[self.mask_key], start, stop, pad_value=0)
            label = torch.tensor(int(bool((window[self.mask_key] > 0).any())))
        else:
            label = torch.as_tensor(self.items[i]["label"])
        window = self.random(window) if self.random.transforms else window
        out = {"image": _plain(window["image"]), "label": label, "series": self.series[i], "window": w,
               "start": start}
        if self.label_from == "mask":
            out[self.mask_key] = _plain(window[self.mask_key])
        return out
