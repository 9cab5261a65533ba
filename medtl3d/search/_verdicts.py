"""Statistics of a search's table: each candidate's validation score with its interval across folds x seeds, the
non-inferior pick, and which cuts cannot be told apart from their neighbour.

The trials of a candidate share training cases across folds and seeds, so the plain spread of their scores
understates the uncertainty: intervals of a mean score and of a paired difference (paired by fold and seed) use
Nadeau & Bengio's corrected variance (:func:`medtl3d.stats.corrected_resampled_ttest`, with the folds' validation
and training sizes). The pick follows CONSORT's non-inferiority reading (:func:`medtl3d.stats.noninferiority`):
the cheapest fully trained cut whose difference to the reference (the best fully trained candidate, or FTL) has
its interval above ``-margin``. Only fully trained candidates (all ``epochs``) are compared: a trial stopped at a
rung is reported with its rung, never set against a finished one. An interval of zero width (every run gave the
same difference) gives no verdict (:func:`medtl3d.stats.informative`): such a cut is inconclusive, never picked,
and indistinguishable from its neighbour.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..engine.metrics import metric_range
from ..stats import StatisticsError, Verdict, corrected_resampled_ttest, informative, noninferiority

LEVEL = 0.95


def _scores(records: Sequence[Mapping], key_metric: str) -> dict[tuple[int, int], float]:
    return {(r["fold"], r["seed"]): r["val"].get(key_metric, math.nan) for r in records}


def _ttest(values: Sequence[float], n_train: int, n_test: int):
    """The corrected resampled t-test of ``values`` (None with fewer than two finite values)."""
    finite = [v for v in values if not math.isnan(v)]
    try:
        return corrected_resampled_ttest(finite, n_train, n_test, LEVEL)
    except StatisticsError:
        return None


def _difference(a: Mapping, b: Mapping, n_train: int, n_test: int):
    """Paired ``a - b`` over the (fold, seed) runs both have."""
    return _ttest([a[k] - b[k] for k in sorted(set(a) & set(b))], n_train, n_test)


def _cost(row: Mapping) -> tuple:
    macs = row.get("macs_g")
    return (math.inf if macs is None else macs, row["unit"] if row["unit"] is not None else 1 << 30)


def annotate(rows: list[dict], records: Mapping[str, Sequence[Mapping]], key_metric: str, *, margin: float,
             reference: str, n_train: int, n_test: int, strategies: Sequence[str]) -> dict[str, str]:
    """Add ``val_<key>_low/high`` (interval of the mean), ``vs_reference`` (difference, its interval, verdict) and
    ``vs_next`` (against the next deeper complete cut of the strategy) to ``rows``; return ``{strategy: pick}``:
    the cheapest complete candidate of each strategy non-inferior to the reference (none when no interval could
    be computed). ``reference``: ``best`` (the best complete candidate on mean validation score) or ``full``."""
    metric = f"val_{key_metric}_mean"
    floor, ceiling = metric_range(key_metric)
    scores = {row["label"]: _scores(records[row["label"]], key_metric) for row in rows}
    complete = [r for r in rows if r["complete"] and not math.isnan(r.get(metric, math.nan))]
    for row in rows:
        test = _ttest(list(scores[row["label"]].values()), n_train, n_test)
        # a t-interval of a mean near a bound can pass it (AUROC 1.03): clipped to the values the metric can take
        row[f"val_{key_metric}_low"], row[f"val_{key_metric}_high"] = (
            (max(test.low, floor), min(test.high, ceiling)) if test else (None, None))
        row["vs_reference"] = row["vs_next"] = None
    if reference == "best":
        anchor = max(complete, key=lambda r: (r[metric], [-c for c in _cost(r)]), default=None)
    else:
        anchor = next((r for r in complete if r["label"] == reference), None)
    picks: dict[str, str] = {}
    for row in complete:
        if anchor is None:
            break
        if row is anchor:
            row["vs_reference"] = {"reference": anchor["label"], "verdict": "reference"}
            continue
        test = _difference(scores[row["label"]], scores[anchor["label"]], n_train, n_test)
        if test is not None:
            verdict = noninferiority(test.low, test.high, margin)
            row["vs_reference"] = {"reference": anchor["label"], "difference": test.mean_difference,
                                   "low": test.low, "high": test.high, "verdict": verdict.value}
    for strategy in strategies:
        mine = sorted((r for r in complete if r["strategy"] == strategy), key=lambda r: r["unit"])
        for row, deeper in zip(mine, mine[1:]):
            test = _difference(scores[row["label"]], scores[deeper["label"]], n_train, n_test)
            if test is not None:
                relation = ("indistinguishable from" if not informative(test.low, test.high)
                            or test.low <= 0 <= test.high else
                            "better than" if test.low > 0 else "worse than")
                row["vs_next"] = {"next": deeper["label"], "relation": relation, "difference": test.mean_difference,
                                  "low": test.low, "high": test.high}
        good = [r for r in mine if r is anchor or (r["vs_reference"] or {}).get("verdict") in
                (Verdict.NON_INFERIOR.value, Verdict.SUPERIOR.value)]
        if good:
            picks[strategy] = min(good, key=_cost)["label"]
    return picks
