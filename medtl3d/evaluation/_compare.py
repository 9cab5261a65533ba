"""Paired comparison of two evaluated runs on the same test cases: ``medtl3d compare RUN_A RUN_B``.

RUN_A is the candidate, RUN_B the reference; every difference is ``A - B``. One run per arm: DeLong's paired test
for AUROC, the paired stratified bootstrap for every metric (each run at its own threshold, chosen on its own
validation data), McNemar's test of the two runs' correct / wrong decisions, and a non-inferiority verdict on the
primary metric (AUROC's DeLong interval; Dice's bootstrap interval) with a margin set beforehand (default 0.02
AUROC, 0.01 Dice). Several runs per arm (folds x seeds): runs are paired by fold (or, where no fold was recorded,
by the content hash of their validation data) and training seed, and each metric's per-pair differences go through
the corrected resampled t-test of Nadeau & Bengio, whose interval gives the verdict.

Multi-class and multi-label runs: the macro AUROC difference with its paired bootstrap interval (stratified by class
for multi-class; plain for multi-label, whose label sets are too many strata), which carries the verdict at the AUROC
margin; each class's one-vs-rest AUROC by DeLong's paired test, its p-values Holm-adjusted over the classes (the
family-wise error rate; the per-class intervals stay unadjusted at the stated level); multi-class also the arg-max
accuracy difference and McNemar's test of the arg-max decisions. Multi-label has no decision threshold chosen on
validation data, so no McNemar. Across folds x seeds the same metrics go through the corrected resampled t-test, the
per-class p-values again Holm-adjusted.

An interval of zero width: one run per arm, the case-level interval is an exact measurement (two runs that score
every case alike, e.g. a run compared with itself, are "no difference", so non-inferior); several runs, it means
every pair gave the same difference, no spread to tell noise from an effect, so the verdict is inconclusive (the
search's and the study's rule, :func:`medtl3d.stats.informative`), even for runs compared with themselves.

Runs evaluated on different cases (or with different labels) are refused: a paired test needs the same cases. HD95
is compared only between runs that give it in one unit (``hd95_unit``: mm, or px where the masks record no spacing).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import EvaluationError
from ..provenance import sha256_file
from ..stats import (DEFAULT_MARGINS, StatisticsError, auroc, average_precision, corrected_resampled_ttest,
                     delong_paired_test, holm_adjust, macro_auroc, mcnemar_test, noninferiority,
                     paired_bootstrap_diff, roc_curve)
from ._cases import SEGMENTATION_COLUMNS, THRESHOLD_METRICS, _at_threshold, binary_arrays, multi_arrays

PRIMARY = {"binary": "auroc", "multiclass": "auroc (macro)", "multilabel": "auroc (macro)", "segmentation": "dice"}
LOWER_IS_BETTER = {"hd95", "ece"}


@dataclass
class EvaluatedRun:
    """One ``evaluate`` output folder: its ``evaluation.json`` and per-case predictions, by case id."""

    folder: Path
    document: dict
    rows: dict[str, dict]

    @property
    def task(self) -> str:
        return self.document["task"]

    @property
    def key(self) -> tuple:
        """What pairs it with a run of the other arm: (fold or validation-data hash, training seed)."""
        meta = self.document["metadata"]
        return (meta.get("fold") if meta.get("fold") is not None else meta.get("val_sha256"), meta.get("seed"))


def _cell(column: str, text: str):
    if column in ("label", "probabilities"):
        return json.loads(text)
    if column in SEGMENTATION_COLUMNS:
        return float(text) if text else math.nan
    return text


def load_run(folder: str | Path) -> EvaluatedRun:
    """The evaluation in ``folder`` (or ``folder/eval``), its predictions checked against the recorded SHA-256."""
    folder = Path(folder)
    path = next((p for p in (folder / "evaluation.json", folder / "eval" / "evaluation.json") if p.is_file()), None)
    if path is None:
        raise EvaluationError(f"{folder}: no evaluation.json (run the bundle's evaluate.yaml first)")
    document = json.loads(path.read_text())
    predictions = path.parent / document["metadata"]["predictions"]
    if not predictions.is_file() or sha256_file(predictions) != document["metadata"]["predictions_sha256"]:
        raise EvaluationError(f"{predictions}: missing or changed since {path} was written (SHA-256 differs)")
    with open(predictions, newline="", encoding="utf-8") as handle:
        rows = [{k: _cell(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]
    if not rows or any(not row.get("id") for row in rows) or len({row["id"] for row in rows}) != len(rows):
        raise EvaluationError(f"{predictions}: every case needs one unique id to be paired")
    return EvaluatedRun(path.parent, document, {row["id"]: row for row in rows})


def find_runs(path: str | Path, *, study: bool = False) -> list[EvaluatedRun]:
    """One run (``path`` holds ``evaluation.json`` or ``eval/evaluation.json``) or every evaluation below it: the
    case-level (series) ones, or with ``study`` the study-level ones (``eval/study``, CTPA), never both in one arm."""
    path = Path(path)
    if study and (path / "eval" / "study" / "evaluation.json").is_file():
        return [load_run(path / "eval" / "study")]
    if (path / "evaluation.json").is_file() or (path / "eval" / "evaluation.json").is_file():
        return [load_run(path)]
    found = sorted(path.rglob("evaluation.json")) if path.is_dir() else []
    runs = [run for run in map(load_run, (p.parent for p in found))
            if (run.document["metadata"].get("level") == "study") == study]
    if not runs:
        raise EvaluationError(f"{path}: no {'study-level ' if study else ''}evaluation.json in it or below it")
    return runs


def _same_cases(a: EvaluatedRun, b: EvaluatedRun) -> list[str]:
    """The shared case ids in a fixed order; refuses different case sets or labels."""
    only_a, only_b = sorted(set(a.rows) - set(b.rows)), sorted(set(b.rows) - set(a.rows))
    if only_a or only_b:
        raise EvaluationError(f"{a.folder} and {b.folder} were evaluated on different cases: {len(only_a)} only in "
                              f"the first (e.g. {only_a[:2]}), {len(only_b)} only in the second (e.g. {only_b[:2]})")
    ids = sorted(a.rows)
    if a.task != "segmentation":  # multi-class / multi-label labels are JSON lists, compared as such
        differ = [i for i in ids if a.rows[i]["label"] != b.rows[i]["label"]]
        if differ:
            raise EvaluationError(f"{a.folder} and {b.folder} label {len(differ)} cases differently "
                                  f"(e.g. {differ[:2]})")
    return ids


def _class_flags(y: np.ndarray, c: int) -> np.ndarray:
    """Whether each case is of class / carries label ``c``: ``y`` holds class indices (N,) or 0/1 flags (N, K)."""
    return y == c if y.ndim == 1 else y[:, c].astype(bool)


@dataclass(frozen=True)
class _OneVsRest:
    """Class ``c``'s AUROC against the rest, as a metric of (labels, (N, K) scores)."""

    c: int

    def __call__(self, y, scores) -> float:
        return auroc(_class_flags(y, self.c), scores[:, self.c])


def _accuracy(y, decisions) -> float:
    return float(np.mean(y == decisions))


def _defined_classes(y: np.ndarray, classes: int) -> list[int]:
    """The classes with both positive and negative test cases: those with an AUROC."""
    return [c for c in range(classes) if 0 < _class_flags(y, c).sum() < len(y)]


def _metric_functions(task: str, y=None, scores=None) -> dict:
    """``name -> metric``; a threshold metric gets each run's 0/1 decisions at its own threshold, so it is the
    metric at 0.5 of those. Multi-class / multi-label: the macro AUROC over the classes ``y`` defines (fixed, so
    every resample and every run averages the same classes), each of them, and the arg-max accuracy (multi-class);
    ``y`` and ``scores`` (N, K) are one run's labels and probabilities."""
    if task == "segmentation":
        return {name: np.mean for name in SEGMENTATION_COLUMNS}
    if task in ("multiclass", "multilabel"):
        columns = _defined_classes(y, scores.shape[1])
        functions = {"auroc (macro)": lambda labels, scores: macro_auroc(labels, scores, columns)}
        functions.update({f"auroc [{c}]": _OneVsRest(c) for c in columns})
        if task == "multiclass":
            functions["accuracy"] = _accuracy
        return functions
    functions = {"auroc": auroc, "auprc": average_precision}
    functions.update({name: _at_threshold(name, 0.5) for name in THRESHOLD_METRICS})  # on 0/1 decisions
    return functions


def _per_class(name: str) -> bool:
    return name.startswith("auroc [")


def _arrays(run: EvaluatedRun, ids: Sequence[str]):
    rows = [run.rows[i] for i in ids]
    if run.task == "segmentation":
        return None, {name: np.array([row[name] for row in rows], dtype=float) for name in SEGMENTATION_COLUMNS}
    if run.task in ("multiclass", "multilabel"):
        y, scores = multi_arrays(rows, run.task, str(run.folder))
        return y, {"scores": scores, "decisions": scores.argmax(axis=1)}
    y, p = binary_arrays(rows, str(run.folder))
    called = (p >= run.document["threshold"]["threshold"]).astype(float)
    return y, {"scores": p, "decisions": called}


def _paired(task: str, name: str, y, arms_a: dict, arms_b: dict) -> tuple:
    """``(labels, values_a, values_b)`` that metric ``name`` compares: scores or decisions (classification), the
    per-case values of the cases where both runs define it (segmentation, labels None)."""
    if task == "segmentation":
        both = np.isfinite(arms_a[name]) & np.isfinite(arms_b[name])
        return None, arms_a[name][both], arms_b[name][both]
    source = "scores" if name.startswith(("auroc", "auprc")) else "decisions"
    return y, arms_a[source], arms_b[source]


def _holm(rows: list[dict]) -> None:
    """Holm-adjust the p-values of the per-class rows that have one, over the classes (in place)."""
    tested = [row for row in rows if _per_class(row["metric"]) and row.get("p_value") is not None]
    if len(tested) < 2:
        return
    for row, adjusted in zip(tested, holm_adjust([row["p_value"] for row in tested])):
        row.update(p_unadjusted=row["p_value"], p_value=float(adjusted),
                   method=f"{row['method']}; p Holm-adjusted over {len(tested)} classes")


def _roc_curves(y, scores_a, scores_b) -> dict:
    """Both runs' ROC points (binary), for the comparison plot to redraw from the JSON."""
    if len(np.unique(y)) < 2:
        return {}
    return {"roc": {arm: dict(zip(("fpr", "tpr"), (v.tolist() for v in roc_curve(y, s)[:2])))
                    for arm, s in (("a", scores_a), ("b", scores_b))}}


def _value(function, labels, values) -> float:
    if not len(values):
        return math.nan
    return float(function(values) if labels is None else function(labels, values))


@dataclass
class Comparison:
    """What :func:`compare_runs` found; ``rows`` has one line per metric and test."""

    task: str
    primary: str
    margin: float
    verdict: str
    verdict_basis: str
    rows: list[dict]
    runs_a: list[str]
    runs_b: list[str]
    cases: int
    mcnemar: dict | None = None
    pairs: list[dict] = field(default_factory=list)
    curves: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)


def _verdict(primary: str, rows: list[dict], margin: float, *, exact: bool) -> tuple[str, str]:
    """The non-inferiority verdict on the first interval of ``primary`` in ``rows``, and that interval's method;
    ``exact``: a zero-width interval measured the difference (see the module docstring)."""
    row = next((r for r in rows if r["metric"] == primary and r.get("low") is not None), None)
    if row is None:
        raise EvaluationError(f"{primary} has no interval on these cases, so there is no verdict: "
                              + "; ".join(r["method"] for r in rows if r["metric"] == primary))
    verdict = noninferiority(row["low"], row["high"], margin, higher_is_better=primary not in LOWER_IS_BETTER,
                             exact=exact)
    return verdict.value, row["method"]


def _delong_row(name: str, y, score_a, score_b, level: float) -> dict:
    try:
        return {"metric": name, **delong_paired_test(y, score_a, score_b, level).as_dict()}
    except StatisticsError as err:
        return {"metric": name, "method": f"DeLong paired: none: {err}"}


def _single(a: EvaluatedRun, b: EvaluatedRun, margin: float, level: float, n_resamples: int, seed: int):
    ids = _same_cases(a, b)
    task = a.task
    y, arms_a = _arrays(a, ids)
    _, arms_b = _arrays(b, ids)
    functions = _metric_functions(task, y, arms_a.get("scores"))
    rows, mcnemar, curves = [], None, {}
    if task == "binary":
        rows.append(_delong_row("auroc", y, arms_a["scores"], arms_b["scores"], level))
    for name, function in functions.items():
        labels, score_a, score_b = _paired(task, name, y, arms_a, arms_b)
        if isinstance(function, _OneVsRest):  # DeLong's paired test (Holm-adjusted below)
            c = function.c
            rows.append(_delong_row(name, _class_flags(y, c), score_a[:, c], score_b[:, c], level))
            continue
        try:
            diff = paired_bootstrap_diff(function, labels, score_a, score_b, level=level, n_resamples=n_resamples,
                                         seed=seed, stratified=np.ndim(labels) == 1)
        except StatisticsError as err:
            rows.append({"metric": name, "method": f"none: {err}"})
            continue
        rows.append({"metric": name, **diff.as_dict()})
    _holm(rows)
    if task in ("binary", "multiclass"):
        mcnemar = mcnemar_test(arms_a["decisions"] == y, arms_b["decisions"] == y).as_dict()
        mcnemar["decisions"] = "arg-max class" if task == "multiclass" else "at each run's own threshold"
    if task == "binary":
        curves = _roc_curves(y, arms_a["scores"], arms_b["scores"])
    return ids, rows, mcnemar, curves, *_verdict(PRIMARY[task], rows, margin, exact=True)


def _several(runs_a, runs_b, margin: float, level: float):
    by_key = {run.key: run for run in runs_b}
    if len(by_key) != len(runs_b) or len({run.key for run in runs_a}) != len(runs_a):
        raise EvaluationError("several runs of one arm share a fold and seed; each (fold, seed) once per arm")
    missing = [run.folder for run in runs_a if run.key not in by_key]
    if missing or len(runs_a) != len(runs_b):
        raise EvaluationError(f"the arms' runs do not pair up by (fold, seed): {len(runs_a)} vs {len(runs_b)} "
                              f"runs, unpaired e.g. {[str(m) for m in missing[:2]]}")
    task, ids = runs_a[0].task, sorted(runs_a[0].rows)
    for run in runs_a[1:] + runs_b:
        _same_cases(runs_a[0], run)
    y, arms = _arrays(runs_a[0], ids)
    functions = _metric_functions(task, y, arms.get("scores"))
    pairs = []
    for run_a in runs_a:
        run_b = by_key[run_a.key]
        y, arms_a = _arrays(run_a, ids)
        _, arms_b = _arrays(run_b, ids)
        pair = {"a": str(run_a.folder), "b": str(run_b.folder), "fold": str(run_a.key[0]), "seed": run_a.key[1]}
        for name, function in functions.items():
            labels, values_a, values_b = _paired(task, name, y, arms_a, arms_b)
            pair[name] = _value(function, labels, values_a) - _value(function, labels, values_b)
        pairs.append(pair)
    n_train = [run.document["metadata"].get("train_cases") for run in runs_a + runs_b]
    if any(n is None for n in n_train):
        raise EvaluationError("the corrected resampled t-test needs each run's training-set size (train_cases); "
                              "some evaluation.json lacks it (evaluated from a TorchScript export?)")
    rows = []
    for name in functions:
        differences = [pair[name] for pair in pairs]
        try:
            test = corrected_resampled_ttest(differences, round(float(np.mean(n_train))), len(ids), level)
        except StatisticsError as err:
            rows.append({"metric": name, "method": f"none: {err}"})
            continue
        rows.append({"metric": name, "difference": test.mean_difference, "low": test.low, "high": test.high,
                     "p_value": test.p_value, "level": level, "method": f"{test.method}, {test.runs} runs",
                     "se": test.se, "runs": test.runs})
    _holm(rows)
    return ids, rows, pairs, *_verdict(PRIMARY[task], rows, margin, exact=False)


def _hd95_unit(run: EvaluatedRun) -> str:
    """``mm`` or ``px`` (runs evaluated before the unit was recorded: px); ``mm/px`` if its cases mix them."""
    return "/".join(sorted({row.get("hd95_unit") or "px" for row in run.rows.values()}))


def _without_hd95(comparison: Comparison, units: set[str]) -> None:
    """HD95 in different units is not a difference: its rows say so, the pairs drop it (in place)."""
    reason = f"none: HD95 in {' and '.join(sorted(units))} across the runs, not comparable"
    rows = [row for row in comparison.rows if row["metric"] != "hd95"]
    comparison.rows = rows + [{"metric": "hd95", "method": reason}]
    for pair in comparison.pairs:
        pair.pop("hd95", None)


def compare_runs(arm_a: Sequence[str | Path], arm_b: Sequence[str | Path], *, margin: float | None = None,
                 level: float = 0.95, n_resamples: int = 2000, seed: int = 0, study: bool = False) -> Comparison:
    """Compare candidate arm ``arm_a`` with reference arm ``arm_b`` (folders of evaluated runs; see module doc);
    ``study``: their study-level evaluations (CTPA series aggregated to clinical studies)."""
    runs_a = [run for path in arm_a for run in find_runs(path, study=study)]
    runs_b = [run for path in arm_b for run in find_runs(path, study=study)]
    tasks = {run.task for run in runs_a + runs_b}
    if len(tasks) != 1:
        raise EvaluationError(f"the runs are of different tasks ({', '.join(sorted(tasks))}); compare like with like")
    task = tasks.pop()
    if task not in PRIMARY:
        raise EvaluationError(f"compare handles {', '.join(PRIMARY)} runs; these are {task}")
    primary = PRIMARY[task]
    margin = DEFAULT_MARGINS["dice" if task == "segmentation" else "auroc"] if margin is None else float(margin)
    names = ([str(r.folder) for r in runs_a], [str(r.folder) for r in runs_b])
    if len(runs_a) == 1 and len(runs_b) == 1:
        ids, rows, mcnemar, curves, verdict, basis = _single(runs_a[0], runs_b[0], margin, level, n_resamples, seed)
        comparison = Comparison(task, primary, margin, verdict, basis, rows, *names, len(ids), mcnemar, curves=curves)
    else:
        ids, rows, pairs, verdict, basis = _several(runs_a, runs_b, margin, level)
        comparison = Comparison(task, primary, margin, verdict, basis, rows, *names, len(ids), pairs=pairs)
    if task == "segmentation":
        units = {_hd95_unit(run) for run in runs_a + runs_b}
        if len(units) == 1:
            comparison.units = {"hd95": units.pop()}
        else:
            _without_hd95(comparison, units)
    return comparison
