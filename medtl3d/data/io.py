"""Image I/O: find the cases in a folder (DICOM series, NIfTI, PNG/JPEG) and load each as a channel-first MetaTensor.

NIfTI and PNG/JPEG files are read by MONAI's ``LoadImage`` (``NibabelReader`` / ``PILReader``) unchanged. DICOM is
assembled here from pydicom datasets, because MONAI's readers do not group a folder by SeriesInstanceUID (its
``PydicomReader`` stacks every file of a folder, ordered by InstanceNumber, and takes the slice step from z alone) and
do not check the geometry of a series: missing slices, non-uniform spacing, gantry tilt and mixed orientations would
silently give a wrong affine. :func:`read_series_headers` sorts the slices along the slice normal and reports these
problems; :func:`load_image` then refuses the series with a message naming the folder and the problem, or resamples
it onto a regular grid (``irregular="resample"``).

The result has the layout and affine MONAI's ``LoadImage(image_only=True, ensure_channel_first=True)`` gives for the
same file type: (C, x, y[, z]) with x = columns, y = rows, z = slices (ascending along the slice normal, as ITK's
series reader orders them), an RAS affine, ``float32`` values; DICOM pixel values in modality units (RescaleSlope /
Intercept or the Modality LUT applied, so CT is in HU). Compressed transfer syntaxes are decoded by pydicom's pixel
handlers (JPEG 2000 needs ``pylibjpeg`` + ``pylibjpeg-openjpeg``). Meta keys added to MONAI's: ``case_id``, ``kind``,
``modality``, ``series_uid``, ``spacing``, ``resampled`` and ``geometry_problems``.

Hostile files are refused from their headers, before any pixel is decoded: a NIfTI, DICOM series or 2D image whose
dimensions decode to more than the decoded-size limit (:func:`decoded_size_limit`, 2048 MB by default), and a 2D
image over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, whose warning is an error here).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import pydicom
import torch
from PIL import Image
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing, orientation_ras_lps
from monai.transforms import LoadImage, MapTransform
from monai.utils import SpaceKeys
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from medtl3d.errors import DataError, one_line

__all__ = ["Case", "SeriesGeometry", "find_cases", "read_series_headers", "load_image", "LoadCased",
           "decoded_size_limit", "NIFTI_SUFFIXES", "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)


def _asked_for_nvimagecodec() -> bool:
    return os.environ.get("MONAI_DICOM_READER", "").strip().lower() == "nvimgcodec"


class _NoNvImageCodecNotice(logging.Filter):
    """Drops MONAI's "nvImageCodec is not available" notice. MONAI 1.6 builds every default reader in each
    ``LoadImage(...)``, even for a NIfTI or PNG, and its GPU DICOM reader (``NvImgCodecPydicomReader``) then logs
    this through ``monai.data.nvimgcodec_pydicom_plugin`` once per loader: without a CUDA build of nvImageCodec (any
    CPU machine) it floods the logs and says nothing actionable, because DICOM series are decoded here by pydicom
    (below) and MONAI itself falls back to pydicom's decoders. Kept when ``MONAI_DICOM_READER=nvimgcodec`` asks
    for that reader; every other record of that logger is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("nvImageCodec is not available") and not _asked_for_nvimagecodec())


def _silence_nvimagecodec_notice() -> None:
    plugin_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    if not any(isinstance(f, _NoNvImageCodecNotice) for f in plugin_logger.filters):
        plugin_logger.addFilter(_NoNvImageCodecNotice())
    if not _asked_for_nvimagecodec():  # the same notice, as the reader's own UserWarning
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not "
                                "register successfully", category=UserWarning)


_silence_nvimagecodec_notice()

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IRREGULAR_MODES = ("refuse", "resample")
DEFAULT_MAX_DECODED_MB = 2048.0
MAX_DECODED_ENV = "MEDTL3D_MAX_DECODED_MB"


@dataclass(frozen=True)
class Case:
    """One image to load: a DICOM series (``path`` = its folder, ``files`` = its files), a NIfTI file or a 2D image."""

    case_id: str
    kind: str  # "dicom" | "nifti" | "image"
    path: Path  # file, or the DICOM folder
    files: tuple[Path, ...] = ()  # the series' DICOM files
    series_uid: str | None = None


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


# ----------------------------------------------------------------------------------------------------- discovery


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem


def _head(path: Path) -> bytes:
    """The first 132 bytes of ``path`` (enough to recognise DICOM); DataError naming the file when it cannot be
    read (permissions, I/O error)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    """The header of ``path`` if its content is DICOM (preamble "DICM", or a raw dataset with an image's Rows and
    Columns), else None. Raises DataError when the file cannot be read or starts like DICOM but the header cannot
    be parsed."""
    head = _head(path)
    if head[128:132] == b"DICM":
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001 - any parser failure is reported with the file name
            raise DataError(f"{path}: unreadable DICOM header: {type(e).__name__}: {one_line(e)}") from e
    try:  # DICOM without preamble (raw dataset): accept only what parses into an image header
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if isinstance(ds.get("Rows"), int) and isinstance(ds.get("Columns"), int) and "SOPClassUID" in ds:
            return ds
    except Exception:  # noqa: BLE001 - not DICOM
        pass
    return None


def _walk(root: Path, skipped: list[tuple[Path, str]]) -> list[tuple[Path, list[str]]]:
    """(folder, sorted file names) for every folder under ``root``, following folder links without loops or
    duplicates (the rules in :func:`find_cases`); empty folders, folders that cannot be listed and links not
    followed go to ``skipped``."""
    own = {os.path.realpath(folder) for folder, _, _ in os.walk(root)}  # reached without following any link
    scanned: dict[str, Path] = {}  # real path -> the path it was scanned at
    entries = []

    def unlisted(err: OSError) -> None:
        skipped.append((Path(err.filename), f"cannot list folder: {err.strerror or err}"))

    for name, dirs, files in os.walk(root, followlinks=True, onerror=unlisted):
        folder, here = Path(name), os.path.realpath(name)
        if here in scanned:  # a second link to a folder already scanned (or to one of its subfolders)
            dirs.clear()
            skipped.append((folder, f"link to {here}, already scanned as {scanned[here]}"))
            continue
        scanned[here] = folder
        dirs.sort()
        if not dirs and not files:
            skipped.append((folder, "empty folder"))
        for sub in list(dirs):
            link = folder / sub
            if not link.is_symlink():
                continue
            target = os.path.realpath(link)
            if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                reason = f"link to {target}, a folder that encloses it (loop): not followed"
            elif target in own:
                reason = f"link to {target}, inside the input folder: scanned there"
            else:
                continue
            dirs.remove(sub)
            skipped.append((link, reason))
        entries.append((folder, sorted(files)))
    return entries


def _unique_ids(candidates: Sequence[tuple[str, str, str]]) -> list[str]:
    """Case ids from (id, id with extension, relative path) candidates, unique even where the file system ignores
    case (ids name mask files) and independent of the order a folder is listed in: ids that collide ignoring case
    keep their extension (``x.png``, ``x.jpg``); ids that still collide get the first 8 hex digits of their relative
    path's SHA-1 (``x_3f2a9c01``)."""
    ids = [short for short, _, _ in candidates]
    widenings = (lambda short, full, key: full,
                 lambda short, full, key: f"{short}_{hashlib.sha1(key.encode()).hexdigest()[:8]}")
    for widen in widenings:
        counts = Counter(i.casefold() for i in ids)
        ids = [widen(*candidate) if counts[i.casefold()] > 1 else i for i, candidate in zip(ids, candidates)]
    return ids


def find_cases(root: str | Path) -> tuple[list[Case], list[tuple[Path, str]]]:
    """Walk ``root`` recursively and return (cases, skipped).

    DICOM files are recognised by content (not extension) and grouped per folder by SeriesInstanceUID: one case
    per series (case_id = folder path relative to ``root`` joined by "_", plus ``_<last 8 UID characters>`` when the
    folder holds several series, or ``_<file stem>`` for one-file series); an enhanced multi-frame file is a case on
    its own. ``.nii``/``.nii.gz`` files and 2D images (``.png .jpg .jpeg .bmp .tif .tiff``) are one case each
    (case_id = relative path without extension). Case ids are unique ignoring case and do not depend on listing
    order: ids that collide keep the file's extension, and if they still collide get a hash of the relative path
    (:func:`_unique_ids`). Everything else is returned in ``skipped`` with the reason:
    empty folders, folders that cannot be listed, files that cannot be read, non-image files, DICOM without image
    data (DICOMDIR, SR, RTSTRUCT, truncated headers), unparseable DICOM headers, and linked folders not followed
    (see below).
    A DICOM whose header parses but whose pixel data is broken is a case that fails in :func:`load_image`.

    Symbolic links to folders are followed (case ids use the link's path), except a link to a folder inside
    ``root`` (scanned at its own path, so no case appears twice), a link to a folder that encloses it (a loop)
    and a second link to a folder already followed; these are listed in ``skipped`` with the reason.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: input folder does not exist")
    skipped: list[tuple[Path, str]] = []
    singles: list[tuple[tuple[str, str, str], Case]] = []  # ((id, id with extension, relative path), case)
    dicom: dict[Path, dict[str, list[tuple[Path, pydicom.Dataset]]]] = defaultdict(lambda: defaultdict(list))

    if root.is_file():
        entries = [(root.parent, [root.name])]
        base = root.parent
    else:
        entries = _walk(root, skipped)
        base = root

    def rel_id(path: Path) -> str:
        rel = path.relative_to(base).as_posix()
        return root.name if rel in ("", ".") else rel.replace("/", "_")

    for folder, files in entries:
        for name in files:
            path = folder / name
            suffix = _suffix(path)
            if suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
                try:
                    _head(path)
                except DataError as e:
                    skipped.append((path, str(e)[len(f"{path}: "):]))
                    continue
                stem = _stem(path) if suffix in NIFTI_SUFFIXES else path.stem
                names = (rel_id(path.parent / stem), rel_id(path), path.relative_to(base).as_posix())
                singles.append((names, Case("", "nifti" if suffix in NIFTI_SUFFIXES else "image", path)))
                continue
            try:
                ds = _dicom_header(path)
            except DataError as e:
                skipped.append((path, str(e)[len(f"{path}: "):]))
                continue
            if ds is None:
                skipped.append((path, "not a DICOM, NIfTI or PNG/JPEG image"))
            elif not ("Rows" in ds and "Columns" in ds):
                sop = getattr(ds.get("SOPClassUID"), "name", "unknown")
                skipped.append((path, f"DICOM without image data (no Rows/Columns; SOP class {sop}): "
                                      "a DICOMDIR, report or truncated header"))
            else:
                dicom[folder][str(ds.get("SeriesInstanceUID", ""))].append((path, ds))

    cases = list(singles)
    for folder, series in dicom.items():
        folder_id = rel_id(folder) if folder != base else (root.stem if root.is_file() else root.name)
        groups: list[tuple[str, list[Path]]] = []
        for uid, members in series.items():
            multi = [p for p, ds in members if int(ds.get("NumberOfFrames", 1) or 1) > 1]
            single = [p for p, ds in members if p not in multi]
            groups += [(uid, [p]) for p in multi]
            if single:
                groups.append((uid, single))
        for uid, files in groups:
            if len(groups) == 1:
                cid = folder_id
            elif len(files) == 1:
                cid = f"{folder_id}_{files[0].stem}"
            else:
                cid = f"{folder_id}_{uid[-8:].strip('.') or 'nouid'}"
            path = files[0] if len(files) == 1 and len(groups) > 1 else folder
            key = f"{path.relative_to(base).as_posix()}#{uid}"
            cases.append(((cid, cid, key), Case("", "dicom", path, tuple(files), uid or None)))

    ids = _unique_ids([names for names, _ in cases])
    out = sorted((Case(i, c.kind, c.path, c.files, c.series_uid) for i, (_, c) in zip(ids, cases)),
                 key=lambda c: c.case_id)
    logger.info("%s: %d case(s), %d skipped", root, len(out), len(skipped))
    return out, skipped


# ------------------------------------------------------------------------------------------------------ geometry


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


# ------------------------------------------------------------------------------------------------------- loading


def decoded_size_limit(max_decoded_mb: float | None = None) -> float:
    """The limit on an image's decoded size, in MB: ``max_decoded_mb``, else the environment variable
    ``MEDTL3D_MAX_DECODED_MB``, else 2048. A header claiming more is refused before any pixel is decoded, so a
    tiny hostile file cannot make the reader allocate gigabytes."""
    given, source = max_decoded_mb, "max_decoded_mb"
    if given is None:
        given, source = os.environ.get(MAX_DECODED_ENV), MAX_DECODED_ENV
        if given is None:
            return DEFAULT_MAX_DECODED_MB
    try:
        limit = float(given)
    except (TypeError, ValueError):
        limit = math.nan
    if not (math.isfinite(limit) and limit > 0):
        raise DataError(f"{source}={given!r}: the decoded-size limit must be a positive number of MB")
    return limit


def _check_decoded_size(path: Path, shape: Sequence[int], what: str, value_bytes: int, limit_mb: float) -> None:
    """Refuse ``path`` when ``shape`` values of ``value_bytes`` each (at least float32, what load_image returns)
    exceed ``limit_mb``; the message names the file, its dimensions and both sizes."""
    size_mb = math.prod(int(n) for n in shape) * max(value_bytes, 4) / 2**20
    if size_mb > limit_mb:
        raise DataError(f"{path}: {'x'.join(str(int(n)) for n in shape)} ({what}) decodes to {size_mb:,.0f} MB, "
                        f"over the decoded-size limit of {limit_mb:g} MB: refused before reading the pixels; if the "
                        f"file is trusted, raise the limit (--max-decoded-mb, max_decoded_mb= or {MAX_DECODED_ENV})")


def _check_image_header(path: Path, limit_mb: float) -> None:
    """Read a 2D image's header with PIL (no pixels): refuse a file PIL cannot identify, one over PIL's
    decompression-bomb limit (its warning is an error here) and one over the decoded-size limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                shape, bands = im.size, len(im.getbands())
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: a possible decompression bomb, refused before decoding ({one_line(e)}); "
                            "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted") from e
        except Exception as e:  # noqa: BLE001 - any parser failure is reported with the file name
            raise DataError(f"{path}: cannot read as image: {type(e).__name__}: {one_line(e)}") from e
    _check_decoded_size(path, (*shape, bands), "width x height x bands", 4, limit_mb)


def _meta(affine: np.ndarray, spatial_shape: Sequence[int], filename: str, **extra: Any) -> dict:
    affine_t = torch.as_tensor(affine, dtype=torch.float64)
    meta = {
        "original_affine": np.asarray(affine, dtype=np.float64),
        "affine": affine_t,
        "spatial_shape": np.asarray(spatial_shape),
        "space": SpaceKeys.RAS,
        "original_channel_dim": float("nan"),
        "filename_or_obj": filename,
        "spacing": affine_to_spacing(affine_t, r=len(spatial_shape)).numpy(),
    }
    meta.update(extra)
    return meta


def _load_dicom(case: Case, volume_index: int | None, irregular: str, limit_mb: float) -> MetaTensor:
    if not case.files and case.path.is_dir():
        case = replace(_case_of(case.path), case_id=case.case_id)
    files = case.files or (case.path,)
    try:
        geom, frame = read_series_headers(files), None
    except _FramesNotAVolume:
        if volume_index is None:
            raise
        geom, frame = _single_frame_geometry(files[0]), volume_index  # one frame of a cine / time series
    if volume_index is not None and frame is None and volume_index != 0:
        raise DataError(f"{geom.location}: volume_index={volume_index} but the series is one volume")
    if geom.problems and irregular == "refuse":
        raise DataError(f"{geom.location}: " + "; ".join(geom.problems) +
                        " - pass irregular='resample' to resample onto a regular grid")
    ds = pydicom.dcmread(geom.slices[0][0], stop_before_pixels=True)
    frames = len(files) * int(ds.get("NumberOfFrames", 1) or 1)  # every frame of a file is decoded
    _check_decoded_size(geom.location, (geom.columns, geom.rows, frames, int(ds.get("SamplesPerPixel", 1) or 1)),
                        "columns x rows x frames x samples", 4, limit_mb)
    vol = _read_pixels(geom, frame)
    resampled = bool(geom.problems)
    if resampled:
        vol, affine = _resample_regular(vol, geom)
        logger.warning("%s: resampled onto a regular grid: %s", geom.location, "; ".join(geom.problems))
    else:
        affine = geom.affine_lps()
    arr = vol.transpose(0, 3, 2, 1)  # (C, columns, rows, slices): MONAI's PydicomReader layout (swap_ij)
    if arr.shape[-1] == 1 and not resampled:
        arr = arr[..., 0]
    affine = orientation_ras_lps(affine)
    meta = _meta(affine, arr.shape[1:], str(case.path), case_id=case.case_id, kind="dicom",
                 modality=str(ds.get("Modality", "unknown")), series_uid=str(ds.get("SeriesInstanceUID", "")),
                 photometric=str(ds.get("PhotometricInterpretation", "")), resampled=resampled,
                 geometry_problems="; ".join(geom.problems), num_slices=geom.num_slices)
    if not geom.has_patient_geometry:
        meta["geometry_problems"] = "no ImagePositionPatient/ImageOrientationPatient: pixel grid only"
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), meta=meta, spatial_ndim=arr.ndim - 1)


def _single_frame_geometry(path: Path) -> SeriesGeometry:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sp = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (1.0, 1.0)
    sp = tuple(float(v) if float(v) > 0 else 1.0 for v in sp)
    return SeriesGeometry(path, ((path, None),), int(ds.Rows), int(ds.Columns), sp, (1.0, 0.0, 0.0),
                          (0.0, 1.0, 0.0), ((0.0, 0.0, 0.0),), (0.0,), None, True, False)


def _load_with_monai(case: Case, reader: str, volume_index: int | None, limit_mb: float) -> MetaTensor:
    path = case.path
    if case.kind == "nifti":
        import nibabel as nib

        try:
            header = nib.load(str(path)).header  # the header only: nibabel reads voxels on demand
            shape, value_bytes = header.get_data_shape(), header.get_data_dtype().itemsize
        except Exception as e:  # noqa: BLE001 - nibabel's errors are reported with the file name
            raise DataError(f"{path}: unreadable NIfTI: {type(e).__name__}: {one_line(e)}") from e
        _check_decoded_size(path, shape, "voxels", value_bytes, limit_mb)
        volumes = shape[3] if len(shape) >= 4 else 1
        if len(shape) > 4 and int(np.prod(shape[4:])) > 1:
            raise DataError(f"{path}: {len(shape)}-D NIfTI {shape} is not supported (3-D or 4-D only)")
        if volumes > 1 and volume_index is None:
            raise DataError(f"{path}: 4-D NIfTI {shape} holds {volumes} volumes; pass volume_index "
                            f"(0..{volumes - 1}) to load one")
        if volume_index is not None and not 0 <= volume_index < volumes:
            raise DataError(f"{path}: volume_index={volume_index} out of range (0..{volumes - 1})")
    else:
        if volume_index not in (None, 0):
            raise DataError(f"{path}: volume_index={volume_index} but a 2D image is one volume")
        _check_image_header(path, limit_mb)
    try:
        img = LoadImage(image_only=True, ensure_channel_first=True, reader=reader)(str(path))
    except Exception as e:  # noqa: BLE001 - reader failures are reported with the file name
        raise DataError(f"{path}: cannot read as {case.kind}: {type(e).__name__}: {one_line(e)}") from e
    if case.kind == "nifti" and img.shape[0] > 1:
        img = img[volume_index or 0: (volume_index or 0) + 1]
    img.meta.update(case_id=case.case_id, kind=case.kind, modality="unknown", series_uid="", resampled=False,
                    geometry_problems="", spacing=affine_to_spacing(img.affine, r=img.ndim - 1).numpy())
    return img


def _case_of(source: Case | str | Path) -> Case:
    if isinstance(source, Case):
        return source
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: file or folder does not exist")
    if path.is_dir():
        cases, skipped = find_cases(path)
        if len(cases) != 1:
            detail = ", ".join(c.case_id for c in cases[:5]) if cases else \
                "; ".join(f"{p.name}: {why}" for p, why in skipped[:5]) or "empty"
            raise DataError(f"{path}: folder holds {len(cases)} cases ({detail}); load one Case from find_cases")
        return cases[0]
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return Case(_stem(path), "nifti", path)
    if suffix in IMAGE_SUFFIXES:
        return Case(path.stem, "image", path)
    ds = _dicom_header(path)
    if ds is None:
        raise DataError(f"{path}: not a DICOM, NIfTI or PNG/JPEG image")
    return Case(path.stem, "dicom", path, (path,), str(ds.get("SeriesInstanceUID", "")) or None)


def load_image(source: Case | str | Path, *, volume_index: int | None = None, irregular: str = "refuse",
               max_decoded_mb: float | None = None) -> MetaTensor:
    """Load a case (a :class:`Case`, a file, or a folder holding exactly one case) as a channel-first MetaTensor.

    ``volume_index`` selects one volume of a 4-D NIfTI (refused without it) or one frame of a multi-frame DICOM
    without per-frame positions. ``irregular``: what to do with a DICOM series that has missing slices,
    non-uniform spacing or gantry tilt: ``"refuse"`` (DataError naming the folder and the problem) or
    ``"resample"`` (regular grid, recorded in ``meta["resampled"]`` / ``meta["geometry_problems"]``).
    ``max_decoded_mb``: the decoded-size limit (:func:`decoded_size_limit`), checked against the headers.
    NaN/inf voxels, unreadable or non-image files raise DataError naming the file and the cause.
    """
    if irregular not in IRREGULAR_MODES:
        raise DataError(f"irregular={irregular!r}: expected one of {IRREGULAR_MODES}")
    limit_mb = decoded_size_limit(max_decoded_mb)
    case = _case_of(source)
    if case.kind == "dicom":
        img = _load_dicom(case, volume_index, irregular, limit_mb)
    elif case.kind in ("nifti", "image"):
        img = _load_with_monai(case, "NibabelReader" if case.kind == "nifti" else "PILReader", volume_index,
                               limit_mb)
    else:
        raise DataError(f"{case.path}: unknown case kind {case.kind!r} (expected dicom, nifti or image)")
    if img.is_floating_point():
        bad = int((~torch.isfinite(img)).sum())
        if bad:
            raise DataError(f"{case.path}: {bad} NaN/inf voxel{'s' if bad > 1 else ''} out of {img.numel()}")
    return img


class LoadCased(MapTransform):
    """Dictionary transform for ``Compose``: replaces each key's value (path str, Path or :class:`Case`) with
    :func:`load_image`'s MetaTensor; keyword arguments (``volume_index``, ``irregular``) go to ``load_image``."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **load_image_kwargs: Any):
        super().__init__(keys, allow_missing_keys)
        self.kwargs = load_image_kwargs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_image(d[key], **self.kwargs)
        return d
