"""Inference over a folder of cases (DICOM series, NIfTI, PNG/JPEG): one CSV row per case with its status, NIfTI
masks for segmentation; ``medtl3d infer`` is its command line (:mod:`medtl3d.inference.cli`)."""

from ._folder import InferenceSummary, infer_folder, resolve_model
from ._network import load_network

__all__ = ["InferenceSummary", "infer_folder", "load_network", "resolve_model"]
