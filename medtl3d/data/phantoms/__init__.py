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

from ._common import _labels_and_patients  # noqa: F401  (tests draw labels and patients as the generators do)
from .cli import add_parser, run
from .ctpa import generate_ctpa
from .cxr import generate_cxr
from .histology import generate_histology

__all__ = ["generate_ctpa", "generate_cxr", "generate_histology", "add_parser", "run"]
