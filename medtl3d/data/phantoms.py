"""Synthetic phantoms: the embedded default data of every medtl3d pipeline.

Three generators write real files (NIfTI / DICOM series / PNG) plus a decathlon-style ``datalist.json`` and a
``datalist.csv``, so the readers, datalists and patient-grouped splits are exercised exactly as with clinical data:

- :func:`generate_ctpa`: CTPA-like chest CT in HU (body wall, fat, lungs with texture, heart, spine, aorta, a
  contrast-filled branching pulmonary artery tree and a vein tree); positives carry 1-3 partially occluding
  intraluminal filling defects (emboli, 30-60 HU) in the widest arteries.
- :func:`generate_cxr`: CXR-like 8-bit radiographs (lung fields with markings, mediastinum/heart, ribs, clavicles,
  soft-tissue shadows, exposure, heel effect and noise), lung masks (0 background, 1 right lung = image left, 2 left
  lung) and a focal consolidation-like opacity inside a lung as the label.
- :func:`generate_histology`: H&E-like RGB patches formed by Beer-Lambert mixing of per-slide perturbed haematoxylin
  and eosin stain vectors; positives contain one mitotic-figure-like clump of dense chromatin.

Every case has a ``patient``; some patients have two cases that share their anatomy (or stain) but not their label,
so patient-grouped splitting matters. Labels are learnable but not from global intensity statistics: nuisance
factors (vessel tree size, contrast, scan range, noise; exposure, lung and heart size, lung markings; nuclear density,
lymphocytes, stain) vary independently of the label, and where a lesion would shift the histogram it is balanced:
positive CT cases have a dilated right heart holding about the contrast volume the emboli displaced (RV strain;
``generate_ctpa(..., rv_strain=False)`` drops it, leaving the emboli the only class evidence), positive patches
have as many fewer lymphocytes as their mitosis' dark chromatin is worth. Output is a pure function of the
arguments: the same seed gives byte-identical files. Each file is written to a temporary name in its folder and
renamed into place.

Why our own code: MONAI's ``create_test_image_2d/3d`` only draws random circles, and no maintained library
synthesises CTPA/CXR/H&E phantoms with planted lesions and their masks.

Arrays in the NIfTI files and the ones MONAI reads from the DICOM series are both laid out (x=cols, y=rows,
z=slices) with RAS affines, so either format loads to the same array and affine.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage

from ..errors import DataError
from ..reporting import write_bytes

__all__ = ["generate_ctpa", "generate_cxr", "generate_histology", "add_parser", "run"]

logger = logging.getLogger(__name__)

# Stream tags for numpy generators: one stream per (seed, purpose, index) so a case depends only on its own index.
_LABELS, _PATIENT, _CASE = 0, 1, 2


# --------------------------------------------------------------------------------------------------------- helpers
def _rng(seed: int, tag: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), tag, index])


def _check_common(n_cases: int, positive_fraction: float, seed: int) -> None:
    if int(n_cases) != n_cases or n_cases < 1:
        raise DataError(f"phantoms: n_cases must be a positive integer, got {n_cases!r}")
    if not 0.0 <= float(positive_fraction) <= 1.0:
        raise DataError(f"phantoms: positive_fraction must lie in [0, 1], got {positive_fraction!r}")
    if int(seed) != seed or seed < 0:
        raise DataError(f"phantoms: seed must be a non-negative integer, got {seed!r}")


def _labels_and_patients(n: int, positive_fraction: float, seed: int) -> tuple[np.ndarray, list[int]]:
    """Exactly round(n * fraction) positives in random order; about one patient in five has a second case."""
    rng = _rng(seed, _LABELS)
    n_pos = int(round(n * positive_fraction))
    labels = rng.permutation(np.r_[np.ones(n_pos, np.int64), np.zeros(n - n_pos, np.int64)])
    patients, current, count = [], -1, 0
    for _ in range(n):
        if current < 0 or count >= 2 or rng.random() > 0.2:
            current, count = current + 1, 0
        patients.append(current)
        count += 1
    return labels, patients


def _progress(items: Iterable[int], total: int, desc: str) -> Iterable[int]:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        def logged():
            for i in items:
                if total >= 10 and i % max(1, total // 10) == 0:
                    logger.info("%s: %d/%d", desc, i, total)
                yield i
        return logged()
    return tqdm(items, total=total, desc=desc, leave=False, disable=None)


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_datalist(out_dir: Path, items: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    json_path = out_dir / "datalist.json"
    write_bytes(json_path, (json.dumps({"training": items}, indent=1) + "\n").encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(items)
    write_bytes(out_dir / "datalist.csv", buf.getvalue().encode())
    return json_path


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _soft(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator (1 inside, 0 outside) from a signed distance that is negative inside."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------------------ CTPA
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


def _emboli(chest: _Chest, rng: np.random.Generator, grid: Sequence[np.ndarray], arteries: np.ndarray) -> np.ndarray:
    """Occupancy of 1-3 intraluminal filling defects: ellipsoids elongated along the artery, 55-75% of its radius
    across, slightly off-centre (partially occluding: contrast flows around them), clipped to the lumen."""
    width = float(min(chest.spacing))
    clot = np.zeros(arteries.shape, np.float32)
    # the widest arteries (main, lobar; saddle emboli at the bifurcation included): wide enough to show a filling
    # defect with a rim of contrast around it at phantom resolution; wider ones are likelier
    eligible = [i for i, (a, b, r0, r1) in enumerate(chest.arteries) if min(r0, r1) >= 2.5 * width]
    if not eligible:  # tiny volumes: fall back to the widest vessels
        eligible = sorted(range(len(chest.arteries)), key=lambda i: -chest.arteries[i][2])[:3]
    weights = np.array([chest.arteries[i][2] ** 3 for i in eligible])
    chosen = rng.choice(eligible, size=min(len(eligible), int(rng.integers(1, 4))), replace=False,
                        p=weights / weights.sum())
    for i in chosen:
        a, b, r0, r1 = chest.arteries[i]
        t = rng.uniform(0.2, 0.8)
        radius = r0 + (r1 - r0) * t
        axis = (b - a) / (np.linalg.norm(b - a) + 1e-9)
        ortho = np.asarray(_unit(_cross(axis, rng.standard_normal(3))))
        center = a + t * (b - a) + rng.uniform(0.0, 0.15) * radius * ortho
        along, across = rng.uniform(2.0, 3.5) * radius, rng.uniform(0.55, 0.75) * radius
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


def _ctpa_case(chest: _Chest, rng: np.random.Generator, positive: bool,
               rv_strain: bool = True) -> tuple[np.ndarray, np.ndarray]:
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
    clot = _emboli(chest, rng, grid, arteries) if positive else np.zeros(shape, np.float32)

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
                        seed: int) -> None:
    """One CT Image Storage file per slice, explicit VR little endian, int16 with intercept -1024."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    def uid(*parts: object):
        return generate_uid(entropy_srcs=["medtl3d-phantom", str(seed), case, *map(str, parts)])

    sz, sy, sx = spacing
    origin, _ = _ctpa_geometry(hu.shape, spacing)
    study, series, frame = uid("study"), uid("series"), uid("frame")
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
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Manufacturer, ds.SeriesDescription = "medtl3d phantom", "CTPA phantom"
        ds.PatientID, ds.PatientName, ds.StudyID, ds.AccessionNumber = patient, f"Phantom^{patient}", case, case
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
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
                  seed: int = 0, rv_strain: bool = True) -> Path:
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
    """
    _check_common(n_cases, positive_fraction, seed)
    if fmt not in ("nifti", "dicom"):
        raise DataError(f"generate_ctpa: fmt must be 'nifti' or 'dicom', got {fmt!r}")
    if len(shape) != 3 or any(int(s) != s or s < 8 for s in shape):
        raise DataError(f"generate_ctpa: shape must be 3 integers >= 8 (slices, rows, cols), got {tuple(shape)!r}")
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise DataError(f"generate_ctpa: spacing must be 3 positive mm values, got {tuple(spacing)!r}")
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    out = Path(out_dir)
    labels, patients = _labels_and_patients(n_cases, positive_fraction, seed)
    _, affine = _ctpa_geometry(shape, spacing)
    items, chests = [], {}
    for i in _progress(range(n_cases), n_cases, "CTPA phantoms"):
        case, patient = f"ctpa_{i:04d}", f"P{patients[i]:04d}"
        if patients[i] not in chests:
            chests = {patients[i]: _Chest(_rng(seed, _PATIENT, patients[i]), shape, spacing)}
        hu, mask = _ctpa_case(chests[patients[i]], _rng(seed, _CASE, i), bool(labels[i]), bool(rv_strain))
        if fmt == "nifti":
            image = f"images/{case}.nii.gz"
            write_bytes(out / image, _nifti_bytes(hu.transpose(2, 1, 0), affine))
        else:
            image = f"dicom/{case}"
            _write_dicom_series(out / image, hu, spacing, patient, case, seed)
        lesion = f"masks/{case}.nii.gz"
        write_bytes(out / lesion, _nifti_bytes(mask.transpose(2, 1, 0), affine))
        items.append({"image": image, "label": int(labels[i]), "patient": patient, "lesion": lesion,
                      "slice_labels": mask.any(axis=(1, 2)).astype(int).tolist()})
    return _write_datalist(out, items, ("image", "label", "patient", "lesion"))


# ------------------------------------------------------------------------------------------------------------- CXR
class _Thorax:
    """Per-patient CXR anatomy in normalised image coordinates (u = column / size, v = row / size)."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.body = (u(0.47, 0.53), u(0.55, 0.62), u(0.43, 0.49), u(0.55, 0.65))  # cu, cv, au, av
        self.lungs = []
        for side in (-1, 1):  # -1: right lung (image left), +1: left lung (image right)
            self.lungs.append((0.5 + side * u(0.17, 0.21), u(0.43, 0.48), u(0.10, 0.17), u(0.22, 0.38),
                               u(-0.12, 0.12)))  # cu, cv, au, av, tilt
        self.mediastinum = u(0.055, 0.075)
        self.heart = (0.5 + u(0.02, 0.06), u(0.6, 0.66), u(0.10, 0.19), u(0.08, 0.13))  # cardiomegaly in some
        self.dome = (u(0.68, 0.74), u(0.70, 0.77), u(0.03, 0.06))  # right base, left base, dome height
        self.rib_gap, self.rib_top, self.rib_curve = u(0.055, 0.07), u(0.13, 0.17), u(0.8, 1.3)
        self.clavicle = (u(0.14, 0.18), u(-0.35, -0.2))  # v at midline, slope


def _cxr_lungs(thorax: _Thorax, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Label map: 0 background, 1 right lung (image left), 2 left lung (image right)."""
    labels = np.zeros(np.broadcast(u, v).shape, np.uint8)
    hu_, hv, ha, hb = thorax.heart
    heart = ((u - hu_) / (ha * 1.05)) ** 2 + ((v - hv) / (hb * 1.05)) ** 2 <= 1
    for value, side, (cu, cv, au, av, tilt), base in zip((1, 2), (-1, 1), thorax.lungs, thorax.dome[:2]):
        du, dv = u - cu, v - cv
        uu, vv = du + tilt * dv, dv
        shape = (uu / au) ** 2 + (np.maximum(vv, 0) / (av * 1.4)) ** 2 + (np.minimum(vv, 0) / av) ** 2 <= 1
        medial = side * (u - 0.5) >= thorax.mediastinum + 0.04 * np.clip(v - 0.45, 0, None) / 0.3
        dome = v <= base - thorax.dome[2] * (1 - ((u - cu) / (au * 1.2)) ** 2)
        labels[shape & medial & dome & ~heart] = value
    return labels


def _cxr_case(thorax: _Thorax, rng: np.random.Generator, size: int, positive: bool):
    u, v = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="xy")
    sh = rng.uniform(-0.02, 0.02, size=2)
    u, v = u - sh[0], v - sh[1]
    px = 1.0 / size
    cu, cv, au, av = thorax.body
    body = _soft((np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2) - 1) * au, 3 * px)
    lungs = _cxr_lungs(thorax, u, v)
    lung_soft = ndimage.gaussian_filter((lungs > 0).astype(np.float32), 1.2 * size / 128)
    lung_dip = rng.uniform(0.55, 0.7)
    atten = 1.0 * body - lung_dip * lung_soft
    breast = np.clip((v - rng.uniform(0.45, 0.6)) / 0.2, 0, 1) * lung_soft  # soft-tissue shadows, lower zones
    atten += lung_dip * rng.uniform(0.0, 0.35) * breast
    reticular = np.exp(-(_smooth_noise(rng, (size, size), size / 40) / 0.35) ** 2)  # lung markings, case-varying
    atten += lung_dip * rng.uniform(0.0, 0.4) * reticular * lung_soft
    atten += 0.25 * _soft(np.abs(u - 0.5) - thorax.mediastinum * 0.8, 4 * px) * body  # mediastinum + spine
    hu_, hv, ha, hb = thorax.heart
    atten += 0.2 * _soft((np.sqrt(((u - hu_) / ha) ** 2 + ((v - hv) / hb) ** 2) - 1) * ha, 3 * px)
    ribs = np.zeros_like(u)
    thick = rng.uniform(0.014, 0.02)
    for k in range(9):
        for side in (-1, 1):
            t = np.clip(side * (u - 0.5), 0, None)
            centre = thorax.rib_top + k * thorax.rib_gap - 0.02 + thorax.rib_curve * (t - 0.18) ** 2
            band = _soft(np.abs(v - centre) - thick, 2 * px) * (t > 0.03) * (t < 0.4)
            ribs = np.maximum(ribs, band * (1 - 0.5 * (t < 0.1)))
    atten += rng.uniform(0.08, 0.14) * ribs * body
    cl_v, slope = thorax.clavicle
    for side in (-1, 1):
        t = side * (u - 0.5)
        clav = _soft(np.abs(v - (cl_v + slope * (t - 0.05))) - 0.012, 2 * px) * (t > 0.04) * (t < 0.3)
        atten += 0.18 * clav

    lesion = np.zeros((size, size), np.uint8)
    if positive:
        value = int(rng.integers(1, 3))
        rows, cols = np.nonzero((lungs == value) & (ndimage.distance_transform_edt(lungs == value) > 0.04 * size))
        if rows.size == 0:
            rows, cols = np.nonzero(lungs == value)
        j = int(rng.integers(rows.size))
        radius = rng.uniform(0.05, 0.085)
        blob = np.zeros_like(u)
        for _ in range(int(rng.integers(2, 5))):  # lumpy consolidation: a few overlapping soft-edged ellipses
            off = rng.normal(0, 0.4 * radius, size=2)
            r = radius * rng.uniform(0.55, 1.0)
            level = _ellipse(u, v, u[rows[j], cols[j]] + off[0], v[rows[j], cols[j]] + off[1], r,
                             r * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi))
            blob = np.maximum(blob, _soft((np.sqrt(level) - 1) * r, 2.5 * px))
        blob = ndimage.gaussian_filter(blob, 0.8 * size / 128) * lung_soft
        mottle = 1 + 0.2 * _smooth_noise(rng, (size, size), size / 64)  # air bronchograms / patchy filling
        atten += lung_dip * rng.uniform(0.65, 0.95) * blob * mottle
        lesion = ((blob > 0.5) & (lungs > 0)).astype(np.uint8)

    gamma, gain, offset = rng.uniform(0.8, 1.25), rng.uniform(0.7, 1.0), rng.uniform(0.0, 0.12)
    img = np.clip(atten, 0, None) / 1.6
    img = offset + gain * img ** gamma
    img += 0.08 * (u - 0.5) * rng.uniform(-1, 1) + 0.08 * (v - 0.5) * rng.uniform(-1, 1)  # heel effect
    img = ndimage.gaussian_filter(img, 0.5 * size / 128)
    img += rng.uniform(0.01, 0.035) * rng.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), lungs, lesion


def generate_cxr(out_dir: str | os.PathLike, n_cases: int = 32, *, size: int = 128, positive_fraction: float = 0.5,
                 seed: int = 0) -> Path:
    """Write CXR-like phantoms (label 1 = focal opacity) and return the ``datalist.json`` path.

    Files: ``images/<case>.png`` (8-bit grayscale), ``masks/<case>.png`` (lungs: 0 background, 1 right lung on the
    image left, 2 left lung), ``lesions/<case>.png`` (opacity, 0/1). Items: ``image``, ``label``, ``mask``,
    ``lesion``, ``patient``.
    """
    _check_common(n_cases, positive_fraction, seed)
    if int(size) != size or size < 32:
        raise DataError(f"generate_cxr: size must be an integer >= 32, got {size!r}")
    out = Path(out_dir)
    labels, patients = _labels_and_patients(n_cases, positive_fraction, seed)
    items = []
    for i in _progress(range(n_cases), n_cases, "CXR phantoms"):
        case, patient = f"cxr_{i:04d}", f"P{patients[i]:04d}"
        thorax = _Thorax(_rng(seed, _PATIENT, patients[i]))
        img, lungs, lesion = _cxr_case(thorax, _rng(seed, _CASE, i), int(size), bool(labels[i]))
        paths = {"image": f"images/{case}.png", "mask": f"masks/{case}.png", "lesion": f"lesions/{case}.png"}
        for key, array in zip(("image", "mask", "lesion"), (img, lungs, lesion)):
            write_bytes(out / paths[key], _png_bytes(array))
        items.append({"image": paths["image"], "label": int(labels[i]), "mask": paths["mask"],
                      "lesion": paths["lesion"], "patient": patient})
    return _write_datalist(out, items, ("image", "label", "mask", "lesion", "patient"))


# ------------------------------------------------------------------------------------------------------- histology
_H_OD = np.array([0.650, 0.704, 0.286])  # Ruifrok & Johnston haematoxylin / eosin optical-density vectors (RGB)
_E_OD = np.array([0.072, 0.990, 0.105])


def _stain(rng: np.random.Generator) -> dict[str, Any]:
    """Per-slide stain: perturbed H and E vectors, stain strengths, illumination."""
    def vec(base):
        v = np.clip(base + rng.normal(0, 0.06, 3), 0.02, None)
        return v / np.linalg.norm(v)
    return {"h": vec(_H_OD), "e": vec(_E_OD), "h_gain": rng.uniform(0.7, 1.3), "e_gain": rng.uniform(0.6, 1.4),
            "light": rng.uniform(225, 250)}


def _ellipse(u, v, cu, cv, a, b, theta):
    c, s = math.cos(theta), math.sin(theta)
    du, dv = u - cu, v - cv
    return ((c * du + s * dv) / a) ** 2 + ((-s * du + c * dv) / b) ** 2


def _histology_case(stain: dict[str, Any], rng: np.random.Generator, size: int, positive: bool):
    scale = size / 128
    v, u = np.mgrid[0:size, 0:size].astype(np.float32)
    # eosin: fibrous stroma (anisotropic smoothed noise along a random direction) with a few pale spaces
    theta = rng.uniform(0, math.pi)
    fibres = _smooth_noise(rng, (size, size), (1.0 * scale + 0.5, 5 * scale + 1))
    fibres = ndimage.rotate(fibres, math.degrees(theta), reshape=False, mode="wrap")
    eosin = rng.uniform(0.35, 0.6) + 0.15 * fibres + 0.08 * _smooth_noise(rng, (size, size), 8 * scale)
    for _ in range(int(rng.integers(0, 4))):
        space = _ellipse(u, v, *rng.uniform(0, size, 2), *(rng.uniform(6, 16, 2) * scale), rng.uniform(0, math.pi))
        eosin *= 1 - 0.85 * _soft(np.sqrt(space) - 1, 0.3)
    haem = np.zeros((size, size), np.float32)
    grain = _smooth_noise(rng, (size, size), 0.7 * scale)
    density, hyperchromatic = rng.uniform(0.6, 1.6), rng.uniform(0.0, 0.4)
    for _ in range(int(rng.poisson(45 * density * scale ** 2))):  # tumour/stromal nuclei, some hyperchromatic
        a = rng.uniform(3.0, 5.5) * scale
        level = _ellipse(u, v, *rng.uniform(0, size, 2), a, a * rng.uniform(0.55, 0.95), rng.uniform(0, math.pi))
        stain_h = rng.uniform(0.9, 1.3) if rng.random() < hyperchromatic else rng.uniform(0.45, 0.85)
        haem = np.maximum(haem, _soft((np.sqrt(level) - 1) * a, 1.0) * stain_h * (1 + 0.25 * grain))
    figure = np.zeros((size, size), np.float32)
    if positive:  # mitotic figure: a clumped, irregular band of dense chromatin with ragged projections
        margin = 12 * scale
        cu, cv = rng.uniform(margin, size - margin, 2)
        angle, length = rng.uniform(0, math.pi), rng.uniform(6, 9) * scale
        for _ in range(int(rng.integers(12, 19))):
            t, w = rng.uniform(-1, 1) * length, rng.normal(0, 1.5 * scale)
            bu, bv = cu + t * math.cos(angle) - w * math.sin(angle), cv + t * math.sin(angle) + w * math.cos(angle)
            r = rng.uniform(1.2, 2.2) * scale
            level = _ellipse(u, v, bu, bv, r * rng.uniform(1.0, 2.0), r, rng.uniform(0, math.pi))
            figure = np.maximum(figure, _soft((np.sqrt(level) - 1) * r, 0.8))
    # lymphocytes: small, round, as dark as a mitosis; a positive patch has as many fewer as its figure's area
    # is worth, so the amount of very dark chromatin (the tail of the intensity histogram) does not give it away
    lymph_radius = max(2.2 * scale, 1.6)
    n_lymph = int(rng.uniform(0, 80) * scale ** 2) + 1 - int(round(figure.sum() / (math.pi * lymph_radius ** 2)))
    for _ in range(max(n_lymph, 0)):
        r = max(rng.uniform(1.8, 2.6) * scale, 1.6)
        level = _ellipse(u, v, *rng.uniform(0, size, 2), r, r * rng.uniform(0.85, 1.0), 0.0)
        haem = np.maximum(haem, _soft((np.sqrt(level) - 1) * r, 0.8) * rng.uniform(1.4, 1.9))
    haem = np.maximum(haem, figure * rng.uniform(1.4, 1.9))
    lesion = (figure >= 0.5).astype(np.uint8)

    od = (stain["h_gain"] * haem[..., None] * stain["h"] + stain["e_gain"] * np.clip(eosin, 0, None)[..., None]
          * stain["e"])
    rgb = stain["light"] * np.exp(-od * rng.uniform(0.9, 1.1))
    rgb = ndimage.gaussian_filter(rgb, (0.5 * scale, 0.5 * scale, 0))
    rgb += rng.uniform(1.5, 5.0) * rng.standard_normal(rgb.shape)
    return np.clip(rgb, 0, 255).round().astype(np.uint8), lesion


def generate_histology(out_dir: str | os.PathLike, n_cases: int = 32, *, size: int = 128,
                       positive_fraction: float = 0.5, seed: int = 0) -> Path:
    """Write H&E-like patches (label 1 = one mitotic-figure-like blob) and return the ``datalist.json`` path.

    Files: ``images/<case>.png`` (RGB), ``lesions/<case>.png`` (mitotic figure, 0/1). Items: ``image``, ``label``,
    ``lesion``, ``patient``; cases of one patient share the slide's stain.
    """
    _check_common(n_cases, positive_fraction, seed)
    if int(size) != size or size < 32:
        raise DataError(f"generate_histology: size must be an integer >= 32, got {size!r}")
    out = Path(out_dir)
    labels, patients = _labels_and_patients(n_cases, positive_fraction, seed)
    items = []
    for i in _progress(range(n_cases), n_cases, "histology phantoms"):
        case, patient = f"histo_{i:04d}", f"P{patients[i]:04d}"
        rgb, lesion = _histology_case(_stain(_rng(seed, _PATIENT, patients[i])), _rng(seed, _CASE, i), int(size),
                                      bool(labels[i]))
        image, lesion_path = f"images/{case}.png", f"lesions/{case}.png"
        write_bytes(out / image, _png_bytes(rgb))
        write_bytes(out / lesion_path, _png_bytes(lesion))
        items.append({"image": image, "label": int(labels[i]), "lesion": lesion_path, "patient": patient})
    return _write_datalist(out, items, ("image", "label", "lesion", "patient"))


# ------------------------------------------------------------------------------------------------------------- CLI
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.lower().replace(",", "x").split("x"))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.lower().replace(",", "x").split("x"))


def add_parser(subparsers) -> None:
    """Register ``medtl3d phantoms {ctpa,cxr,histology}``."""
    p = subparsers.add_parser("phantoms", help="write synthetic CTPA / CXR / H&E phantoms with a datalist")
    p.add_argument("kind", choices=("ctpa", "cxr", "histology"))
    p.add_argument("--output", required=True, help="folder to write into")
    p.add_argument("--n", type=int, help="number of cases (default: 16 CTPA, 32 CXR / histology)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positive-fraction", type=float, default=0.5)
    p.add_argument("--fmt", choices=("nifti", "dicom"), default="nifti", help="CTPA image format")
    p.add_argument("--shape", type=_ints, default=(32, 64, 64), help="CTPA slices x rows x cols (default 32x64x64)")
    p.add_argument("--spacing", type=_floats, default=(2.0, 1.0, 1.0), help="CTPA mm, slices x rows x cols")
    p.add_argument("--size", type=int, default=128, help="CXR / histology image side (default 128)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Generate the phantoms ``args`` ask for and print the datalist path; returns the exit status."""
    common = {"positive_fraction": args.positive_fraction, "seed": args.seed}
    generators: dict[str, Callable[[], Path]] = {
        "ctpa": lambda: generate_ctpa(args.output, args.n or 16, shape=args.shape, spacing=args.spacing,
                                      fmt=args.fmt, **common),
        "cxr": lambda: generate_cxr(args.output, args.n or 32, size=args.size, **common),
        "histology": lambda: generate_histology(args.output, args.n or 32, size=args.size, **common),
    }
    print(generators[args.kind]())
    return 0
