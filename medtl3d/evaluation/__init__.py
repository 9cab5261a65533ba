"""Case-level evaluation reports and paired comparisons of evaluated runs.

- :func:`case_report` / :func:`write_evaluation`: every metric of an evaluation with its interval over test cases,
  the operating point at a threshold chosen on validation data (:func:`choose_threshold`), calibration, curves;
  :class:`EvaluationReport` (a handler of the bundles' ``evaluate.yaml`` evaluator) writes it next to
  ``predictions.csv``, scoring binary tasks at its threshold component (:class:`ValidationThreshold`,
  :class:`FixedThreshold`) and, with a :class:`StudyLevel`, again per clinical study (:func:`aggregate_studies`).
- :func:`compare_runs` (``medtl3d compare RUN_A RUN_B``): two evaluated runs (or arms of several runs, folds x
  seeds) on the same test cases, with paired tests and a non-inferiority verdict; :func:`plot_comparison` redraws
  its PNGs from a saved ``comparison.json``.

The statistics themselves are :mod:`medtl3d.stats`.
"""

from ._cases import CaseReport, binary_arrays, case_report, choose_threshold
from ._compare import Comparison, compare_runs, load_run
from ._compare_plot import plot_comparison
from ._levels import StudyLevel, aggregate_studies
from ._report import comparison_lines, write_comparison, write_evaluation
from ._threshold import FixedThreshold, ValidationThreshold
from .handler import EvaluationReport, training_record

__all__ = ["CaseReport", "Comparison", "EvaluationReport", "FixedThreshold", "StudyLevel", "ValidationThreshold",
           "aggregate_studies", "binary_arrays", "case_report", "choose_threshold", "compare_runs",
           "comparison_lines", "load_run", "plot_comparison", "training_record", "write_comparison",
           "write_evaluation"]
