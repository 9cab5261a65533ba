"""CTPA-like chest CT phantoms (:func:`generate_ctpa`): anatomy, vessel trees, emboli; NIfTI or DICOM series."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from ...errors import DataError
from ...reporting import write_bytes
from ._common import (_CASE, _PATIENT, _check_common, _labels_and_patients, _nifti_bytes, _progress, _rng,
                      _smooth_noise, _soft, _write_datalist)


def _unit(v: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(c * c for c in v)) + 1e-9
    return [c / norm for c in v]


def _cross(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def _ellipsoid_level(points: Sequence[np.ndarray], center: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    return sum(((p - c) / a) ** 2 for p, c, a in zip(points, center, axes))


class _Chest:
    """Per-patient CTPA anatomy in physical millimetres (z superior, y posterior, x patient-left; LPS, centred)."""

    def __init__(self, rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float]):
        self.shape, self.spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
        rz, ry, rx = (n * s / 2 for n, s in zip(self.shape, self.spacing))
        self.half = (rz, ry, rx)
        u = rng.uniform
        self.body = (u(-0.03, 0.03) * ry, 0.0, u(0.84, 0.93) * rx, u(0.62, 0.74) * ry)  # cy, cx, ax, ay
        self.fat = u(0.03, 0.08) * rx
        self.wall = self.fat + u(0.05, 0.08) * rx
        self.lungs = []
        for side in (-1, 1):
            self.lungs.append(((u(-0.15, 0.05) * rz, u(0.0, 0.08) * ry, side * u(0.40, 0.46) * rx),
                               (u(1.1, 1.4) * rz, u(0.50, 0.58) * ry, u(0.30, 0.36) * rx)))
        self.heart = ((u(-0.9, -0.6) * rz, u(-0.35, -0.25) * ry, u(0.02, 0.1) * rx),
                      (u(0.6, 0.8) * rz, u(0.28, 0.34) * ry, u(0.22, 0.28) * rx))
        self.spine = (u(0.55, 0.62) * ry, u(-0.02, 0.02) * rx, u(0.11, 0.14) * rx)  # cy, cx, radius
        self.aorta = (self.spine[0] - u(0.18, 0.24) * ry, u(0.14, 0.2) * rx, u(0.07, 0.09) * rx)
        self.bone_hu = u(600, 900)
        voxel = min(self.spacing)
        self.taper = u(0.72, 0.86)  # radius ratio per generation: sets how far the visible tree reaches
        self.arteries = self._arteries(rng, voxel)
        self.veins = self._veins(rng, voxel)
        self.lung_texture_seed = int(rng.integers(2**31))

    def in_lung(self, z, y, x):
        """True inside either lung: ellipsoids inside the chest wall, minus heart and spine (arrays or floats)."""
        (c0, a0), (c1, a1) = self.lungs
        inside = (_ellipsoid_level((z, y, x), c0, a0) <= 1) | (_ellipsoid_level((z, y, x), c1, a1) <= 1)
        cy, cx, ax, ay = self.body
        inside = inside & (((x - cx) / (ax - self.wall)) ** 2 + ((y - cy) / (ay - self.wall)) ** 2 <= 1)
        hc, ha = self.heart
        inside = inside & (_ellipsoid_level((z, y, x), hc, [a * 1.15 for a in ha]) > 1)
        sy, sx, sr = self.spine
        return inside & ((x - sx) ** 2 + (y - sy) ** 2 > (1.6 * sr) ** 2)

    def _grow(self, rng, start, direction, radius, length, min_radius, lung, segments, depth=0):
        """Recursive bifurcating tree: child radius ~0.8x (Murray's law), branching angles 20-45 degrees, bent
        towards the lung's centre when a branch would leave the lung. Plain floats: 3-vectors are too small for
        numpy to pay off."""
        if radius < min_radius or depth > 8:
            return
        inward = _unit([c - p for c, p in zip(self.lungs[lung][0], start)])
        for bend, shrink in ((0.0, 1.0), (0.5, 1.0), (0.5, 0.6), (1.5, 0.6), (1.5, 0.35)):
            d = _unit([a + bend * b for a, b in zip(direction, inward)])
            end = [p + shrink * length * c for p, c in zip(start, d)]
            if self.in_lung(*end):
                break
        else:
            return
        child_radius = radius * self.taper * rng.uniform(0.95, 1.05)
        segments.append((np.array(start), np.array(end), radius, child_radius))
        ortho = _unit(_cross(d, rng.standard_normal(3)))
        for sign in (1.0, -1.0):
            angle = math.radians(rng.uniform(20, 45))
            child = _unit([math.cos(angle) * a + sign * math.sin(angle) * b for a, b in zip(d, ortho)])
            self._grow(rng, end, child, child_radius * rng.uniform(0.9, 1.05), length * rng.uniform(0.7, 0.9),
                       min_radius, lung, segments, depth + 1)

    def _arteries(self, rng, voxel):
        rz, ry, rx = self.half
        r_trunk = rng.uniform(0.11, 0.16) * rx
        hz, hy, hx = self.heart[0]
        root = np.array([hz + 0.5 * self.heart[1][0], hy + 0.3 * self.heart[1][1], hx])
        bifurcation = np.array([rng.uniform(0.0, 0.2) * rz, rng.uniform(-0.05, 0.05) * ry, 0.0])
        segments = [(root, bifurcation, r_trunk, r_trunk * 0.9)]
        for side in (-1, 1):
            hilum = np.array([bifurcation[0] + rng.uniform(-0.1, 0.05) * rz, rng.uniform(0.0, 0.08) * ry,
                              side * rng.uniform(0.12, 0.17) * rx])
            segments.append((bifurcation, hilum, r_trunk * 0.85, r_trunk * 0.8))
            lung = (side + 1) // 2
            for up in ((1.0, 0.0, -1.0) if side < 0 else (1.0, -1.0)):  # lobar arteries: 3 right, 2 left
                d = np.array([up * rng.uniform(0.2, 1) + rng.uniform(-0.2, 0.2), rng.uniform(-0.4, 0.4),
                              side * rng.uniform(0.6, 1.0)])
                self._grow(rng, list(hilum), _unit(d), r_trunk * rng.uniform(0.75, 0.85),
                           rng.uniform(0.6, 0.8) * self.lungs[lung][1][2], 0.8 * voxel, lung, segments)
        return segments

    def _veins(self, rng, voxel):
        rz, ry, rx = self.half
        hz, hy, hx = self.heart[0]
        atrium = np.array([hz + 0.4 * self.heart[1][0], hy + 0.6 * self.heart[1][1], hx])
        segments = []
        for side in (-1, 1):
            lung = (side + 1) // 2
            radius = rng.uniform(0.05, 0.065) * rx
            hilum = np.array([atrium[0] + rng.uniform(-0.1, 0.1) * rz, atrium[1] + rng.uniform(0.0, 0.1) * ry,
                              side * rng.uniform(0.14, 0.18) * rx])
            segments.append((atrium, hilum, radius, radius))
            for up in (1, -1):
                d = np.array([up * rng.uniform(0.1, 0.8), rng.uniform(0.0, 0.5), side * rng.uniform(0.7, 1.0)])
                self._grow(rng, list(hilum), _unit(d), radius * rng.uniform(0.8, 0.9),
                           rng.uniform(0.6, 0.8) * self.lungs[lung][1][2], 0.8 * voxel, lung, segments)
        return segments


def _region(lo: np.ndarray, hi: np.ndarray, grid: Sequence[np.ndarray], spacing: Sequence[float]):
    """Index box (tuple of slices, or None if empty) of the voxels whose centres may lie in [lo, hi] (mm)."""
    start = [max(int(math.floor((l - g[0]) / s)), 0) for l, g, s in zip(lo, grid, spacing)]
    stop = [min(int(math.ceil((h - g[0]) / s)) + 1, len(g)) for h, g, s in zip(hi, grid, spacing)]
    if any(b <= a for a, b in zip(start, stop)):
        return None
    return tuple(slice(a, b) for a, b in zip(start, stop))


def _render_tubes(segments, grid, spacing, occupancy: np.ndarray) -> None:
    """Max-composite the partial-volume occupancy of conical tubes into ``occupancy`` (z, y, x)."""
    width = float(min(spacing))
    for a, b, r0, r1 in segments:
        pad = max(r0, r1) + width
        region = _region(np.minimum(a, b) - pad, np.maximum(a, b) + pad, grid, spacing)
        if region is None:
            continue
        z, y, x = (g[r] for g, r in zip(grid, region))
        p = (z[:, None, None] - a[0], y[None, :, None] - a[1], x[None, None, :] - a[2])
        d = b - a
        t = np.clip((p[0] * d[0] + p[1] * d[1] + p[2] * d[2]) / (float(d @ d) + 1e-9), 0, 1)
        dist = np.sqrt((p[0] - t * d[0]) ** 2 + (p[1] - t * d[1]) ** 2 + (p[2] - t * d[2]) ** 2)
        np.maximum(occupancy[region], _soft(dist - (r0 + (r1 - r0) * t), width), out=occupancy[region])


def _emboli(chest: _Chest, rng: np.random.Generator, grid: Sequence[np.ndarray], arteries: np.ndarray,
            count: Sequence[int] = (1, 3), length: Sequence[float] = (2.0, 3.5)) -> np.ndarray:
    """Occupancy of ``count`` (a range, at most one per artery) intraluminal filling defects: ellipsoids elongated
    along the artery (half-length ``length`` times its radius), 55-75% of its radius across, slightly off-centre
    (partially occluding: contrast flows around them), clipped to the lumen."""
    width = float(min(chest.spacing))
    clot = np.zeros(arteries.shape, np.float32)
    # the widest arteries (main, lobar; saddle emboli at the bifurcation included): wide enough to show a filling
    # defect with a rim of contrast around it at phantom resolution; wider ones are likelier
    eligible = [i for i, (a, b, r0, r1) in enumerate(chest.arteries) if min(r0, r1) >= 2.5 * width]
    if not eligible:  # tiny volumes: fall back to the widest vessels
        eligible = sorted(range(len(chest.arteries)), key=lambda i: -chest.arteries[i][2])[:max(3, count[1])]
    weights = np.array([chest.arteries[i][2] ** 3 for i in eligible])
    chosen = rng.choice(eligible, size=min(len(eligible), int(rng.integers(count[0], count[1] + 1))), replace=False,
                        p=weights / weights.sum())
    for i in chosen:
        a, b, r0, r1 = chest.arteries[i]
        t = rng.uniform(0.2, 0.8)
        radius = r0 + (r1 - r0) * t
        axis = (b - a) / (np.linalg.norm(b - a) + 1e-9)
        ortho = np.asarray(_unit(_cross(axis, rng.standard_normal(3))))
        center = a + t * (b - a) + rng.uniform(0.0, 0.15) * radius * ortho
        along, across = rng.uniform(*length) * radius, rng.uniform(0.55, 0.75) * radius
        region = _region(center - along - width, center + along + width, grid, chest.spacing)
        if region is None:
            continue
        z, y, x = (g[r] - c for g, r, c in zip(grid, region, center))
        pz, py, px = z[:, None, None], y[None, :, None], x[None, None, :]
        s_along = pz * axis[0] + py * axis[1] + px * axis[2]
        s_across = np.sqrt(np.maximum(pz ** 2 + py ** 2 + px ** 2 - s_along ** 2, 0))
        level = np.sqrt((s_along / along) ** 2 + (s_across / across) ** 2)
        occ = np.minimum(_soft((level - 1) * across, width), arteries[region])  # intraluminal only
        np.maximum(clot[region], occ, out=clot[region])
    return clot


def _ctpa_case(chest: _Chest, rng: np.random.Generator, positive: bool, rv_strain: bool = True,
               emboli: Sequence[int] = (1, 3), embolus_length: Sequence[float] = (2.0, 3.5)
               ) -> tuple[np.ndarray, np.ndarray]:
    """One acquisition: HU volume (int16) and emboli mask (uint8), both (slices, rows, cols). ``rv_strain=False``
    leaves a positive's heart as in a negative (the pool's size draws no random numbers either way)."""
    shape, spacing = chest.shape, chest.spacing
    rz, ry, rx = chest.half
    shift = np.array([rng.uniform(-0.15, 0.15) * rz, rng.uniform(-0.04, 0.04) * ry, rng.uniform(-0.04, 0.04) * rx])
    grid = [(np.arange(n) - (n - 1) / 2) * s - c for n, s, c in zip(shape, spacing, shift)]
    z, y, x = grid[0][:, None, None], grid[1][None, :, None], grid[2][None, None, :]
    width = float(min(spacing))

    hu = np.full(shape, -1000.0, np.float32)
    cy, cx, ax, ay = chest.body
    body_r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) * np.ones_like(z)
    scale = min(ax, ay)
    body = _soft((body_r - 1) * scale, width)
    muscle = _soft((body_r - 1) * scale + chest.fat, width)
    hu = hu * (1 - body) + rng.uniform(-120, -90) * body
    hu = hu * (1 - muscle) + rng.uniform(35, 55) * muscle

    contrast = rng.uniform(230, 420)
    sy, sx, sr = chest.spine
    spine_d = np.sqrt((x - sx) ** 2 + (y - sy) ** 2) * np.ones_like(z)
    bone = _soft(spine_d - sr, width)
    hu = hu * (1 - bone) + chest.bone_hu * bone
    marrow = _soft(spine_d - 0.75 * sr, width)
    hu = hu * (1 - marrow) + rng.uniform(180, 280) * marrow
    ay_, ax_, ar = chest.aorta
    aorta = _soft(np.sqrt((x - ax_) ** 2 + (y - ay_) ** 2) * np.ones_like(z) - ar, width)
    hu = hu * (1 - aorta) + contrast * rng.uniform(0.45, 0.85) * aorta

    lung = ndimage.gaussian_filter(chest.in_lung(z, y, x).astype(np.float32), 0.5)
    texture = _smooth_noise(rng, shape, (0.8, 1.5, 1.5))
    hu = hu * (1 - lung) + (rng.uniform(-880, -820) + rng.uniform(15, 40) * texture) * lung

    veins = np.zeros(shape, np.float32)
    _render_tubes(chest.veins, grid, spacing, veins)
    arteries = np.zeros(shape, np.float32)
    _render_tubes(chest.arteries, grid, spacing, arteries)
    clot = _emboli(chest, rng, grid, arteries, emboli, embolus_length) if positive else np.zeros(shape, np.float32)

    # Heart: myocardium around a contrast-filled blood pool. With emboli the right heart dilates (RV strain); the
    # pool grows by about the contrast volume the emboli displaced, so the amount of contrast-enhanced blood (and
    # of soft tissue) in the volume does not give the label away. Without ``rv_strain`` the pool keeps its size.
    hc, ha = chest.heart
    heart_level = np.sqrt(_ellipsoid_level((z, y, x), hc, ha))
    heart = _soft((heart_level - 1) * min(ha), width)
    hu = hu * (1 - heart) + rng.uniform(35, 50) * heart
    pool_size, displaced = 0.8, float(clot.sum())
    if rv_strain and displaced > 0:
        base = _soft((heart_level - pool_size) * min(ha), width).sum()
        low, high = pool_size, 0.95
        for _ in range(12):  # bisection on the pool's relative size
            mid = (low + high) / 2
            low, high = (mid, high) if _soft((heart_level - mid) * min(ha), width).sum() - base < displaced \
                else (low, mid)
        pool_size = (low + high) / 2
    pool = _soft((heart_level - pool_size) * min(ha), width)
    hu = hu * (1 - pool) + contrast * rng.uniform(0.7, 1.0) * pool

    hu = hu * (1 - veins) + contrast * rng.uniform(0.7, 0.95) * veins
    hu = hu * (1 - arteries) + contrast * arteries
    hu = hu * (1 - clot) + rng.uniform(30, 60) * clot

    hu = ndimage.gaussian_filter(hu, (0.3, 0.5, 0.5))
    noise = _smooth_noise(rng, shape, (0.3, 0.6, 0.6)) * rng.uniform(8, 30)
    hu = np.clip(np.rint(hu + noise), -1024, 3071).astype(np.int16)
    return hu, (clot >= 0.5).astype(np.uint8)


def _ctpa_geometry(shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(origin of voxel (0, 0, 0) in LPS mm as x, y, z; NIfTI RAS affine for arrays laid out (x, y, z))."""
    sz, sy, sx = spacing
    d, h, w = shape
    origin = np.array([-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, -(d - 1) / 2 * sz])
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = origin * np.array([-1, -1, 1])
    return origin, affine


def _write_dicom_series(folder: Path, hu: np.ndarray, spacing: Sequence[float], patient: str, case: str,
                        seed: int, study: str, series_number: int) -> None:
    """One CT Image Storage file per slice, explicit VR little endian, int16 with intercept -1024; series of one
    ``study`` share its StudyInstanceUID (and StudyID, AccessionNumber)."""
    def uid(*parts: object, of: str = case):
        return generate_uid(entropy_srcs=["medtl3d-phantom", str(seed), of, *map(str, parts)])

    sz, sy, sx = spacing
    origin, _ = _ctpa_geometry(hu.shape, spacing)
    study_uid, series, frame = uid("study", of=study), uid("series"), uid("frame")
    stored = (hu.astype(np.int32) + 1024).astype(np.int16)
    for k in range(hu.shape[0]):
        sop = uid("instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(f"{k}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series, frame
        ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Manufacturer, ds.SeriesDescription = "medtl3d phantom", "CTPA phantom"
        ds.PatientID, ds.PatientName, ds.StudyID, ds.AccessionNumber = patient, f"Phantom^{patient}", study, study
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in (origin[0], origin[1], origin[2] + k * sz)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = ds.SpacingBetweenSlices = sz
        ds.SliceLocation = round(float(origin[2] + k * sz), 4)
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 100, 700
        ds.PixelData = stored[k].astype("<i2").tobytes()
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        write_bytes(folder / f"{k}.dcm", buf.getvalue())


def generate_ctpa(out_dir: str | os.PathLike, n_cases: int = 16, *, shape: Sequence[int] = (32, 64, 64),
                  spacing: Sequence[float] = (2.0, 1.0, 1.0), positive_fraction: float = 0.5, fmt: str = "nifti",
                  seed: int = 0, rv_strain: bool = True, emboli: Sequence[int] = (1, 3),
                  embolus_length: Sequence[float] = (2.0, 3.5), series_per_study: int = 1) -> Path:
    """Write CTPA-like phantoms (label 1 = pulmonary emboli present) and return the ``datalist.json`` path.

    ``shape``/``spacing`` are (slices, rows, cols) / mm. Files: ``images/<case>.nii.gz`` (``fmt="nifti"``) or
    ``dicom/<case>/<i>.dcm`` (``fmt="dicom"``; ``image`` is then the series folder), ``masks/<case>.nii.gz``
    (planted emboli, uint8). NIfTI arrays are laid out (cols, rows, slices) with an RAS affine, matching what MONAI
    reads from the DICOM series. Items: ``image``, ``label``, ``patient``, ``lesion`` and (JSON only)
    ``slice_labels``, 0/1 per slice (bottom to top) marking slices that contain emboli.

    ``rv_strain`` (default True): positives' right heart is dilated, its contrast-filled blood pool grown by about
    the contrast volume the emboli displaced, so the total amount of enhanced blood does not give the label away;
    this is a second, legitimate cue for the label, in the heart rather than at the emboli. ``rv_strain=False``
    leaves positives' hearts exactly as in negatives, so the emboli are the only class evidence (a stretch of
    contrast-filled lumen replaced by a 30-60 HU clot, and with it slightly less contrast in the volume): for
    testing whether an attribution method localises them. The option draws no random numbers, so a case differs
    between ``rv_strain=True`` and ``False`` only in its blood pool, negatives not at all. (As before, only
    positives draw the emboli's random numbers, which shifts the draws that follow, e.g. contrast and noise, but
    not their distributions.)

    ``emboli`` (count range, default 1-3, at most one per artery) and ``embolus_length`` (each embolus'
    half-length in radii of its artery, default 2-3.5) set the embolus burden; the defaults draw exactly the
    numbers they drew before the options existed. A heavier burden makes a larger filling defect, not a
    different kind of cue (measured in ``scripts/demo.py``: at 32^3 voxels and 48-64 training series, neither
    burden was learned from image labels in 8 CPU epochs).

    ``series_per_study`` > 1 groups consecutive cases into clinical studies of that many series (the last may
    hold fewer): each item gets ``study`` (``S0000``, ...), the series of a study share one patient (one patient
    in about five has a second study) and, in DICOM, one StudyInstanceUID with SeriesNumber 1, 2, ... Series labels
    are drawn as before, independently, so a study may mix positive and negative series (emboli seen in one
    reconstruction only); its label is "any series positive". The default 1 writes no ``study`` and the exact
    files and datalists it always wrote.
    """
    _check_common(n_cases, positive_fraction, seed)
    if fmt not in ("nifti", "dicom"):
        raise DataError(f"generate_ctpa: fmt must be 'nifti' or 'dicom', got {fmt!r}")
    if len(shape) != 3 or any(int(s) != s or s < 8 for s in shape):
        raise DataError(f"generate_ctpa: shape must be 3 integers >= 8 (slices, rows, cols), got {tuple(shape)!r}")
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise DataError(f"generate_ctpa: spacing must be 3 positive mm values, got {tuple(spacing)!r}")
    if len(emboli) != 2 or any(int(n) != n for n in emboli) or not 1 <= emboli[0] <= emboli[1]:
        raise DataError(f"generate_ctpa: emboli must be a range of counts [low, high] with 1 <= low <= high, "
                        f"got {tuple(emboli)!r}")
    if len(embolus_length) != 2 or not 0 < embolus_length[0] <= embolus_length[1]:
        raise DataError(f"generate_ctpa: embolus_length must be a range [low, high] of artery radii with "
                        f"0 < low <= high, got {tuple(embolus_length)!r}")
    if int(series_per_study) != series_per_study or series_per_study < 1:
        raise DataError(f"generate_ctpa: series_per_study must be a positive integer, got {series_per_study!r}")
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    emboli, embolus_length = tuple(int(n) for n in emboli), tuple(float(x) for x in embolus_length)
    out = Path(out_dir)
    labels, patients = _labels_and_patients(n_cases, positive_fraction, seed)
    per_study = int(series_per_study)
    if per_study > 1:  # the patients of the studies: a study's series all belong to its patient
        _, of_study = _labels_and_patients(-(-n_cases // per_study), positive_fraction, seed)
        patients = [of_study[i // per_study] for i in range(n_cases)]
    _, affine = _ctpa_geometry(shape, spacing)
    items, chests = [], {}
    for i in _progress(range(n_cases), n_cases, "CTPA phantoms"):
        case, patient, study = f"ctpa_{i:04d}", f"P{patients[i]:04d}", f"S{i // per_study:04d}"
        if patients[i] not in chests:
            chests = {patients[i]: _Chest(_rng(seed, _PATIENT, patients[i]), shape, spacing)}
        hu, mask = _ctpa_case(chests[patients[i]], _rng(seed, _CASE, i), bool(labels[i]), bool(rv_strain),
                              emboli, embolus_length)
        if fmt == "nifti":
            image = f"images/{case}.nii.gz"
            write_bytes(out / image, _nifti_bytes(hu.transpose(2, 1, 0), affine))
        else:
            image = f"dicom/{case}"
            _write_dicom_series(out / image, hu, spacing, patient, case, seed,
                                study=case if per_study == 1 else study, series_number=i % per_study + 1)
        lesion = f"masks/{case}.nii.gz"
        write_bytes(out / lesion, _nifti_bytes(mask.transpose(2, 1, 0), affine))
        items.append({"image": image, "label": int(labels[i]), "patient": patient,
                      **({"study": study} if per_study > 1 else {}), "lesion": lesion,
                      "slice_labels": mask.any(axis=(1, 2)).astype(int).tolist()})
    columns = ("image", "label", "patient", "study", "lesion") if per_study > 1 else ("image", "label", "patient",
                                                                                      "lesion")
    return _write_datalist(out, items, columns)
