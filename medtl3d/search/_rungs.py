"""Early termination of a search's trials: synchronous successive halving on epochs.

The rungs are ``r, r*eta, r*eta^2, ...`` epochs, then the trials' full ``R`` epochs (:func:`rung_epochs`). Every
candidate of a stage trains to the first rung; at each rung the top ``ceil(n / eta)`` of the ``n`` candidates
there continue to the next one and the others stop (successive halving, Jamieson & Talwalkar 2016, AISTATS; the
rungs of ASHA, Li et al. 2020, MLSys). A candidate's rung score is the mean, over the folds x seeds that reached
the rung, of each trial's best validation key metric within the rung's epochs (:func:`rung_score`); ties go to the
candidate earlier in the search's prior order (probe ranking, else cheaper first).

Ray Tune's ``ASHAScheduler`` is not used: it is asynchronous (a trial is promoted once it is in the top 1/eta of
the trials that *have reported so far*), so its decisions depend on which worker finishes first and a local and a
Ray search of the same seeds would train different candidates; and it drives trials that report from inside a
Tune trainable, whereas ours are bundle runs that the local executor runs in-process. Rungs decided here, from
the results store, are the same for both executors and are recomputed identically when a killed search resumes.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

from ..errors import SearchError


def rung_epochs(max_epochs: int, min_epochs: int | None, eta: int) -> list[int]:
    """``[r, r*eta, r*eta^2, ..., R]``: the rungs ``r*eta^i`` whose next one still fits in ``R`` (so the last
    step to ``R`` is at least a factor ``eta``, not 9 -> 10 epochs), then ``R``; ``min_epochs`` None: ``R / eta^2``
    rounded down, at least 1 (three rungs when ``R >= eta^2``)."""
    if int(eta) != eta or eta < 2:
        raise SearchError(f"eta must be an integer >= 2, got {eta!r}")
    if min_epochs is None:
        min_epochs = max(1, int(max_epochs) // int(eta) ** 2)
    if int(min_epochs) != min_epochs or not 1 <= min_epochs <= max_epochs:
        raise SearchError(f"min_epochs must be an integer in [1, epochs={max_epochs}], got {min_epochs!r}")
    rungs, epoch = [], int(min_epochs)
    while epoch * eta <= max_epochs:
        rungs.append(epoch)
        epoch *= int(eta)
    return rungs + [int(max_epochs)]


def reached(record: Mapping, epoch: int) -> bool:
    """Whether a trial's record counts at rung ``epoch``: trained that far, or finished earlier (the engine's own
    early stopping ended it; it will never train further)."""
    return record["epochs_run"] >= epoch or not record["paused"]


def rung_score(record: Mapping, epoch: int, key_metric: str) -> float:
    """Best validation ``key_metric`` of the trial's first ``epoch`` epochs (NaN when none was defined)."""
    values = [row[f"val_{key_metric}"] for row in record["history"]
              if row["epoch"] <= epoch and not math.isnan(row.get(f"val_{key_metric}", math.nan))]
    return max(values, default=math.nan)


def promote(scores: Mapping[str, Sequence[float]], eta: int, order: Sequence[str]) -> list[str]:
    """The candidates (of ``order``, in that order) that continue past a rung: the top ``ceil(n / eta)`` of the
    ``n`` candidates in ``scores`` by their mean finite score. A candidate without any finite score ranks last;
    equal means keep ``order``'s order (the prior)."""
    position = {label: i for i, label in enumerate(order)}
    missing = sorted(set(scores) - set(position))
    if missing:
        raise SearchError(f"rung scores for candidates outside the search's order: {', '.join(missing)}")

    def mean(label: str) -> float:
        finite = [v for v in scores[label] if v is not None and not math.isnan(v)]
        return statistics.fmean(finite) if finite else -math.inf

    ranked = sorted(scores, key=lambda label: (-mean(label), position[label]))
    kept = set(ranked[:math.ceil(len(ranked) / eta)])
    return [label for label in order if label in kept]
