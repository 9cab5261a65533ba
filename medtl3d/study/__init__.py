"""Studies: the seed papers' questions answered on the user's data, each as a claim with a test, an effect size,
its interval and a verdict (supported / contradicted / inconclusive at this sample size).

A study trains a declarative grid, weights (pretrained / random) x strategy x cut x fold x seed
(:func:`expand_grid`; every truncated or slimmed arm with its random-init control of the same architecture), through
the cutoff search's machinery: its resumable results store (``trials.jsonl``: a re-run trains nothing new, a kill
loses at most the trials in flight), its trials (each an ordinary bundle run), its local / Ray executors and
torchrun data parallelism, and its params / MACs / latency table (:mod:`medtl3d.efficiency`). It then judges
(:mod:`._claims`, statistics from :mod:`medtl3d.stats`):

1. transfer vs random init (WT vs RI), statistics transfer (ST, Mean-Var) against both, and the feature-reuse
   share (WT - ST) / (WT - RI) with its bootstrap interval;
2. truncation: the cheapest cut non-inferior to FTL (the search's verdicts) with the params / MACs / latency it
   saves, and against its random-init control;
3. TransFusion and LWFT against FTL at the same epochs;
4. representation change: linear CKA of initial vs final model by depth, WT vs RI, and the depth where WT and RI
   end apart (:mod:`medtl3d.analysis`);
5. convergence: epochs to 95% of the final validation score, WT vs RI (each run's history).

``medtl3d study --bundle ...`` or the bundles' ``study.yaml`` (merged on ``train.yaml``; its ``study`` component is
:class:`Study`) run it; the report is ``study_report.{md,json,csv}`` with ``study_score_cost.png`` and
``study_cka.png``.
"""

from ._claims import (CONTRADICTED, INCONCLUSIVE, NOT_TESTED, SUPPORTED, claim_budget, claim_convergence,
                      claim_representation, claim_transfer, claim_truncation, epochs_to_fraction, reuse_share)
from ._grid import STUDY_STRATEGIES, WEIGHTS, Arm, check_grid, expand_grid
from ._report import figures, plot_figures
from ._study import Study, StudyResult, StudyTask, check_study_options, run_study

__all__ = ["Arm", "CONTRADICTED", "INCONCLUSIVE", "NOT_TESTED", "STUDY_STRATEGIES", "SUPPORTED", "Study",
           "StudyResult", "StudyTask", "WEIGHTS", "check_grid", "check_study_options", "claim_budget",
           "claim_convergence", "claim_representation", "claim_transfer", "claim_truncation", "epochs_to_fraction",
           "expand_grid", "figures", "plot_figures", "reuse_share", "run_study"]
