"""Study-level evaluation and the threshold component: series rows aggregated to studies by hand, which study each
evaluated series belongs to, the threshold chosen on validation rows of the level reported (or fixed), splits that
keep a study's series together, and CTPA phantoms with several series per study (DICOM StudyInstanceUID found by
case discovery); end to end, the CTPA bundle's study-level report and the threshold swapped on the command
line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from monai.bundle import run
from sklearn.metrics import roc_auc_score

from medtl3d.cli import main
from medtl3d.data.datalists import case_group, load_datalist
from medtl3d.data.io import find_cases
from medtl3d.data.phantoms import generate_ctpa
from medtl3d.data.splits import holdout_split, kfold_split
from medtl3d.errors import DataError, EvaluationError
from medtl3d.evaluation import (EvaluationReport, FixedThreshold, StudyLevel, ValidationThreshold,
                                aggregate_studies)
from medtl3d.workflows import load_items, split_items

SERIES = [  # (series, study, label, probability)
    ("s1", "A", 0, 0.2), ("s2", "A", 1, 0.7), ("s3", "B", 0, 0.1), ("s4", "C", 0, 0.4), ("s5", "B", 0, 0.3),
    ("s6", "C", 0, 0.6),
]


def series_rows(series=SERIES) -> list[dict]:
    return [{"id": s, "label": y, "probabilities": [p]} for s, _, y, p in series]


STUDIES = {s: study for s, study, _, _ in SERIES}


def test_aggregate_studies_by_hand():
    """A: any positive -> 1, max(0.2, 0.7) = 0.7, mean 0.45; B: 0, max 0.3, mean 0.2; C: 0, max 0.6, mean 0.5.
    Studies in order of first appearance."""
    by_max = aggregate_studies(series_rows(), STUDIES, "max")
    assert [(r["id"], r["label"], r["series"]) for r in by_max] == [("A", 1, 2), ("B", 0, 2), ("C", 0, 2)]
    assert [r["probabilities"][0] for r in by_max] == pytest.approx([0.7, 0.3, 0.6])
    by_mean = aggregate_studies(series_rows(), STUDIES, "mean")
    assert [r["probabilities"][0] for r in by_mean] == pytest.approx([0.45, 0.2, 0.5])
    assert [r["label"] for r in by_mean] == [1, 0, 0]  # any positive, whatever the probabilities' aggregation
    # multi-label: per finding, any positive and the maximum
    rows = [{"id": "s1", "label": [1, 0], "probabilities": [0.9, 0.1]},
            {"id": "s2", "label": [0, 0], "probabilities": [0.2, 0.3]}]
    study = aggregate_studies(rows, {"s1": "A", "s2": "A"})
    assert study[0]["label"] == [1, 0] and study[0]["probabilities"] == pytest.approx([0.9, 0.3])


def test_aggregate_studies_refuses_a_series_without_study():
    with pytest.raises(EvaluationError, match=r"1 of 6 series have no study \(e.g. \['s6'\]\)"):
        aggregate_studies(series_rows(), {k: v for k, v in STUDIES.items() if k != "s6"})


def test_study_level_reads_each_series_study_from_the_items():
    test = [{"id": s, "image": f"/x/{s}", "study": study} for s, study, _, _ in SERIES]
    level = StudyLevel("study", test, test[:2], aggregation="mean")
    assert level.active and level.test_studies == STUDIES
    assert [r["probabilities"][0] for r in level.test(series_rows())] == pytest.approx([0.45, 0.2, 0.5])
    assert [r["id"] for r in level.validation(series_rows()[:2])] == ["A"]
    assert not StudyLevel("study", [{"id": "s1", "image": "/x/s1"}]).active  # no study named: series level only
    with pytest.raises(EvaluationError, match=r"test_data: item /x/s2 has no 'study' while 1 of 2 items do"):
        StudyLevel("study", [test[0], {"id": "s2", "image": "/x/s2"}])
    with pytest.raises(EvaluationError, match="series s1 is given two studies"):
        StudyLevel("study", [test[0], {**test[0], "study": "Z"}])


class _Validator:
    """An evaluator stand-in: ``run`` fills its case collector's rows (and counts the runs)."""

    def __init__(self, rows):
        self.rows, self.runs = [], 0
        self._rows = rows

    def run(self):
        self.runs += 1
        self.rows = self._rows


def test_validation_threshold_runs_the_validator_once_and_chooses_per_level():
    """Series: Youden's J is highest at 0.7 (sensitivity 1, specificity 1); studies A (0.7, positive), B (0.3),
    C (0.6): again 0.7. With target sensitivity 1 on studies: the highest threshold reaching it, 0.7."""
    validator = _Validator(series_rows())
    threshold = ValidationThreshold(validator, validator)
    series = threshold()
    assert series.threshold == pytest.approx(0.7) and series.rule == "youden on 6 validation cases"
    studies = threshold(lambda rows: aggregate_studies(rows, STUDIES))
    assert studies.threshold == pytest.approx(0.7) and studies.rule == "youden on 3 validation cases"
    assert validator.runs == 1
    rows = series_rows([("s1", "A", 1, 0.2), ("s2", "B", 1, 0.5), ("s3", "B", 0, 0.9), ("s4", "C", 0, 0.3)])
    validator = _Validator(rows)  # series: a positive at 0.2 needs threshold 0.2; studies A 0.2, B 0.9, C 0.3
    chosen = ValidationThreshold(validator, validator, target_sensitivity=1.0)(
        lambda r: aggregate_studies(r, {"s1": "A", "s2": "B", "s3": "B", "s4": "C"}))
    assert chosen.threshold == pytest.approx(0.2) and chosen.sensitivity == 1.0


def test_fixed_threshold_is_the_same_at_every_level_and_says_it_was_not_chosen_on_data():
    fixed = FixedThreshold(0.3)
    assert fixed().threshold == fixed(lambda rows: []).threshold == 0.3
    assert fixed().rule == "fixed 0.3 (set in the config, not chosen on data)" and math.isnan(fixed().sensitivity)
    for bad in (1.5, "0.3", True):
        with pytest.raises(EvaluationError, match="threshold value="):
            FixedThreshold(bad)
    with pytest.raises(EvaluationError, match=r"target_sensitivity=0: expected a number in \(0, 1\]"):
        ValidationThreshold(None, None, target_sensitivity=0)


def _studies_of(items):
    return {i["study"] for i in items}


def test_splits_keep_a_study_whole_where_no_patient_is_given():
    """24 studies of 1-3 series, no patient field: the study is the group, so no study is in two parts."""
    items = [{"image": f"/d/st{k:02d}_s{j}.nii.gz", "label": int(k % 3 == 0), "study": f"ST{k:02d}"}
             for k in range(24) for j in range(1 + k % 3)]
    assert case_group(items[0]) == "ST00" and case_group(items[0], study_key=None) == "st00_s0"
    assert case_group({**items[0], "patient": "P7"}) == "P7"  # a patient holds the study: the coarser group wins
    for fold in range(4):
        train, val = kfold_split(items, 4, fold, seed=1)
        assert _studies_of(train).isdisjoint(_studies_of(val)) and len(train) + len(val) == len(items)
    rest, test = holdout_split(items, 0.25, seed=2)
    assert _studies_of(rest).isdisjoint(_studies_of(test))


def test_datalist_study_is_the_group_without_patient(tmp_path):
    (tmp_path / "list.csv").write_text("image,label,study\na.png,1,S1\nb.png,0,S1\nc.png,0,S2\nd.png,1,\n")
    items = load_datalist(tmp_path / "list.csv", check_files=False)
    assert [i["patient"] for i in items] == ["S1", "S1", "S2", "d"]
    assert [i["patient"] for i in load_datalist(tmp_path / "list.csv", check_files=False, study_key=None)] == \
        ["a", "b", "c", "d"]


def test_ctpa_phantom_with_several_series_per_study(tmp_path):
    """5 series in studies of 2: S0000 (2 series), S0001 (2), S0002 (1); one patient per study, one
    StudyInstanceUID per study in the DICOM files, found by case discovery."""
    datalist = generate_ctpa(tmp_path, 5, shape=(8, 16, 16), fmt="dicom", seed=1, series_per_study=2)
    items = load_datalist(datalist)
    assert [i["study"] for i in items] == ["S0000", "S0000", "S0001", "S0001", "S0002"]
    for study in ("S0000", "S0001"):
        assert len({i["patient"] for i in items if i["study"] == study}) == 1
    assert (tmp_path / "datalist.csv").read_text().splitlines()[0] == "image,label,patient,study,lesion"
    cases = {c.case_id: c for c in find_cases(tmp_path / "dicom")[0]}
    uids = [cases[f"ctpa_{i:04d}"].study_uid for i in range(5)]
    assert uids[0] == uids[1] != uids[2] == uids[3] != uids[4] and all(uids)
    assert len({cases[f"ctpa_{i:04d}"].series_uid for i in range(5)}) == 5
    plain = load_datalist(generate_ctpa(tmp_path / "plain", 2, shape=(8, 16, 16), seed=1))
    assert all("study" not in i for i in plain)  # the default writes what it always wrote
    with pytest.raises(DataError, match="series_per_study must be a positive integer, got 0"):
        generate_ctpa(tmp_path / "bad", 2, series_per_study=0)


BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ctpa_pe_classification" / "configs"
CTPA = {"backbone": "cbr_tiny", "weights": "null", "phantom_cases": 48, "phantom_shape": [16, 32, 32],
        "num_slices": 16, "image_size": 32, "batch_size": 8, "n_folds": 2, "epochs": 1, "device": "cpu",
        "amp": False, "tensorboard": False, "phantom_series_per_study": 2, "num_threads": 1,
        "evaluate#handlers#1#n_resamples": 50}


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [{**row, "label": json.loads(row["label"]), "probabilities": json.loads(row["probabilities"])}
                for row in csv.DictReader(handle)]


@pytest.mark.slow  # trains one CTPA epoch and evaluates four times: about 70 s on the shared 2-core machine
def test_ctpa_bundle_reports_per_study_and_swaps_its_threshold(tmp_path, capsys):
    """Phantom studies of two series: eval/study holds the full report of the series predictions aggregated by
    hand (max, any positive), its threshold chosen on the validation studies; `medtl3d compare` reads it (48 series:
    3 positive and 2 negative test studies, as DeLong needs at least 2 of each); the
    threshold component is swapped for a fixed value and for a target-sensitivity rule on the command line."""
    common = {"output_dir": str(tmp_path), "ckpt_path": str(tmp_path / "m.pt"), **CTPA}
    train, evaluate = str(BUNDLE / "train.yaml"), [str(BUNDLE / "train.yaml"), str(BUNDLE / "evaluate.yaml")]
    run(config_file=train, **{k: v for k, v in common.items() if not k.startswith("evaluate#")})
    run(config_file=evaluate, **common)
    eval_dir, study_dir = tmp_path / "eval", tmp_path / "eval" / "study"
    items = load_items(str(tmp_path / "phantoms" / "datalist.json"), task="binary", num_classes=1)
    split = split_items(items, n_folds=2, fold=0, seed=0, test_fraction=0.2)
    study_of = {item["image"]: item["study"] for item in items}
    series = _csv(eval_dir / "predictions.csv")
    expected: dict[str, dict] = {}
    for row in series:
        study = expected.setdefault(study_of[row["id"]], {"label": 0, "p": 0.0, "series": 0})
        study["label"] = max(study["label"], row["label"])
        study["p"] = max(study["p"], row["probabilities"][0])
        study["series"] += 1
    studies = {row["id"]: row for row in _csv(study_dir / "predictions.csv")}
    assert set(studies) == set(expected) and len(studies) < len(series)
    for name, hand in expected.items():
        assert studies[name]["label"] == hand["label"] and int(studies[name]["series"]) == hand["series"]
        assert studies[name]["probabilities"][0] == pytest.approx(hand["p"])
    report = json.loads((study_dir / "evaluation.json").read_text())
    y = [hand["label"] for hand in expected.values()]
    auroc = next(m for m in report["metrics"] if m["metric"] == "auroc")
    assert auroc["estimate"] == pytest.approx(roc_auc_score(y, [hand["p"] for hand in expected.values()]))
    val_studies = {item["study"] for item in split["val"]}
    assert report["threshold"]["rule"] == f"youden on {len(val_studies)} validation cases"
    assert report["metadata"]["level"] == "study" and report["cases"] == len(expected)
    assert all((study_dir / f).is_file() for f in report["files"].values()) and "roc_png" in report["files"]
    series_report = json.loads((eval_dir / "evaluation.json").read_text())
    assert series_report["metadata"]["study_level"]["studies"] == len(expected)
    assert series_report["threshold"]["rule"] == f"youden on {len(split['val'])} validation cases"
    assert main(["compare", str(study_dir), str(study_dir), "--output", str(tmp_path / "cmp"),
                 "--resamples", "50"]) == 0
    assert f"binary, {len(expected)} test cases" in capsys.readouterr().out

    run(config_file=evaluate, **common, **{"evaluate#threshold": 0.3})  # a fixed value: no validation run
    for folder in (eval_dir, study_dir):
        fixed = json.loads((folder / "evaluation.json").read_text())["threshold"]
        assert fixed["threshold"] == 0.3 and fixed["rule"].startswith("fixed 0.3 ")
    run(config_file=evaluate, **common, **{"evaluate#threshold#target_sensitivity": 1.0})
    for folder, cases in ((eval_dir, len(split["val"])), (study_dir, len(val_studies))):
        rule = json.loads((folder / "evaluation.json").read_text())["threshold"]
        assert rule["rule"] == f"sensitivity >= 1 on {cases} validation cases" and rule["sensitivity"] == 1.0
    run(config_file=evaluate, **common, **{"evaluate#study#_disabled_": True})  # no study level: nor its old report
    assert not study_dir.exists() and "study_level" not in json.loads((eval_dir / "evaluation.json").read_text())[
        "metadata"]


def _engine(rows, items):
    """What the report handler reads from MONAI's evaluator: the metrics and the evaluated dataset."""
    metrics = {"auroc": 0.5, "auprc": 0.5, "accuracy": 0.5, "f1": 0.5, "kappa": 0.0}
    return SimpleNamespace(state=SimpleNamespace(metrics=metrics), data_loader=SimpleNamespace(dataset=items))


def test_report_handler_writes_the_study_level_and_names_it_when_it_cannot_choose(tmp_path):
    """Six series in three studies at a fixed threshold: eval/study holds three study rows, recorded in the series
    report; validation studies of one class cannot choose a threshold, and the error says which level and what to
    do."""
    items = [{"id": s, "image": f"/x/{s}", "label": y, "study": study} for s, study, y, _ in SERIES]
    cases = SimpleNamespace(rows=series_rows())
    report = EvaluationReport(tmp_path, cases, task="binary", checkpoint="model.ts", threshold=0.5,
                              study=StudyLevel("study", items, items), n_resamples=20)
    report(_engine(cases.rows, items))
    study = json.loads((tmp_path / "study" / "evaluation.json").read_text())
    assert study["cases"] == 3 and study["threshold"]["threshold"] == 0.5 and study["metadata"]["series"] == 6
    assert [row["id"] for row in _csv(tmp_path / "study" / "predictions.csv")] == ["A", "B", "C"]
    assert json.loads((tmp_path / "evaluation.json").read_text())["metadata"]["study_level"]["studies"] == 3
    # validation series of both classes, but one positive series in every study: studies of one class
    validator = _Validator([{**row, "label": int(row["id"] in ("s2", "s3", "s6"))} for row in series_rows()])
    report = EvaluationReport(tmp_path, cases, task="binary", checkpoint="model.ts",
                              threshold=ValidationThreshold(validator, validator),
                              study=StudyLevel("study", items, items), n_resamples=20)
    with pytest.raises(EvaluationError, match=r"study level \(study_key='study'\): cannot choose a threshold on "
                                              r"the validation data: .*--evaluate#study#_disabled_ true"):
        report(_engine(cases.rows, items))
    with pytest.raises(EvaluationError, match="study_key='study': a study level needs a task where"):
        EvaluationReport(tmp_path, cases, task="multiclass", checkpoint="m.ts", study=StudyLevel("study", items))
