"""Hierarchical cutoff search: how much of a pretrained backbone to reuse, chosen on validation folds.

For each cut strategy (``truncate`` = TTL, ``transfusion`` = TF, ``lwft`` = LWFT; ``partial`` too) the search
trains the bundle at every *block* cut point (Stage 1) next to the references (FTL always; RI / linear probe on
request), picks the best block cut on the mean validation key metric over k folds x s seeds, then trains every
*layer* cut point in the blocks around it (Stage 2, :func:`neighbourhood`). The table names the picks like the
TruncatedTL paper (``TTL-1`` best after Stage 1, ``TTL-2`` after Stage 2) and joins params / MACs / latency from
:mod:`medtl3d.efficiency`. Optional kNN / linear probes on frozen pretrained features rank every cut point before
any fine-tuning (and can restrict Stage 1 to the top-m); their Spearman correlation with the fine-tuned result is
reported. Trials stop early by successive halving on epochs (:mod:`._rungs`, run by :mod:`._runner`; the probe
ranking orders the candidates), within an optional budget. The report (:mod:`._verdicts`) gives each cut's interval
across folds x seeds and ``TTL-NI``, the cheapest cut non-inferior to the best (or to FTL) at a margin, with the
search's cost next to an exhaustive one's. Each finished trial is appended to ``trials.jsonl`` at once, and a trial
in flight continues from its last epoch's checkpoint: a killed search resumes losing at most one epoch per running
trial. Trials run in-process
or as Ray tasks (``executor="ray"``), each on one process or data-parallel under torchrun
(``processes_per_trial``).

No maintained library fits: Ray Tune / Optuna search hyper-parameter spaces, not the structured, stage-wise
candidate sets of a cut-point search, and neither knows bundles, folds or costs; Ray is used as the executor.
"""

from ._bundle import BundleTask
from ._executors import EXECUTORS, Executor, LocalExecutor, RayExecutor, TrialError, make_executor
from ._plan import REFERENCES, SEARCH_STRATEGIES, SHORT_NAMES, Candidate, neighbourhood, stage1_cuts, stage2_cuts
from ._probes import probe_ranking, spearman
from ._report import pareto_front, write_search_report
from ._runner import Budget, StageRunner
from ._search import (CutoffSearch, SearchResult, add_costs, check_search_options, configs_hash,
                      fingerprinted_overrides, run_search)
from ._store import ResultsStore
from ._trial import TrialSpec, run_trial
from ._verdicts import annotate

__all__ = ["Budget", "BundleTask", "Candidate", "CutoffSearch", "EXECUTORS", "Executor", "LocalExecutor",
           "RayExecutor", "REFERENCES", "ResultsStore", "SEARCH_STRATEGIES", "SHORT_NAMES", "SearchResult",
           "StageRunner", "TrialError", "TrialSpec", "add_costs", "annotate", "check_search_options", "configs_hash",
           "fingerprinted_overrides", "make_executor", "neighbourhood", "pareto_front", "probe_ranking", "run_search",
           "run_trial", "spearman", "stage1_cuts", "stage2_cuts", "write_search_report"]
