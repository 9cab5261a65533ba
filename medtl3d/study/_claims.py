"""The five claims of a study, each a verdict on trial records: pure functions, no training.

Runs pair by (fold, seed); every difference across runs goes through the corrected resampled t-test
(:func:`medtl3d.stats.corrected_resampled_ttest`, Nadeau & Bengio 2003) with the folds' training and validation
sizes; the non-inferior picks of claims 2 and 3 are the search's own (:func:`medtl3d.search.annotate`, against
FTL). A verdict is one of:

- ``supported``: the interval of the claimed effect excludes no effect (superiority: lower bound > 0;
  non-inferiority: lower bound > -margin);
- ``contradicted``: the interval excludes the claimed effect (superiority: upper bound < the margin, i.e. at best
  a gain smaller than the margin; non-inferiority: upper bound < -margin);
- ``inconclusive``: at this sample size the interval holds both, or it has zero width (every run gave the same
  difference: nothing to estimate its spread from; :func:`medtl3d.stats.informative`, the search's rule too);
  ``not tested`` when the grid lacks an arm.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from ..analysis.predictions import feature_reuse
from ..errors import AnalysisError, EvaluationError, Medtl3dError
from ..evaluation import binary_arrays, compare_runs, load_run
from ..search import annotate
from ..stats import Interval, StatisticsError, auroc, bootstrap_ci, corrected_resampled_ttest, informative

LEVEL = 0.95
POWER = 0.8
SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTED = "supported", "contradicted", "inconclusive", "not tested"
TTEST = "corrected resampled t-test across folds x seeds (Nadeau & Bengio 2003), paired by fold and seed"
VALIDATION = "validation runs, corrected resampled t-test"


def run_scores(records: Sequence[Mapping], key_metric: str) -> dict[tuple[int, int], float]:
    """Each finished run's validation ``key_metric`` at its best epoch, by (fold, seed)."""
    return {(r["fold"], r["seed"]): r["val"].get(key_metric, math.nan) for r in records}


def paired_ttest(a: Mapping, b: Mapping, n_train: int, n_test: int):
    """The corrected resampled t-test of ``a - b`` over the runs both have (None with fewer than two)."""
    runs = sorted(k for k in set(a) & set(b) if math.isfinite(a[k]) and math.isfinite(b[k]))
    try:
        return corrected_resampled_ttest([a[k] - b[k] for k in runs], n_train, n_test, LEVEL)
    except StatisticsError:
        return None


def superiority(test, margin: float) -> str:
    """Verdict on "the difference is positive" from an interval with ``low`` / ``high`` (see the module docstring;
    ``margin`` >= 0); an interval of zero width is inconclusive."""
    if test is None or not informative(test.low, test.high):
        return INCONCLUSIVE
    if test.low > 0:
        return SUPPORTED
    return CONTRADICTED if test.high < margin else INCONCLUSIVE


def on_test_cases(what: str, folders: Mapping[str, Sequence[str]] | None, a: str, b: str, margin: float,
                  superior: bool) -> list[dict]:
    """``a - b`` on the test cases (:func:`medtl3d.evaluation.compare_runs` on the arms' evaluated trials: DeLong /
    paired bootstrap for one run per arm, the corrected resampled t-test over several), as one more comparison row;
    its verdict is a superiority (``superior``) or the non-inferiority one. Reported beside the validation verdict,
    never instead of it. Nothing when the trials were not scored on the test split."""
    if not folders or not folders.get(a) or not folders.get(b):
        return []
    name = f"{what} (test cases)"
    try:
        result = compare_runs(folders[a], folders[b], margin=margin)
    except Medtl3dError as err:
        return [{"comparison": name, "verdict": INCONCLUSIVE, "note": f"no test comparison: {err}"}]
    row = next(r for r in result.rows if r["metric"] == result.primary and r.get("low") is not None)
    interval = Interval(row["difference"], row["low"], row["high"], LEVEL, row["method"])
    verdict = superiority(interval, margin) if superior else result.verdict
    return [{"comparison": name, "difference": row["difference"], "low": row["low"], "high": row["high"],
             "p_value": row.get("p_value"), "runs": len(result.runs_a), "verdict": verdict,
             "method": f"{result.primary}: {row['method']}"}]


def smallest_detectable(test) -> float | None:
    """The difference this test would detect with probability :data:`POWER` at two-sided ``1 - LEVEL``:
    ``(t_{1-a/2} + t_{power}) * se`` with the test's corrected standard error and degrees of freedom."""
    if test is None:
        return None
    quantile = scipy_stats.t.ppf(0.5 + LEVEL / 2, test.df) + scipy_stats.t.ppf(POWER, test.df)
    return float(quantile * test.se)


def comparison(what: str, test, verdict: str, method: str = VALIDATION) -> dict:
    """One comparison of a claim: its difference, interval, p-value and number of paired runs."""
    if test is None:
        return {"comparison": what, "verdict": verdict, "runs": 0, "note": "fewer than two paired runs"}
    return {"comparison": what, "difference": test.mean_difference, "low": test.low, "high": test.high,
            "p_value": test.p_value, "runs": test.runs, "verdict": verdict, "method": method}


def _claim(number: int, title: str, test: str, verdict: str, statement: str, comparisons: list[dict],
           **extra) -> dict:
    return {"claim": number, "title": title, "test": test, "verdict": verdict, "statement": statement,
            "comparisons": comparisons, **extra}


def not_tested(number: int, title: str, missing: str) -> dict:
    return _claim(number, title, "-", NOT_TESTED, f"the grid has no {missing}", [])


# ------------------------------------------------------------------------------------------------ claim 1
def _no_interval(error: StatisticsError) -> str:
    if "NaN" in str(error):  # feature_reuse refused a resample: the share has no value where WT = RI
        return "none: undefined on some resamples, where WT = RI (no gain to share out)"
    return f"none: {error}"


def reuse_share(wt: Mapping, st: Mapping, ri: Mapping, n_resamples: int = 2000) -> dict:
    """Feature-reuse share ``(WT - ST) / (WT - RI)`` (:func:`medtl3d.analysis.predictions.feature_reuse`) of the
    mean scores, with its bootstrap interval over the runs all three arms have (resampled together)."""
    runs = sorted(set(wt) & set(st) & set(ri))
    table = np.array([[wt[k], st[k], ri[k]] for k in runs], dtype=float).reshape(-1, 3)

    def share(rows: np.ndarray) -> float:
        try:
            return feature_reuse(*rows.mean(axis=0))["feature_reuse"]
        except AnalysisError:
            return math.nan

    estimate = share(table) if len(table) else math.nan
    try:
        interval = bootstrap_ci(share, None, table, level=LEVEL, n_resamples=n_resamples)
    except StatisticsError as err:
        return {"estimate": estimate, "low": None, "high": None, "runs": len(runs), "method": _no_interval(err)}
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high, "runs": len(runs),
            "method": f"{interval.method} over runs"}


def reuse_share_on_cases(folders: Mapping[str, Sequence[str]] | None, n_resamples: int = 2000) -> dict | None:
    """The feature-reuse share of the mean test AUROC over each arm's runs, with its bootstrap interval over test
    cases (stratified by class; every run of every arm scored on the same resampled cases). Binary tasks with
    evaluated WT, ST and RI runs only (None otherwise)."""
    arms = ("full", "stats", "random")
    if not folders or not all(folders.get(arm) for arm in arms):
        return None
    try:
        runs = [[load_run(folder) for folder in folders[arm]] for arm in arms]
        if runs[0][0].task != "binary":
            return None
        ids = sorted(runs[0][0].rows)
        if any(sorted(run.rows) != ids for arm in runs for run in arm):
            raise EvaluationError("the arms' runs were evaluated on different test cases")
        arrays = [binary_arrays([run.rows[i] for i in ids], str(run.folder)) for arm in runs for run in arm]
    except Medtl3dError as err:
        return {"estimate": None, "low": None, "high": None, "runs": 0, "method": f"none: {err}"}
    labels = arrays[0][0]
    table = np.stack([scores for _, scores in arrays], axis=1)
    bounds = np.cumsum([0] + [len(arm) for arm in runs])

    def share(y: np.ndarray, columns: np.ndarray) -> float:
        means = [np.mean([auroc(y, columns[:, j]) for j in range(a, b)]) for a, b in zip(bounds, bounds[1:])]
        try:
            return feature_reuse(*means)["feature_reuse"]
        except AnalysisError:
            return math.nan

    try:
        interval = bootstrap_ci(share, labels, table, level=LEVEL, n_resamples=n_resamples)
    except StatisticsError as err:
        return {"estimate": share(labels, table), "low": None, "high": None, "runs": len(runs[0]),
                "method": _no_interval(err)}
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high, "runs": len(runs[0]),
            "cases": len(ids), "method": f"test AUROC, {interval.method} over cases"}


def claim_transfer(records: Mapping[str, Sequence[Mapping]], key_metric: str, margin: float, n_train: int,
                   n_test: int, folders: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Claim 1: weight transfer beats random init (WT vs RI); statistics transfer (ST) against both, and the
    feature-reuse share."""
    title = "transfer vs random init; statistics transfer (Mean-Var) vs both"
    if not records.get("random"):
        return not_tested(1, title, "RI arm (add 'random' to the study's weights)")
    wt, ri = (run_scores(records[label], key_metric) for label in ("full", "random"))
    main = paired_ttest(wt, ri, n_train, n_test)
    verdict = superiority(main, margin)
    comparisons = [comparison("WT - RI", main, verdict),
                   *on_test_cases("WT - RI", folders, "full", "random", margin, superior=True)]
    extra: dict = {"smallest_detectable": smallest_detectable(main)}
    if records.get("stats"):
        st = run_scores(records["stats"], key_metric)
        for what, a, b, labels in (("WT - ST", wt, st, ("full", "stats")), ("ST - RI", st, ri, ("stats", "random"))):
            test = paired_ttest(a, b, n_train, n_test)
            comparisons += [comparison(what, test, superiority(test, margin)),
                            *on_test_cases(what, folders, *labels, margin, superior=True)]
        extra["feature_reuse"] = reuse_share(wt, st, ri)
        on_cases = reuse_share_on_cases(folders)
        if on_cases is not None:
            extra["feature_reuse_test_cases"] = on_cases
    effect = "-" if main is None else f"{main.mean_difference:+.4f} [{main.low:+.4f}, {main.high:+.4f}]"
    statement = f"WT - RI validation {key_metric}: {effect} ({verdict}; superiority needs the interval above 0, " \
                f"a gain under the margin {margin:g} contradicts it)"
    return _claim(1, title, TTEST, verdict, statement, comparisons, **extra)


# ------------------------------------------------------------------------------------------------ claims 2, 3
def annotate_rows(rows: list[dict], records: Mapping[str, Sequence[Mapping]], key_metric: str, margin: float,
                  n_train: int, n_test: int) -> dict[str, str]:
    """The search's intervals and verdicts against FTL on every row; the controls are compared with FTL too but
    never picked. Returns ``{strategy: cheapest non-inferior pretrained cut}``."""
    controls = [r for r in rows if r["control"] or r["label"] == "full"]
    annotate(controls, records, key_metric, margin=margin, reference="full", n_train=n_train, n_test=n_test,
             strategies=[])
    pretrained = [r for r in rows if not r["control"]]
    strategies = sorted({r["strategy"] for r in pretrained if r["cut"] is not None})
    return annotate(pretrained, records, key_metric, margin=margin, reference="full", n_train=n_train,
                    n_test=n_test, strategies=strategies)


def _versus_ftl(row: Mapping) -> dict:
    versus = row.get("vs_reference") or {}
    return {"comparison": f"{row['name']} - WT", "difference": versus.get("difference"), "low": versus.get("low"),
            "high": versus.get("high"), "runs": row["n"], "verdict": versus.get("verdict", INCONCLUSIVE),
            "method": VALIDATION}


def _noninferior_claim(rows: Sequence[Mapping], picks: Mapping[str, str], strategy: str) -> tuple[str, dict | None]:
    """(verdict, pick row) of "some cut of ``strategy`` is non-inferior to FTL" (the search never picks a cut whose
    interval has zero width)."""
    mine = [r for r in rows if r["strategy"] == strategy and not r["control"] and r["cut"] is not None]
    if strategy in picks:
        return SUPPORTED, next(r for r in mine if r["label"] == picks[strategy])
    inferior = all((r.get("vs_reference") or {}).get("verdict") == "inferior" for r in mine)
    return (CONTRADICTED if mine and inferior else INCONCLUSIVE), None


def _zero_width_note(rows: Sequence[Mapping], strategy: str) -> str:
    """Which cuts of ``strategy`` gave the same difference to FTL in every run (no verdict: :func:`informative`)."""
    names = [r["name"] for r in rows if r["strategy"] == strategy and not r["control"] and r.get("vs_reference")
             and r["vs_reference"].get("low") is not None
             and not informative(r["vs_reference"]["low"], r["vs_reference"]["high"])]
    return f"; {', '.join(names)}: the same difference to FTL in every run (an interval of zero width), too few " \
           "validation cases to tell" if names else ""


def _savings(row: Mapping) -> dict:
    return {f"{name}_saved": (None if row.get(f"{name}_ratio") is None else 1.0 - row[f"{name}_ratio"])
            for name in ("params", "macs", "latency")}


def claim_truncation(rows: Sequence[Mapping], picks: Mapping[str, str], records: Mapping[str, Sequence[Mapping]],
                     key_metric: str, margin: float, n_train: int, n_test: int,
                     folders: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Claim 2: a truncated network (the cheapest cut non-inferior to FTL) matches FTL at a lower cost; its
    random-init control of the same architecture tells what the pretrained features add at that size."""
    title = "truncation: the cheapest cut non-inferior to FTL, and what it saves"
    if not any(r["strategy"] == "truncate" for r in rows):
        return not_tested(2, title, "truncate arm")
    verdict, pick = _noninferior_claim(rows, picks, "truncate")
    comparisons = [_versus_ftl(r) for r in rows if r["strategy"] == "truncate"]
    extra: dict = {"pick": None}
    if pick is None:
        statement = (f"no truncated network is non-inferior to FTL at margin {margin:g} {key_metric} ({verdict})"
                     + _zero_width_note(rows, "truncate"))
    else:
        extra = {"pick": pick["label"], **_savings(pick)}
        statement = (f"{pick['name']} is non-inferior to FTL at margin {margin:g} {key_metric}, saving "
                     + ", ".join(f"{extra[f'{n}_saved']:.0%} {n}" for n in ("params", "macs", "latency")
                                 if extra[f"{n}_saved"] is not None))
        comparisons += on_test_cases(f"{pick['name']} - WT", folders, pick["label"], "full", margin, superior=False)
        control = f"RI-{pick['label']}"
        if records.get(control):
            test = paired_ttest(run_scores(records[pick["label"]], key_metric),
                                run_scores(records[control], key_metric), n_train, n_test)
            what = f"{pick['name']} - its RI control"
            comparisons += [comparison(what, test, superiority(test, margin)),
                            *on_test_cases(what, folders, pick["label"], control, margin, superior=True)]
    return _claim(2, title, "non-inferiority to FTL (CONSORT) on the " + TTEST, verdict, statement, comparisons,
                  **extra)


def claim_budget(rows: Sequence[Mapping], picks: Mapping[str, str], key_metric: str, margin: float,
                 folders: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Claim 3: TransFusion (slimmed top) and LWFT each match FTL (a non-inferior cut) at the same epochs."""
    title = "TransFusion and LWFT against FTL at the same budget"
    tested = [s for s in ("transfusion", "lwft") if any(r["strategy"] == s for r in rows)]
    if not tested:
        return not_tested(3, title, "transfusion or lwft arm")
    verdicts = {}
    statements = []
    for strategy in tested:
        verdicts[strategy], pick = _noninferior_claim(rows, picks, strategy)
        found = "no non-inferior cut" if pick is None else f"{pick['name']} non-inferior"
        statements.append(f"{strategy}: {found} ({verdicts[strategy]}){_zero_width_note(rows, strategy)}")
    values = set(verdicts.values())
    verdict = SUPPORTED if values == {SUPPORTED} else CONTRADICTED if CONTRADICTED in values else INCONCLUSIVE
    comparisons = [_versus_ftl(r) for r in rows if r["strategy"] in tested]
    for strategy in tested:
        if picks.get(strategy):
            pick = next(r for r in rows if r["label"] == picks[strategy])
            comparisons += on_test_cases(f"{pick['name']} - WT", folders, pick["label"], "full", margin,
                                         superior=False)
    return _claim(3, title, "non-inferiority to FTL (CONSORT) on the " + TTEST, verdict,
                  "; ".join(statements) + f"; margin {margin:g} {key_metric}, every arm trained the same epochs",
                  comparisons, picks={s: picks.get(s) for s in tested}, verdicts=verdicts)


# ------------------------------------------------------------------------------------------------ claim 4
def claim_representation(cka: Sequence[Mapping], n_train: int, n_test: int, threshold: float) -> dict:
    """Claim 4: pretrained networks stay closer to their initial representations than random-init ones (linear
    CKA of initial vs final model by depth, paired by fold and seed), and the depth where WT and RI end apart
    (the first cut point whose WT-final vs RI-final CKA, averaged over runs, falls below ``threshold``).

    ``cka``: one row per (fold, seed) with ``depths`` and the per-depth lists ``wt``, ``ri`` (initial vs final)
    and ``wt_vs_ri`` (the two final models)."""
    title = "representation change: CKA of initial vs final weights by depth, WT vs RI"
    if not cka:
        return not_tested(4, title, "WT and RI runs with saved models")
    depths = list(cka[0]["depths"])
    mean = {k: np.mean([row[k] for row in cka], axis=0).tolist() for k in ("wt", "ri", "wt_vs_ri")}
    a = {(r["fold"], r["seed"]): float(np.mean(r["wt"])) for r in cka}
    b = {(r["fold"], r["seed"]): float(np.mean(r["ri"])) for r in cka}
    test = paired_ttest(a, b, n_train, n_test)
    verdict = superiority(test, 0.0)
    below = [d for d, value in zip(depths, mean["wt_vs_ri"]) if value < threshold]
    divergence = below[0] if below else None
    by_depth = [{"depth": d, "wt_initial_final": w, "ri_initial_final": r, "wt_vs_ri_final": x}
                for d, w, r, x in zip(depths, mean["wt"], mean["ri"], mean["wt_vs_ri"])]
    where = f"WT and RI diverge at {divergence} (CKA < {threshold:g})" if divergence else \
        f"WT and RI stay above CKA {threshold:g} at every depth"
    return _claim(4, title, "linear CKA (pooled features) on test cases; mean over depths " + TTEST, verdict,
                  f"mean CKA(initial, final) WT - RI: {'-' if test is None else f'{test.mean_difference:+.3f}'} "
                  f"({verdict}); {where}", [comparison("CKA(initial, final): WT - RI", test, verdict,
                                                     "CKA on test cases; " + TTEST)],
                  by_depth=by_depth, divergence_depth=divergence, divergence_threshold=threshold)


# ------------------------------------------------------------------------------------------------ claim 5
def epochs_to_fraction(history: Sequence[Mapping], key_metric: str, fraction: float) -> int | None:
    """The first epoch whose validation ``key_metric`` reaches ``fraction`` of the final one (None when the
    history has no finite positive final value)."""
    points = [(row["epoch"], row.get(f"val_{key_metric}")) for row in history]
    points = [(e, v) for e, v in points if v is not None and math.isfinite(v)]
    if not points or points[-1][1] <= 0:
        return None
    target = fraction * points[-1][1]
    return next(e for e, v in points if v >= target)


def claim_convergence(records: Mapping[str, Sequence[Mapping]], key_metric: str, fraction: float, n_train: int,
                      n_test: int) -> dict:
    """Claim 5: pretrained networks converge faster: epochs to ``fraction`` of the final validation score, RI -
    WT (positive: WT faster)."""
    title = f"convergence: epochs to {fraction:.0%} of the final validation score, WT vs RI"
    if not records.get("random"):
        return not_tested(5, title, "RI arm")
    epochs = {label: {(r["fold"], r["seed"]): epochs_to_fraction(r["history"], key_metric, fraction)
                      for r in records[label]} for label in ("full", "random")}
    wt, ri = ({k: math.nan if v is None else float(v) for k, v in epochs[label].items()}
              for label in ("full", "random"))
    test = paired_ttest(ri, wt, n_train, n_test)
    verdict = superiority(test, 0.0)
    finite = lambda d: [v for v in d.values() if math.isfinite(v)]  # noqa: E731
    return _claim(5, title, TTEST, verdict,
                  f"mean epochs WT {np.mean(finite(wt)) if finite(wt) else math.nan:.2f}, RI "
                  f"{np.mean(finite(ri)) if finite(ri) else math.nan:.2f} ({verdict})",
                  [comparison("epochs RI - WT", test, verdict)],
                  epochs={"WT": {f"fold{f}/seed{s}": v for (f, s), v in epochs["full"].items()},
                          "RI": {f"fold{f}/seed{s}": v for (f, s), v in epochs["random"].items()}})
