"""What the phantom generators share: seeded streams, labels and patients, file encoders, datalists, noise."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from ...errors import DataError
from ...reporting import write_bytes


logger = logging.getLogger("medtl3d.data.phantoms")  # the name it had as one module

# Stream tags for numpy generators: one stream per (seed, purpose, index) so a case depends only on its own index.
_LABELS, _PATIENT, _CASE = 0, 1, 2


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
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
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


def _ellipse(u, v, cu, cv, a, b, theta):
    c, s = math.cos(theta), math.sin(theta)
    du, dv = u - cu, v - cv
    return ((c * du + s * dv) / a) ** 2 + ((-s * du + c * dv) / b) ** 2
