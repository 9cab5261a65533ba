"""DICOM series geometry and pixels: slices sorted along the slice normal, missing slices, non-uniform spacing and
gantry tilt reported (:func:`read_series_headers`), pixel values in modality units, resampling onto a regular grid."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from medtl3d.errors import DataError


@dataclass(frozen=True)
class SeriesGeometry:
    """Geometry of a DICOM series (or enhanced multi-frame file), slices sorted along the slice normal.

    ``slices`` are (file, frame) pairs (frame ``None`` for single-frame files). ``row_cosine`` / ``column_cosine``
    are ImageOrientationPatient, ``pixel_spacing`` is PixelSpacing (between rows, between columns) in mm,
    ``positions`` are ImagePositionPatient (LPS, mm) and ``heights`` their projections on the normal.
    ``problems`` lists what :func:`load_image` refuses or resamples: missing slices, non-uniform spacing, tilt.
    """

    location: Path
    slices: tuple[tuple[Path, int | None], ...]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    positions: tuple[tuple[float, float, float], ...]
    heights: tuple[float, ...]
    slice_spacing: float | None
    multi_frame: bool
    has_patient_geometry: bool
    problems: tuple[str, ...] = ()
    tilt_degrees: float = 0.0

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    @property
    def regular(self) -> bool:
        return not self.problems

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_cosine), np.asarray(self.column_cosine))

    def affine_lps(self) -> np.ndarray:
        """4x4 voxel (column, row, slice) -> LPS mm affine; the slice step is (last - first) / (n - 1)."""
        r, c = np.asarray(self.row_cosine), np.asarray(self.column_cosine)
        dr, dc = self.pixel_spacing
        pos = np.asarray(self.positions, dtype=np.float64)
        step = (pos[-1] - pos[0]) / (len(pos) - 1) if len(pos) > 1 else self.normal
        affine = np.eye(4)
        affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = r * dc, c * dr, step, pos[0]
        return affine


class _FramesNotAVolume(DataError):
    """A multi-frame DICOM whose frames have no positions (cine, time series): one frame can still be loaded."""


def _mm(x: float) -> str:
    s = f"{x:.3f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _floats(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: invalid {what} {value!r}") from e
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise DataError(f"{where}: invalid {what} {value!r}")
    return arr


def _functional(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset | None:
    """Item of a functional-group macro for ``frame``: per-frame first, then shared (enhanced multi-frame)."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq and idx < len(seq) and seq[idx].get(sequence):
            return seq[idx].get(sequence)[0]
    return None


def _slice_headers(path: Path, ds: pydicom.Dataset) -> list[dict]:
    """Per-slice geometry of one file: one entry, or one per frame for a multi-frame file."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    common = {"rows": int(ds.Rows), "columns": int(ds.Columns)}
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        return [dict(common, source=(path, None), where=path.name, position=ds.get("ImagePositionPatient"),
                     orientation=ds.get("ImageOrientationPatient"), spacing=spacing)]
    out = []
    for i in range(frames):
        pos, ori, pix = (_functional(ds, i, s) for s in
                         ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
        out.append(dict(common, source=(path, i), where=f"frame {i}",
                        position=pos.get("ImagePositionPatient") if pos else None,
                        orientation=(ori.get("ImageOrientationPatient") if ori else None)
                        or ds.get("ImageOrientationPatient"),
                        spacing=(pix.get("PixelSpacing") if pix else None) or ds.get("PixelSpacing")))
    return out


def read_series_headers(files: Sequence[str | Path]) -> SeriesGeometry:
    """Read the headers of one series (or one multi-frame file) and check that the slices form a volume.

    Slices are sorted by ImagePositionPatient along the slice normal (row x column cosines). Raises DataError, naming
    the folder, for what no resampling can fix: unreadable headers, missing geometry tags, differing Rows/Columns,
    ImageOrientationPatient or PixelSpacing, two slices at one position (several volumes in one series), a
    multi-frame file without per-frame positions. Missing slices (a step > 1.5x the median spacing), non-uniform
    spacing (> 5% off the median), gantry tilt and in-plane slice offsets are returned in ``problems``.
    """
    files = [Path(f) for f in files]
    if not files:
        raise DataError("read_series_headers: no files given")
    location = files[0].parent if len(files) > 1 else files[0]
    headers: list[dict] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001 - parser failures are reported with the file name
            raise DataError(f"{f}: unreadable DICOM header: {type(e).__name__}: {e}") from e
        if "Rows" not in ds or "Columns" not in ds:
            raise DataError(f"{f}: DICOM without an image (no Rows/Columns)")
        headers += _slice_headers(f, ds)
    multi_frame = len(files) == 1 and len(headers) > 1
    if len(files) > 1 and len(headers) != len(files):
        raise DataError(f"{location}: series mixes multi-frame and single-frame files; load them one by one")

    first = headers[0]
    for h in headers[1:]:
        if (h["rows"], h["columns"]) != (first["rows"], first["columns"]):
            raise DataError(f"{location}: inconsistent image size: {first['where']} is {first['rows']}x"
                            f"{first['columns']}, {h['where']} is {h['rows']}x{h['columns']}")

    def at(h: dict) -> str:
        return f"{location}: {h['where']}" if h["where"] != location.name else str(location)

    def spacing_of(h: dict) -> np.ndarray:
        sp = _floats(h["spacing"], 2, "PixelSpacing", at(h)) if h["spacing"] is not None else np.ones(2)
        return np.where(sp > 0, sp, 1.0)

    has_geometry = all(h["position"] is not None and h["orientation"] is not None for h in headers)
    if not has_geometry:
        if len(headers) > 1:
            missing = next(h for h in headers if h["position"] is None or h["orientation"] is None)
            what = "multi-frame file of {} frames" if multi_frame else "series of {} slices"
            raise (_FramesNotAVolume if multi_frame else DataError)(
                f"{location}: {what.format(len(headers))} but {missing['where']} has no "
                            "ImagePositionPatient/ImageOrientationPatient: cannot stack the slices into a volume "
                            "(cine or time series?); pass volume_index to load one frame")
        sp = spacing_of(first)
        return SeriesGeometry(location, (first["source"],), first["rows"], first["columns"], (sp[0], sp[1]),
                              (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), ((0.0, 0.0, 0.0),), (0.0,), None, False, False)

    orient = [_floats(h["orientation"], 6, "ImageOrientationPatient", at(h)) for h in headers]
    spacings = [spacing_of(h) for h in headers]
    for h, o, s in zip(headers[1:], orient[1:], spacings[1:]):
        if np.abs(o - orient[0]).max() > 1e-3:
            raise DataError(f"{location}: inconsistent ImageOrientationPatient: {first['where']} has "
                            f"{orient[0].round(4).tolist()}, {h['where']} has {o.round(4).tolist()}")
        if np.abs(s - spacings[0]).max() > 1e-3 * spacings[0].max():
            raise DataError(f"{location}: inconsistent PixelSpacing: {first['where']} has {spacings[0].tolist()}, "
                            f"{h['where']} has {s.tolist()}")
    r, c = orient[0][:3], orient[0][3:]
    if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(r @ c) > 1e-2:
        raise DataError(f"{location}: ImageOrientationPatient {orient[0].tolist()} is not two orthonormal vectors")
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    n = np.cross(r, c)
    pos = np.stack([_floats(h["position"], 3, "ImagePositionPatient", at(h)) for h in headers])
    heights = pos @ n
    order = np.argsort(heights, kind="stable")
    headers, pos, heights = [headers[i] for i in order], pos[order], heights[order]
    sp = spacings[0]

    problems: list[str] = []
    slice_spacing, tilt = None, 0.0
    if len(headers) > 1:
        steps = np.diff(heights)
        dup = np.flatnonzero(steps < 1e-3)
        if dup.size:
            i = dup[0]
            raise DataError(f"{location}: {dup.size} slice pair{'s' if dup.size > 1 else ''} at the same position "
                            f"(z={_mm(heights[i])}: {headers[i]['where']} and {headers[i + 1]['where']}); several "
                            "volumes (echoes, phases, time points) in one series cannot be stacked")
        m = float(np.median(steps))
        slice_spacing = m
        gaps = [(i, int(round(steps[i] / m)) - 1) for i in np.flatnonzero(steps > 1.5 * m)]
        for i, k in gaps[:5]:
            problems.append(f"{max(k, 1)} missing slice{'s' if k > 1 else ''} between z={_mm(heights[i])} and "
                            f"z={_mm(heights[i + 1])} (spacing {_mm(m)} mm)")
        if len(gaps) > 5:
            problems.append(f"and {len(gaps) - 5} more gaps")
        odd = [i for i in np.flatnonzero(np.abs(steps - m) > 0.05 * m) if steps[i] <= 1.5 * m]
        if odd:
            problems.append(f"non-uniform slice spacing: steps from {_mm(steps.min())} to {_mm(steps.max())} mm "
                            f"(median {_mm(m)} mm, {len(odd)} step{'s' if len(odd) > 1 else ''} off by > 5%)")
        offsets = (pos - pos[0]) - np.outer(heights - heights[0], n)  # in-plane shift of each slice
        shift = float(np.linalg.norm(offsets[-1]))
        tol = 0.25 * float(sp.min())
        if shift > tol:
            tilt = math.degrees(math.atan2(shift, heights[-1] - heights[0]))
            problems.append(f"gantry tilt of {tilt:.1f} degrees (slices shifted {_mm(shift)} mm in-plane over the "
                            "stack, positions not along the slice normal)")
        line = np.outer((heights - heights[0]) / (heights[-1] - heights[0]), offsets[-1])
        deviation = float(np.linalg.norm(offsets - line, axis=1).max())
        if deviation > tol:
            problems.append(f"slice positions not on a straight line (in-plane deviation up to {_mm(deviation)} mm)")

    return SeriesGeometry(
        location=location, slices=tuple(h["source"] for h in headers), rows=first["rows"],
        columns=first["columns"], pixel_spacing=(float(sp[0]), float(sp[1])), row_cosine=tuple(r.tolist()),
        column_cosine=tuple(c.tolist()), positions=tuple(map(tuple, pos.tolist())),
        heights=tuple(heights.tolist()), slice_spacing=slice_spacing, multi_frame=multi_frame,
        has_patient_geometry=True, problems=tuple(problems), tilt_degrees=tilt)


# -------------------------------------------------------------------------------------------------------- pixels


def _modality_values(arr: np.ndarray, ds: pydicom.Dataset, frame: int | None) -> np.ndarray:
    """Stored values -> modality units (HU for CT): Modality LUT, RescaleSlope/Intercept, or the enhanced
    multi-frame PixelValueTransformationSequence of that frame."""
    if frame is not None:
        item = _functional(ds, frame, "PixelValueTransformationSequence")
        if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
            return arr.astype(np.float64) * float(item.RescaleSlope) + float(item.RescaleIntercept)
    if ds.get("ModalityLUTSequence") or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return apply_modality_lut(arr, ds)
    return arr


def _read_pixels(geom: SeriesGeometry, frame: int | None = None) -> np.ndarray:
    """(channels, slices, rows, columns) float32 in modality units, slices in ``geom`` order."""
    by_file: dict[Path, list[tuple[int, int | None]]] = defaultdict(list)
    for k, (path, fr) in enumerate(geom.slices):
        by_file[path].append((k, fr if frame is None else frame))
    out: np.ndarray | None = None
    for path, members in by_file.items():
        try:
            ds = pydicom.dcmread(path)
        except Exception as e:  # noqa: BLE001 - parser failures are reported with the file name
            raise DataError(f"{path}: unreadable DICOM: {type(e).__name__}: {e}") from e
        try:
            data = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - decoder failures are reported with file and transfer syntax
            ts = getattr(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None), "name", "unknown")
            raise DataError(f"{path}: cannot decode pixel data (transfer syntax {ts}): {type(e).__name__}: {e}") \
                from e
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        channels = int(ds.get("SamplesPerPixel", 1) or 1)
        for k, fr in members:
            if fr is not None and not 0 <= fr < frames:
                raise DataError(f"{path}: volume_index {fr} out of range: the file has {frames} frame(s)")
            img = _modality_values(data[fr] if frames > 1 else data, ds, fr).astype(np.float32)
            img = img[..., None] if channels == 1 else img  # (rows, columns, channels)
            if out is None:
                out = np.empty((img.shape[-1], geom.num_slices, geom.rows, geom.columns), np.float32)
            if img.shape[:2] != (geom.rows, geom.columns) or img.shape[-1] != out.shape[0]:
                raise DataError(f"{path}: pixel data of shape {img.shape} does not match the series' "
                                f"{geom.rows}x{geom.columns}x{out.shape[0]}")
            out[:, k] = np.moveaxis(img, -1, 0)
    assert out is not None
    return out


def _resample_regular(vol: np.ndarray, geom: SeriesGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Resample (C, K, rows, cols) slices onto a regular grid; returns (volume (C, K', rows', cols'), LPS affine).

    The grid keeps the in-plane axes and pixel spacing and uses the median slice step; with tilt its third axis is
    the stacking (table) direction and its in-plane axes are made orthogonal to it (an axial grid for axial
    series). Each output voxel is interpolated linearly between the two slices whose planes enclose it; voxels
    outside the acquired slab get the volume's minimum.
    """
    r, c, n = np.asarray(geom.row_cosine), np.asarray(geom.column_cosine), geom.normal
    dr, dc = geom.pixel_spacing
    pos, hk = np.asarray(geom.positions), np.asarray(geom.heights)
    stack = pos[-1] - pos[0]
    e3 = stack / np.linalg.norm(stack) if geom.tilt_degrees else n
    e1 = r - (r @ e3) * e3
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e3, e1)
    e2 = e2 if e2 @ c >= 0 else -e2
    frame = np.stack([e1, e2, e3])  # rows: target axes
    sp3 = float(np.median(np.diff(pos @ e3)))
    spacing = np.array([dc, dr, sp3])

    ci, cj = np.array([0, geom.columns - 1]) * dc, np.array([0, geom.rows - 1]) * dr
    corners = np.array([p + a * r + b * c for p in pos for a in ci for b in cj])
    coords = (corners - pos[0]) @ frame.T
    lo, hi = coords.min(0), coords.max(0)
    size = np.floor((hi - lo) / spacing + 1e-3).astype(int) + 1
    origin = pos[0] + lo @ frame

    fill = float(vol.min())
    out = np.empty((vol.shape[0], size[2], size[1], size[0]), np.float32)
    ii, jj = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="xy")  # (rows', cols')
    eps = 1e-3 * sp3
    for k3 in range(size[2]):
        world = origin + np.outer(ii.ravel() * spacing[0], e1) + np.outer(jj.ravel() * spacing[1], e2) \
            + k3 * sp3 * e3
        h = world @ n
        kf = np.interp(h, hk, np.arange(len(hk)))
        base = np.stack([np.interp(kf, np.arange(len(hk)), pos[:, d]) for d in range(3)], axis=1)
        off = world - base
        kf[(h < hk[0] - eps) | (h > hk[-1] + eps)] = -2.0
        grid = np.stack([kf, off @ c / dr, off @ r / dc])
        for ch in range(vol.shape[0]):
            out[ch, k3] = ndimage.map_coordinates(vol[ch], grid, order=1, mode="constant",
                                                  cval=fill).reshape(size[1], size[0])
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = e1 * spacing[0], e2 * spacing[1], e3 * sp3, origin
    return out, affine
