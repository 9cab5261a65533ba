"""Representation analyses: why a transfer choice works.

Families (one registry, one signature each; see :mod:`medtl3d.analysis._registry`): ``similarity`` (linear /
debiased / RBF CKA, CCA, SVCCA, PWCCA), ``probe`` (kNN, linear), ``weights`` (per-layer distances),
``predictions`` (prediction similarity, feature-reuse share), ``attribution`` (Grad-CAM, Grad-CAM++); plus
activation capture, re-initialisation robustness and domain distance. ``medtl3d analyze`` is the command line,
:mod:`medtl3d.analysis.bundle` what the bundles' ``analysis.yaml`` runs.
"""

from . import attribution, domain, predictions, probes, reinit, similarity, weights
from ._registry import get_analysis, list_analyses, register_analysis

__all__ = ["attribution", "domain", "get_analysis", "list_analyses", "predictions", "probes", "register_analysis",
           "reinit", "similarity", "weights"]
