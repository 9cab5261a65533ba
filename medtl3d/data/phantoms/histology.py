"""H&E-like histology patch phantoms (:func:`generate_histology`): stain mixing and mitotic figures."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ...errors import DataError
from ...reporting import write_bytes
from ._common import (_CASE, _PATIENT, _check_common, _ellipse, _labels_and_patients, _png_bytes, _progress, _rng,
                      _smooth_noise, _soft, _write_datalist)


_H_OD = np.array([0.650, 0.704, 0.286])  # Ruifrok & Johnston haematoxylin / eosin optical-density vectors (RGB)
_E_OD = np.array([0.072, 0.990, 0.105])


def _stain(rng: np.random.Generator) -> dict[str, Any]:
    """Per-slide stain: perturbed H and E vectors, stain strengths, illumination."""
    def vec(base):
        v = np.clip(base + rng.normal(0, 0.06, 3), 0.02, None)
        return v / np.linalg.norm(v)
    return {"h": vec(_H_OD), "e": vec(_E_OD), "h_gain": rng.uniform(0.7, 1.3), "e_gain": rng.uniform(0.6, 1.4),
            "light": rng.uniform(225, 250)}


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
