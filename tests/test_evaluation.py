"""Case-level evaluation reports and ``medtl3d compare``: metrics at a validation threshold against hand counts,
intervals around their estimates, HD95 of constructed masks, the report files, and comparisons of constructed runs
(clearly non-inferior, clearly inferior, inconclusive, different case sets, several runs per arm)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score

from medtl3d.cli import main
from medtl3d.engine.metrics import segmentation_case_scores
from medtl3d.errors import EvaluationError
from medtl3d.evaluation import case_report, choose_threshold, compare_runs, write_evaluation
from medtl3d.provenance import sha256_file
from medtl3d.reporting import write_csv, write_json
from medtl3d.stats import ThresholdChoice, corrected_resampled_ttest

# 3 positives, 5 negatives; at threshold 0.5: TP 2 (0.9, 0.8), FN 1 (0.3), FP 1 (0.6), TN 4
Y = [1, 1, 1, 0, 0, 0, 0, 0]
P = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.15, 0.05]


def rows_of(y, p, ids=None) -> list[dict]:
    ids = ids or [f"case{i:03d}" for i in range(len(y))]
    return [{"id": i, "label": int(a), "probabilities": [float(b)]} for i, a, b in zip(ids, y, p)]


def by_metric(report) -> dict:
    found = {}
    for row in report.metrics:
        found.setdefault(row["metric"], []).append(row)
    return found


def test_binary_metrics_at_the_validation_threshold_by_hand():
    threshold = choose_threshold(rows_of([1, 0, 1, 0], [0.7, 0.2, 0.5, 0.4]))  # Youden: 0.5 separates them
    assert threshold.threshold == 0.5 and threshold.rule == "youden on 4 validation cases"
    report = case_report(rows_of(Y, P), "binary", threshold=threshold, n_resamples=200)
    metrics = {name: rows[0]["estimate"] for name, rows in by_metric(report).items()}
    expected = {"sensitivity": 2 / 3, "specificity": 4 / 5, "ppv": 2 / 3, "npv": 4 / 5, "accuracy": 6 / 8,
                "f1": 2 * 2 / (2 * 2 + 1 + 1), "kappa": (6 / 8 - 34 / 64) / (1 - 34 / 64)}  # p_e = (3*3 + 5*5) / 64
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(Y, np.array(P) >= 0.5))
    assert metrics["auroc"] == pytest.approx(roc_auc_score(Y, P)) == pytest.approx(14 / 15)  # 1 discordant pair
    assert metrics["auprc"] == pytest.approx(average_precision_score(Y, P))
    point = report.operating_point
    assert (point["true_positives"], point["false_positives"], point["true_negatives"],
            point["false_negatives"]) == (2, 1, 4, 1)
    assert [row["interval"] for row in by_metric(report)["auroc"]][1] == "DeLong"
    for row in report.metrics:
        if row["low"] is not None:
            assert row["low"] <= row["estimate"] + 1e-12 and row["estimate"] <= row["high"] + 1e-12, row


def test_threshold_without_validation_data_says_so():
    threshold = choose_threshold(None)
    assert threshold.threshold == 0.5 and "not chosen on data" in threshold.rule
    assert choose_threshold(rows_of([1, 1, 0, 0], [0.9, 0.4, 0.3, 0.1]), target_sensitivity=1.0).threshold == 0.4


def test_interval_of_a_wide_spread_covers_the_truth_and_narrows_with_cases():
    """Scores N(1, 1) vs N(0, 1): true AUROC Phi(1 / sqrt 2) = 0.760; the interval holds it and shrinks with n."""
    rng = np.random.default_rng(0)
    widths = []
    for n in (60, 600):
        y = np.r_[np.ones(n // 2), np.zeros(n // 2)]
        p = 1 / (1 + np.exp(-(rng.normal(size=n) + y)))
        rows = {r["interval"]: r for r in by_metric(case_report(rows_of(y, p), "binary", n_resamples=500))["auroc"]}
        for row in rows.values():
            assert row["low"] < 0.760 < row["high"]
        widths.append(rows["DeLong"]["high"] - rows["DeLong"]["low"])
    assert widths[1] < widths[0] / 2.5  # ~ 1 / sqrt(10)


def test_single_class_test_set_reports_what_is_defined():
    report = case_report(rows_of([1, 1, 1], [0.2, 0.5, 0.9]), "binary", n_resamples=100)
    for row in by_metric(report)["auroc"]:  # bootstrap and DeLong: no value, and why
        assert row["estimate"] is None and "3 positive and 0 negative" in row["interval"], row
    assert by_metric(report)["sensitivity"][0]["estimate"] == pytest.approx(2 / 3) and report.curves == {}


def test_multiclass_report_per_class_and_macro_auroc():
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rows = [{"id": str(i), "label": [int(c)], "probabilities": p.tolist()}
            for i, (c, p) in enumerate(zip(labels, probs))]
    report = by_metric(case_report(rows, "multiclass", n_resamples=200, class_names=["a", "b", "c"]))
    for c, name in enumerate("abc"):
        assert report[f"auroc [{name}]"][0]["estimate"] == pytest.approx(roc_auc_score(labels == c, probs[:, c]))
        assert report[f"auroc [{name}]"][1]["interval"] == "DeLong"
    macro = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    row = report["auroc (macro)"][0]
    assert row["estimate"] == pytest.approx(macro) and row["low"] < macro < row["high"]


def test_hd95_of_constructed_masks():
    """A 10x10 square against the same square moved 2 pixels: every boundary pixel 0 or 2 away, HD95 2; an empty
    prediction has no HD95 (nan) and Dice 0; both empty: all nan."""
    label = torch.zeros(3, 1, 32, 32, dtype=torch.long)
    label[:2, :, 10:20, 10:20] = 1
    pred = torch.zeros_like(label)
    pred[0, :, 12:22, 10:20] = 1
    dice, jaccard, hd95 = segmentation_case_scores(pred, label, 2)
    assert hd95[0, 0].item() == pytest.approx(2.0)
    assert dice[0, 0].item() == pytest.approx(2 * 80 / 200)
    assert math.isnan(hd95[1, 0].item()) and dice[1, 0].item() == 0.0
    assert all(math.isnan(v[2, 0].item()) for v in (dice, jaccard, hd95))


def test_segmentation_report_means_over_defined_cases():
    rows = [{"id": str(i), "dice": d, "jaccard": d / (2 - d), "hd95": h}
            for i, (d, h) in enumerate([(0.8, 2.0), (0.9, 1.0), (0.7, math.nan), (0.6, 3.0)])]
    report = by_metric(case_report(rows, "segmentation", n_resamples=200))
    assert report["dice"][0]["estimate"] == pytest.approx(0.75) and report["dice"][0]["cases"] == 4
    assert report["hd95"][0]["estimate"] == pytest.approx(2.0) and report["hd95"][0]["cases"] == 3


def evaluated(folder, y, p, *, ids=None, threshold=0.5, fold=0, seed=0, train_cases=80, report=False) -> str:
    """An evaluate output folder: predictions.csv, then evaluation.json; with ``report`` the full report as
    ``workflows.evaluate`` writes it, else only the fields a comparison reads (no bootstrap, no PNGs: fast)."""
    rows = rows_of(y, p, ids)
    predictions = write_csv(folder / "predictions.csv", rows)
    metadata = {"predictions": predictions.name, "predictions_sha256": sha256_file(predictions), "seed": seed,
                "fold": fold, "train_cases": train_cases}
    choice = ThresholdChoice(threshold, "given", math.nan, math.nan)
    if report:
        write_evaluation(folder, case_report(rows, "binary", threshold=choice, n_resamples=100), rows, metadata)
    else:
        write_json(folder / "evaluation.json", {"task": "binary", "metadata": metadata, "threshold": choice.as_dict()})
    return str(folder)


def scores(rng, y, separation: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(rng.normal(size=y.size) + separation * y)))


def test_report_files_hold_what_reproduces_the_figures(tmp_path):
    folder = evaluated(tmp_path / "run", Y, P, report=True)
    document = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert document["metadata"]["predictions"] == "predictions.csv" and document["cases"] == 8
    assert set(document["files"]) == {"csv", "md", "roc_png", "pr_png", "reliability_png"}
    for name in document["files"].values():
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert document["curves"]["roc"]["tpr"][-1] == 1.0
    assert "Threshold **0.5** (given)" in (tmp_path / "run" / "evaluation.md").read_text()
    assert folder


def test_compare_clearly_non_inferior_inferior_and_inconclusive(tmp_path):
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(60), np.zeros(60)]
    reference = scores(rng, y, 2.0)
    twin = np.clip(reference + rng.normal(0, 0.01, y.size), 0, 1)  # same ranking up to tiny noise
    b = evaluated(tmp_path / "b", y, reference)
    same = compare_runs([evaluated(tmp_path / "a", y, twin)], [b], n_resamples=300)
    delong = same.rows[0]
    assert delong["method"] == "DeLong paired" and -0.02 < delong["low"] <= delong["high"] < 0.02
    assert same.verdict == "non-inferior" and same.margin == 0.02 and same.primary == "auroc"
    worse = compare_runs([evaluated(tmp_path / "random", y, rng.uniform(size=y.size))], [b], n_resamples=300)
    assert worse.verdict == "inferior" and worse.rows[0]["high"] < -0.02
    small = np.r_[np.ones(15), np.zeros(15)]
    first, second = scores(rng, small, 1.5), scores(rng, small, 1.5)
    unsure = compare_runs([evaluated(tmp_path / "s1", small, first)], [evaluated(tmp_path / "s2", small, second)],
                          n_resamples=300)
    assert unsure.rows[0]["low"] < -0.02 < unsure.rows[0]["high"] and unsure.verdict == "inconclusive"
    assert {row["metric"] for row in same.rows} >= {"auroc", "auprc", "sensitivity", "specificity", "kappa"}


def test_mcnemar_counts_each_runs_decisions_at_its_own_threshold(tmp_path):
    y = [1, 1, 1, 1, 0, 0, 0, 0]
    a = [0.9, 0.8, 0.7, 0.2, 0.1, 0.1, 0.6, 0.3]  # at 0.5: wrong on case 3 (FN) and case 6 (FP)
    b = [0.9, 0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1]  # at 0.35: only case 0 positive, wrong on cases 1, 2, 3
    result = compare_runs([evaluated(tmp_path / "a", y, a)], [evaluated(tmp_path / "b", y, b, threshold=0.35)],
                          n_resamples=100)
    # only A right: cases 1, 2; only B right: case 6; both wrong: case 3. Exact binomial: P(|X - 1.5| >= 0.5) = 1
    assert (result.mcnemar["only_a_correct"], result.mcnemar["only_b_correct"]) == (2, 1)
    assert result.mcnemar["p_value"] == 1.0 and result.mcnemar["accuracy_a"] == 6 / 8


def test_compare_refuses_different_cases(tmp_path):
    a = evaluated(tmp_path / "a", Y, P)
    b = evaluated(tmp_path / "b", Y, P, ids=[f"other{i}" for i in range(len(Y))])
    with pytest.raises(EvaluationError, match="evaluated on different cases: 8 only in the first"):
        compare_runs([a], [b])
    changed = tmp_path / "a" / "predictions.csv"
    changed.write_text(changed.read_text().replace("0.9", "0.1"))
    with pytest.raises(EvaluationError, match="changed since"):
        compare_runs([a], [evaluated(tmp_path / "c", Y, P)])


def test_compare_across_folds_and_seeds_uses_the_corrected_t_test(tmp_path):
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(20), np.zeros(20)]
    differences = []
    for fold in range(3):
        for seed in range(2):
            a, b = scores(rng, y, 2.0), scores(rng, y, 1.0)
            evaluated(tmp_path / "A" / f"f{fold}s{seed}", y, a, fold=fold, seed=seed, train_cases=60)
            evaluated(tmp_path / "B" / f"f{fold}s{seed}", y, b, fold=fold, seed=seed, train_cases=60)
            differences.append(roc_auc_score(y, a) - roc_auc_score(y, b))
    result = compare_runs([tmp_path / "A"], [tmp_path / "B"])
    row = result.rows[0]
    expected = corrected_resampled_ttest(differences, 60, 40)
    assert row["metric"] == "auroc" and row["runs"] == 6 and len(result.pairs) == 6
    assert row["difference"] == pytest.approx(np.mean(differences))
    assert (row["low"], row["high"], row["p_value"]) == pytest.approx((expected.low, expected.high, expected.p_value))
    with pytest.raises(EvaluationError, match="do not pair up"):
        compare_runs([tmp_path / "A"], [tmp_path / "B" / "f0s0", tmp_path / "B" / "f0s1"])


def test_compare_zero_width_intervals(tmp_path):
    """One run per arm: a run compared with itself measured no difference (non-inferior); several runs: every pair
    the same difference is no spread to judge by (inconclusive, the search's and the study's rule)."""
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(20), np.zeros(20)]
    run = evaluated(tmp_path / "one", y, scores(rng, y, 1.5))
    itself = compare_runs([run], [run], n_resamples=100)
    assert (itself.rows[0]["low"], itself.rows[0]["high"]) == (0.0, 0.0) and itself.verdict == "non-inferior"
    for fold in range(2):
        evaluated(tmp_path / "A" / f"f{fold}", y, scores(rng, y, 1.5), fold=fold, seed=0, train_cases=40)
    several = compare_runs([tmp_path / "A"], [tmp_path / "A"])
    assert several.rows[0]["low"] == several.rows[0]["high"] == 0.0 and several.verdict == "inconclusive"


def test_compare_cli(tmp_path, capsys):
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(40), np.zeros(40)]
    a = evaluated(tmp_path / "a", y, scores(rng, y, 2), report=True)
    b = evaluated(tmp_path / "b", y, scores(rng, y, 2), report=True)
    out = tmp_path / "cmp"
    assert main(["compare", a, b, "--output", str(out), "--resamples", "200", "--margin", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "verdict: A is" in printed and "(margin 0.05;" in printed and "McNemar" in printed
    assert {p.name for p in out.iterdir()} >= {"comparison.csv", "comparison.json", "comparison.md"}
    assert json.loads((out / "comparison.json").read_text())["margin"] == 0.05
    other = evaluated(tmp_path / "c", Y, P)
    assert main(["compare", a, other, "--output", str(tmp_path / "cmp2")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("medtl3d: error:") and "different cases" in error and "\n" not in error


def test_compare_segmentation_on_dice_with_its_margin(tmp_path):
    """Dice per case: A = B - 0.002 on every case is non-inferior at the 0.01 margin; A = B - 0.05 inferior."""
    rng = np.random.default_rng(5)
    dice = rng.uniform(0.7, 0.95, 40)

    def run(name, values):
        rows = [{"id": f"c{i}", "dice": d, "jaccard": d / (2 - d), "hd95": 10 * (1 - d)} for i, d in enumerate(values)]
        predictions = write_csv(tmp_path / name / "predictions.csv", rows)
        write_json(tmp_path / name / "evaluation.json", {"task": "segmentation", "metadata": {
            "predictions": predictions.name, "predictions_sha256": sha256_file(predictions)}})
        return tmp_path / name

    reference = run("b", dice)
    close = compare_runs([run("a", dice - 0.002)], [reference], n_resamples=200)
    assert close.primary == "dice" and close.margin == 0.01 and close.verdict == "non-inferior"
    rows = {row["metric"]: row for row in close.rows}
    assert rows["dice"]["difference"] == pytest.approx(-0.002)
    assert rows["hd95"]["difference"] > 0  # worse surface distance: positive A - B for a lower-is-better metric
    assert compare_runs([run("c", dice - 0.05)], [reference], n_resamples=200).verdict == "inferior"
