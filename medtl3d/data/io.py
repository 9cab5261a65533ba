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
``modality``, ``series_uid``, ``study_uid``, ``spacing``, ``resampled`` and ``geometry_problems``.

Hostile files are refused from their headers, before any pixel is decoded: a NIfTI, DICOM series or 2D image whose
dimensions decode to more than the decoded-size limit (:func:`decoded_size_limit`, 2048 MB by default), and a 2D
image over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, whose warning is an error here).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import pydicom
import torch
from PIL import Image
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing, orientation_ras_lps
from monai.transforms import LoadImage, MapTransform
from monai.utils import SpaceKeys

from medtl3d.errors import DataError, one_line

from ._discovery import (IMAGE_SUFFIXES, NIFTI_SUFFIXES, Case, _dicom_header, _stem, _suffix, _unique_ids,  # noqa: F401
                         find_cases)
from ._series import SeriesGeometry, _FramesNotAVolume, _read_pixels, _resample_regular, read_series_headers

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

IRREGULAR_MODES = ("refuse", "resample")
DEFAULT_MAX_DECODED_MB = 2048.0
MAX_DECODED_ENV = "MEDTL3D_MAX_DECODED_MB"


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
                 study_uid=str(ds.get("StudyInstanceUID", "")),
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
    img.meta.update(case_id=case.case_id, kind=case.kind, modality="unknown", series_uid="", study_uid="",
                    resampled=False, geometry_problems="",
                    spacing=affine_to_spacing(img.affine, r=img.ndim - 1).numpy())
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
    return Case(path.stem, "dicom", path, (path,), str(ds.get("SeriesInstanceUID", "")) or None,
                str(ds.get("StudyInstanceUID", "")) or None)


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
