"""Writing a case-level evaluation and a comparison. Evaluation: ``evaluation.csv`` / ``.json`` / ``.md`` and its
PNGs (ROC, PR and reliability diagram for binary classification, per-class ROC otherwise, per-case Dice / HD95 for
segmentation).

``evaluation.json`` is the record to reproduce every figure from: the metric rows, threshold and operating point,
the curves' points, and in ``metadata`` the per-case predictions' file (with its SHA-256), the checkpoint, its
training seed and data hashes, the fold and data seed when given, and the bootstrap's settings. Comparison:
``comparison.csv`` / ``.json`` / ``.md``, its PNGs (:mod:`._compare_plot`) and the one-screen console summary.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import numpy as np

from ..reporting import markdown_table, pyplot, save_figure, write_csv, write_json, write_text
from ._cases import CaseReport
from ._compare import Comparison
from ._compare_plot import plot_comparison

METRIC_COLUMNS = ("metric", "estimate", "low", "high", "interval", "cases")


def _ci(row: Mapping) -> str:
    return "-" if row.get("low") is None else f"[{row['low']:.4f}, {row['high']:.4f}]"


def _plot_binary(directory: Path, report: CaseReport, auroc_row: Mapping) -> dict[str, Path]:
    plt = pyplot()
    roc, pr, bins = report.curves["roc"], report.curves["pr"], report.curves["reliability"]
    point = report.operating_point
    files = {}
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(roc["fpr"], roc["tpr"], label=f"AUROC {auroc_row['estimate']:.3f} {_ci(auroc_row)}")  # ties: diagonal
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axis.plot(1 - point["specificity"], point["sensitivity"], "o", color="tab:red",
              label=f"threshold {point['threshold']:.3g}")
    axis.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test)")
    axis.legend(loc="lower right", fontsize="small")
    files["roc_png"] = save_figure(figure, directory / "roc.png")
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(pr["recall"], pr["precision"], drawstyle="steps-post")
    axis.axhline(pr["prevalence"], linestyle="--", color="grey", label=f"prevalence {pr['prevalence']:.2f}")
    axis.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall (test)", ylim=(0, 1.02))
    axis.legend(loc="lower left", fontsize="small")
    files["pr_png"] = save_figure(figure, directory / "pr.png")
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    centres = (np.array(bins["edges"][:-1]) + np.array(bins["edges"][1:])) / 2
    observed = np.array(bins["observed_frequency"], dtype=float)
    axis.bar(centres, np.nan_to_num(observed), width=np.diff(bins["edges"]), edgecolor="black", alpha=0.6,
             label="observed frequency")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ece = next(row for row in report.metrics if row["metric"] == "ece")
    axis.set(xlabel="predicted probability", ylabel="fraction positive",
             title=f"Reliability (ECE {ece['estimate']:.3f})", xlim=(0, 1), ylim=(0, 1))
    axis.legend(loc="upper left", fontsize="small")
    files["reliability_png"] = save_figure(figure, directory / "reliability.png")
    return files


def _plot_per_class(directory: Path, curves: Mapping) -> dict[str, Path]:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for name, curve in curves.items():
        axis.plot(curve["fpr"], curve["tpr"], label=str(name))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axis.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC per class (one-vs-rest, test)")
    axis.legend(loc="lower right", fontsize="small")
    return {"roc_png": save_figure(figure, directory / "roc.png")}


def _plot_cases(directory: Path, case_rows, units: Mapping) -> dict[str, Path]:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for axis, name in zip(axes, ("dice", "hd95")):
        values = np.array([row.get(name, math.nan) for row in case_rows], dtype=float)
        values = values[np.isfinite(values)]
        axis.plot(np.random.default_rng(0).uniform(-0.1, 0.1, values.size), values, "o", alpha=0.6)
        axis.boxplot(values, positions=[0], widths=0.4, showfliers=False)
        unit = f" ({units[name]})" if name in units else ""
        axis.set(title=f"{name}{unit} per case ({values.size})", xticks=[])
    figure.tight_layout()
    return {"cases_png": save_figure(figure, directory / "cases.png")}


def write_evaluation(output_dir: str | Path, report: CaseReport, case_rows, metadata: Mapping) -> dict[str, Path]:
    """The report files of ``report`` under ``output_dir``; ``case_rows`` are the per-case predictions it came
    from (already written to the file ``metadata["predictions"]`` names)."""
    directory = Path(output_dir)
    document = {"metadata": dict(metadata), "task": report.task, "cases": report.cases, "metrics": report.metrics,
                "threshold": report.threshold, "operating_point": report.operating_point, "curves": report.curves}
    units = {row["metric"]: row["unit"] for row in report.metrics if "unit" in row}  # HD95: mm or px
    columns = METRIC_COLUMNS + (("unit",) if units else ())
    files = {"csv": write_csv(directory / "evaluation.csv", report.metrics, columns)}
    level = metadata.get("bootstrap", {}).get("level", 0.95)
    lines = [f"# Evaluation ({report.task}, {report.cases} test cases)", "",
             f"Intervals: {level:.0%}, over test cases; per-case predictions in `{metadata.get('predictions')}`.", ""]
    rows = [{**row, "ci": _ci(row)} for row in report.metrics]
    lines.append(markdown_table(rows, ["metric", "estimate", "ci", "interval", "cases", *columns[6:]], "Metrics"))
    if report.threshold is not None:
        threshold = report.threshold
        lines += [f"Threshold **{threshold['threshold']:.4g}** ({threshold['rule']}); the metrics from sensitivity "
                  "down are at this threshold.", ""]
        lines.append(markdown_table([report.operating_point], title="Operating point (test)"))
    if metadata.get("split"):
        lines.append(markdown_table(metadata["split"], title="Split"))
    files["md"] = write_text(directory / "evaluation.md", "\n".join(lines))
    if report.task == "binary" and report.curves:  # no curves when the test cases hold one class
        files.update(_plot_binary(directory, report, next(r for r in report.metrics if r["metric"] == "auroc")))
    elif report.task == "segmentation":
        files.update(_plot_cases(directory, case_rows, units))
    elif report.curves.get("roc_per_class"):
        files.update(_plot_per_class(directory, report.curves["roc_per_class"]))
    document["files"] = {key: path.name for key, path in files.items()}
    files["json"] = write_json(directory / "evaluation.json", document)
    return files


COMPARISON_COLUMNS = ("metric", "estimate_a", "estimate_b", "difference", "low", "high", "p_value", "method")


def _number(value, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.4f}" if sign else f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}"


def comparison_lines(comparison: Comparison) -> list[str]:
    """The one-screen console summary of a comparison."""
    runs = (f"A = {comparison.runs_a[0]}, B = {comparison.runs_b[0]}" if len(comparison.runs_a) == 1 else
            f"A = {len(comparison.runs_a)} runs, B = {len(comparison.runs_b)} runs, paired by fold and seed")
    lines = [f"{comparison.task}, {comparison.cases} test cases; {runs}", "",
             f"{'metric':<15}{'A':>9}{'B':>9}{'A - B':>10}  {'interval':<20}{'p':>8}  method"]
    for row in comparison.rows:
        interval = "-" if row.get("low") is None else f"[{row['low']:+.4f}, {row['high']:+.4f}]"
        name = row["metric"] + (f" ({comparison.units[row['metric']]})" if row["metric"] in comparison.units else "")
        lines.append(f"{name:<15}{_number(row.get('estimate_a')):>9}{_number(row.get('estimate_b')):>9}"
                     f"{_number(row.get('difference'), sign=True):>10}  {interval:<20}"
                     f"{_number(row.get('p_value')):>8}  {row['method']}")
    if comparison.mcnemar:
        m = comparison.mcnemar
        lines += ["", f"McNemar (decisions {m['decisions']}): only A right {m['only_a_correct']}, only B right "
                      f"{m['only_b_correct']}, p = {_number(m['p_value'])} ({m['method']})"]
    lines += ["", f"verdict: A is {comparison.verdict.upper()} to B on {comparison.primary} (margin "
                  f"{comparison.margin:g}; {comparison.verdict_basis})"]
    return lines


def write_comparison(output_dir: str | Path, comparison: Comparison) -> dict[str, Path]:
    """``comparison.csv`` / ``.json`` / ``.md`` and ``comparison.png`` (binary: ``comparison_roc.png``) under
    ``output_dir``."""
    directory = Path(output_dir)
    document = asdict(comparison)
    files = {"csv": write_csv(directory / "comparison.csv", comparison.rows, COMPARISON_COLUMNS)}
    lines = [f"# Comparison: A - B on {comparison.primary} and every metric", "",
             f"Verdict: **{comparison.verdict}** (margin {comparison.margin:g} on {comparison.primary}; "
             f"{comparison.verdict_basis}).", "",
             "A: " + ", ".join(f"`{r}`" for r in comparison.runs_a), "",
             "B: " + ", ".join(f"`{r}`" for r in comparison.runs_b), ""]
    lines += [f"{metric} in {unit}." for metric, unit in comparison.units.items()] + [""] * bool(comparison.units)
    lines.append(markdown_table(comparison.rows, COMPARISON_COLUMNS, "Differences"))
    if comparison.mcnemar:
        lines.append(markdown_table([comparison.mcnemar], title="McNemar"))
    if comparison.pairs:
        lines.append(markdown_table(comparison.pairs, title="Per pair of runs (A - B)"))
    files["md"] = write_text(directory / "comparison.md", "\n".join(lines + ["![A - B](comparison.png)", ""]))
    files["json"] = write_json(directory / "comparison.json", document)
    files.update(plot_comparison(document, directory))
    return files
