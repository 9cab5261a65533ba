"""``medtl3d compare`` of multi-class and multi-label runs, and the comparison's PNGs: the macro AUROC difference
against scikit-learn, each class's DeLong test against the O(n^2) structural-components reference with Holm's
adjustment written out, McNemar's counts of arg-max decisions, the corrected t-test across folds x seeds, the CLI,
and the figures redrawn from ``comparison.json`` alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from medtl3d.cli import main
from medtl3d.evaluation import compare_runs, plot_comparison, write_comparison
from medtl3d.evaluation._compare import find_runs
from medtl3d.provenance import sha256_file
from medtl3d.reporting import write_csv, write_json
from medtl3d.stats import corrected_resampled_ttest
from test_stats import delong_by_pairs  # the O(mn) DeLong reference

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def evaluated_multi(folder, task, labels, probabilities, *, fold=0, seed=0, train_cases=90) -> str:
    """An evaluate output folder of a multi-class (labels: class indices) or multi-label (0/1 rows) run."""
    rows = [{"id": f"case{i:03d}", "label": [int(v) for v in np.ravel(label)], "probabilities": [float(p) for p in row]}
            for i, (label, row) in enumerate(zip(labels, probabilities))]
    predictions = write_csv(folder / "predictions.csv", rows)
    write_json(folder / "evaluation.json", {"task": task, "metadata": {
        "predictions": predictions.name, "predictions_sha256": sha256_file(predictions), "fold": fold, "seed": seed,
        "train_cases": train_cases}})
    return str(folder)


def softmax_scores(rng, y, classes: int, separation: float) -> np.ndarray:
    logits = rng.normal(size=(y.size, classes)) + separation * np.eye(classes)[y]
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def rows_by_metric(comparison) -> dict:
    return {row["metric"]: row for row in comparison.rows}


def holm_by_hand(p) -> np.ndarray:
    """Holm (1979) as its step-down rule: the i-th smallest p times (m - i + 1), never below the previous one."""
    order, adjusted, running = np.argsort(p), np.empty(len(p)), 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - i) * p[index]))
        adjusted[index] = running
    return adjusted


def test_multiclass_single_runs_macro_per_class_delong_holm_and_mcnemar(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    a, b = softmax_scores(rng, y, 3, 2.0), softmax_scores(rng, y, 3, 1.0)
    result = compare_runs([evaluated_multi(tmp_path / "a", "multiclass", y, a)],
                          [evaluated_multi(tmp_path / "b", "multiclass", y, b)], n_resamples=300)
    rows = rows_by_metric(result)
    assert result.primary == "auroc (macro)" and result.margin == 0.02 and result.cases == 90
    macro = rows["auroc (macro)"]
    expected = roc_auc_score(y, a, multi_class="ovr") - roc_auc_score(y, b, multi_class="ovr")
    assert macro["difference"] == pytest.approx(expected, abs=1e-12)
    assert "stratified" in macro["method"] and macro["low"] < expected < macro["high"]
    raw = []
    for c in range(3):
        row = rows[f"auroc [{c}]"]
        auc, covariance = delong_by_pairs((y == c).astype(int), [a[:, c], b[:, c]])
        se = np.sqrt(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
        raw.append(2 * stats.norm.sf(abs(auc[0] - auc[1]) / se))
        assert row["difference"] == pytest.approx(auc[0] - auc[1], abs=1e-12)
        assert row["p_unadjusted"] == pytest.approx(raw[-1], abs=1e-10)
        assert row["method"] == "DeLong paired; p Holm-adjusted over 3 classes"
    assert [rows[f"auroc [{c}]"]["p_value"] for c in range(3)] == pytest.approx(holm_by_hand(np.array(raw)))
    right_a, right_b = a.argmax(1) == y, b.argmax(1) == y
    assert rows["accuracy"]["difference"] == pytest.approx(right_a.mean() - right_b.mean())
    assert (result.mcnemar["only_a_correct"], result.mcnemar["only_b_correct"]) == (
        int((right_a & ~right_b).sum()), int((~right_a & right_b).sum()))
    assert result.mcnemar["decisions"] == "arg-max class" and result.verdict == "superior"


def test_multiclass_verdicts_non_inferior_and_inferior(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 25)
    reference = softmax_scores(rng, y, 4, 2.5)
    twin = reference * (1 + rng.normal(0, 1e-3, reference.shape))  # the same ranking up to tiny noise
    b = evaluated_multi(tmp_path / "b", "multiclass", y, reference)
    close = compare_runs([evaluated_multi(tmp_path / "a", "multiclass", y, twin)], [b], n_resamples=300)
    assert close.verdict == "non-inferior" and -0.02 < close.rows[0]["low"]
    noise = rng.dirichlet(np.ones(4), y.size)
    worse = compare_runs([evaluated_multi(tmp_path / "r", "multiclass", y, noise)], [b], n_resamples=300)
    assert worse.verdict == "inferior" and worse.rows[0]["high"] < -0.02


def test_multilabel_per_label_tests_without_mcnemar(tmp_path):
    rng = np.random.default_rng(2)
    labels = (rng.uniform(size=(80, 3)) < [0.3, 0.5, 0.2]).astype(int)
    labels[:, 2] = 0  # label 2 never present: no AUROC, left out of the macro mean and of the per-label tests
    a = 1 / (1 + np.exp(-(rng.normal(size=labels.shape) + 2 * labels)))
    b = 1 / (1 + np.exp(-(rng.normal(size=labels.shape) + 1 * labels)))
    result = compare_runs([evaluated_multi(tmp_path / "a", "multilabel", labels, a)],
                          [evaluated_multi(tmp_path / "b", "multilabel", labels, b)], n_resamples=300)
    rows = rows_by_metric(result)
    assert set(rows) == {"auroc (macro)", "auroc [0]", "auroc [1]"} and result.mcnemar is None
    expected = np.mean([roc_auc_score(labels[:, k], a[:, k]) - roc_auc_score(labels[:, k], b[:, k])
                        for k in (0, 1)])
    assert rows["auroc (macro)"]["difference"] == pytest.approx(expected, abs=1e-12)
    assert "stratified" not in rows["auroc (macro)"]["method"]
    assert "Holm-adjusted over 2 classes" in rows["auroc [1]"]["method"]


def test_multiclass_across_folds_and_seeds_uses_the_corrected_t_test(tmp_path):
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 12)
    differences = []
    for fold in range(2):
        for seed in range(2):
            a, b = softmax_scores(rng, y, 3, 2.0), softmax_scores(rng, y, 3, 1.0)
            for arm, scores in (("A", a), ("B", b)):
                evaluated_multi(tmp_path / arm / f"f{fold}s{seed}", "multiclass", y, scores, fold=fold, seed=seed,
                                train_cases=72)
            differences.append(roc_auc_score(y, a, multi_class="ovr") - roc_auc_score(y, b, multi_class="ovr"))
    result = compare_runs([tmp_path / "A"], [tmp_path / "B"])
    row = rows_by_metric(result)["auroc (macro)"]
    expected = corrected_resampled_ttest(differences, 72, 36)
    assert row["runs"] == 4 and row["difference"] == pytest.approx(np.mean(differences))
    assert (row["low"], row["high"], row["p_value"]) == pytest.approx((expected.low, expected.high, expected.p_value))
    assert "Holm-adjusted over 3 classes" in rows_by_metric(result)["auroc [2]"]["method"]


def test_compare_cli_multiclass(tmp_path, capsys):
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 20)
    a = evaluated_multi(tmp_path / "a", "multiclass", y, softmax_scores(rng, y, 3, 2.0))
    b = evaluated_multi(tmp_path / "b", "multiclass", y, softmax_scores(rng, y, 3, 2.0))
    out = tmp_path / "cmp"
    assert main(["compare", a, b, "--output", str(out), "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    assert "auroc (macro)" in printed and "Holm-adjusted" in printed and "McNemar (decisions arg-max class)" in printed
    assert "on auroc (macro) (margin 0.02;" in printed
    assert {p.name for p in out.iterdir()} >= {"comparison.csv", "comparison.json", "comparison.md", "comparison.png"}
    labels = [[int(v) for v in row] for row in np.eye(3, dtype=int)[y]]
    other = evaluated_multi(tmp_path / "c", "multilabel", labels, softmax_scores(rng, y, 3, 2.0))
    assert main(["compare", a, other, "--output", str(tmp_path / "cmp2")]) == 2
    assert "different tasks (multiclass, multilabel)" in capsys.readouterr().err


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_comparison_pngs_redraw_from_the_json_alone(tmp_path):
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(30), np.zeros(30)].astype(int)
    runs = []
    for name, separation in (("a", 2.0), ("b", 1.0)):
        p = 1 / (1 + np.exp(-(rng.normal(size=y.size) + separation * y)))
        rows = [{"id": f"c{i}", "label": int(t), "probabilities": [float(s)]} for i, (t, s) in enumerate(zip(y, p))]
        predictions = write_csv(tmp_path / name / "predictions.csv", rows)
        write_json(tmp_path / name / "evaluation.json", {"task": "binary", "threshold": {"threshold": 0.5},
                   "metadata": {"predictions": predictions.name, "predictions_sha256": sha256_file(predictions)}})
        runs.append((tmp_path / name, p))
    comparison = compare_runs([runs[0][0]], [runs[1][0]], n_resamples=200)
    files = write_comparison(tmp_path / "cmp", comparison)
    assert {"png", "roc_png"} <= set(files) and "![A - B](comparison.png)" in files["md"].read_text()
    document = json.loads(files["json"].read_text())
    for arm, (_, p) in zip("ab", runs):  # the JSON holds each run's ROC points (scikit-learn's, every threshold)
        fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
        assert document["curves"]["roc"][arm]["fpr"] == pytest.approx(fpr.tolist())
        assert document["curves"]["roc"][arm]["tpr"] == pytest.approx(tpr.tolist())
    redrawn = plot_comparison(document, tmp_path / "redrawn")
    assert set(redrawn) == {"png", "roc_png"}
    for key, path in redrawn.items():
        assert png_size(path) == png_size(files[key]) and path.stat().st_size > 1000
    document["curves"] = {}  # several runs per arm, multi-class or segmentation: the forest plot only
    assert set(plot_comparison(document, tmp_path / "forest_only")) == {"png"}


def test_an_arm_holds_series_or_study_evaluations_never_both(tmp_path):
    """A folder of CTPA runs holds ``eval/`` (series) and ``eval/study`` per run: an arm is one level or the other."""
    rng = np.random.default_rng(3)
    y = np.arange(40) % 3
    for run in ("fold0", "fold1"):
        series, study = tmp_path / run / "eval", tmp_path / run / "eval" / "study"
        study.mkdir(parents=True)
        evaluated_multi(series, "multiclass", y, softmax_scores(rng, y, 3, 1.0), fold=int(run[-1]))
        evaluated_multi(study, "multiclass", y[:20], softmax_scores(rng, y[:20], 3, 1.0), fold=int(run[-1]))
        document = json.loads((study / "evaluation.json").read_text())
        document["metadata"]["level"] = "study"
        (study / "evaluation.json").write_text(json.dumps(document))

    assert sorted(len(run.rows) for run in find_runs(tmp_path)) == [40, 40]
    assert sorted(len(run.rows) for run in find_runs(tmp_path, study=True)) == [20, 20]
    assert len(find_runs(tmp_path / "fold0", study=True)[0].rows) == 20
    comparison = compare_runs([tmp_path], [tmp_path], study=True)
    assert comparison.rows  # 2 runs per arm, paired by fold: the study level alone
    with pytest.raises(Exception, match="no study-level evaluation.json"):
        find_runs(tmp_path / "fold0" / "eval" / "study" / "missing", study=True)
