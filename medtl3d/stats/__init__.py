"""Case-level uncertainty and paired comparisons of model metrics: pure functions on arrays (numpy / scipy).

- AUROC: :func:`auroc`, DeLong variance / interval / paired test (:func:`delong_auc_variance`, :func:`delong_ci`,
  :func:`delong_paired_test`, :func:`delong_covariance`; the ``O(N log N)`` algorithm of Sun & Xu 2014);
- any metric: :func:`bootstrap_ci` and :func:`paired_bootstrap_diff` (``scipy.stats.bootstrap``, stratified by
  class, BCa with a percentile fallback);
- several classes: :func:`macro_auroc`; per-class tests corrected with :func:`holm_adjust`;
- accuracy at fixed thresholds: :func:`mcnemar_test`; across folds x seeds: :func:`corrected_resampled_ttest`;
  :func:`noninferiority` turns a difference's interval into a :class:`Verdict` (none from an interval of zero
  width: :func:`informative`);
- AUPRC: :func:`average_precision`; thresholds and calibration: :func:`roc_curve`, :func:`threshold_at`,
  :func:`operating_point`, :func:`reliability_bins`, :func:`expected_calibration_error`.

Every function cites its source in its docstring.
"""

from ._bootstrap import bootstrap_ci, paired_bootstrap_diff
from ._checks import StatisticsError
from ._classification import (
    OperatingPoint,
    ReliabilityBins,
    ThresholdChoice,
    auroc,
    average_precision,
    expected_calibration_error,
    macro_auroc,
    operating_point,
    reliability_bins,
    roc_curve,
    threshold_at,
)
from ._comparisons import (
    DEFAULT_MARGINS,
    McNemarResult,
    ResampledTTest,
    Verdict,
    corrected_resampled_ttest,
    holm_adjust,
    informative,
    mcnemar_test,
    noninferiority,
)
from ._delong import delong_auc_variance, delong_ci, delong_covariance, delong_paired_test
from ._results import Interval, PairedDifference

__all__ = [
    "DEFAULT_MARGINS", "Interval", "McNemarResult", "OperatingPoint", "PairedDifference", "ReliabilityBins",
    "ResampledTTest", "StatisticsError", "ThresholdChoice", "Verdict", "auroc", "average_precision", "bootstrap_ci",
    "corrected_resampled_ttest", "delong_auc_variance", "delong_ci", "delong_covariance", "delong_paired_test",
    "expected_calibration_error", "holm_adjust", "informative", "macro_auroc", "mcnemar_test", "noninferiority",
    "operating_point", "paired_bootstrap_diff", "reliability_bins", "roc_curve", "threshold_at",
]
