"""Inference over a folder of cases (DICOM series, NIfTI, PNG/JPEG): one CSV row per case with its status, NIfTI
masks for segmentation. :func:`infer_folder` runs it in Python, the bundles' ``inference.yaml`` lists the same
pieces as components (:mod:`medtl3d.inference._folder`), ``medtl3d infer`` is its command line
(:mod:`medtl3d.inference.cli`)."""

from ._dataset import CaseDataset, collate_cases, prepare_cases
from ._folder import infer_folder, run_settings
from ._inferer import CaseInferer
from ._journal import JOURNAL_DIR, Journal
from ._network import load_network, resolve_model
from ._progress import CaseProgress
from ._rows import CaseRows
from ._writer import InferenceSummary, PredictionWriter

__all__ = ["JOURNAL_DIR", "CaseDataset", "CaseInferer", "CaseProgress", "CaseRows", "InferenceSummary", "Journal",
           "PredictionWriter", "collate_cases", "infer_folder", "load_network", "prepare_cases", "resolve_model",
           "run_settings"]
