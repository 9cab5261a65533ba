"""CXR-like radiograph phantoms (:func:`generate_cxr`): lung fields, masks and focal opacities."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from ...errors import DataError
from ...reporting import write_bytes
from ._common import (_CASE, _PATIENT, _check_common, _ellipse, _labels_and_patients, _png_bytes, _progress, _rng,
                      _smooth_noise, _soft, _write_datalist)


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
