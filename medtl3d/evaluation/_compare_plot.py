"""The comparison's figures, drawn from ``comparison.json`` alone (so :func:`plot_comparison` on a saved comparison
redraws them, as :func:`medtl3d.study.plot_figures` does for a study): ``comparison.png``, a forest plot of every
difference A - B with its interval, zero and the non-inferiority margin drawn, the row the verdict was read from
coloured by the verdict (HD95, in its own units, on a panel of its own); for one binary run per arm also
``comparison_roc.png``, both runs' ROC curves overlaid."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..reporting import pyplot, save_figure
from ._compare import LOWER_IS_BETTER

VERDICT_COLOURS = {"superior": "tab:green", "non-inferior": "tab:green", "inferior": "tab:red",
                   "inconclusive": "tab:orange"}
SEPARATE_SCALE = ("hd95",)  # a distance, not on the [-1, 1] scale of the other differences


def _label(row: Mapping) -> str:
    method = row["method"].split(";")[0].split(",")[0].split(" (")[0]  # e.g. "corrected resampled t-test"
    return f"{row['metric']}: {method}"


def _forest(axis, rows, document: Mapping, *, with_margin: bool) -> None:
    primary, margin = document["primary"], document["margin"]
    for position, row in enumerate(reversed(rows)):
        basis = row["metric"] == primary and row["method"] == document["verdict_basis"]
        colour = VERDICT_COLOURS[document["verdict"]] if basis else "tab:blue"
        axis.errorbar(row["difference"], position, xerr=[[row["difference"] - row["low"]],
                                                         [row["high"] - row["difference"]]],
                      fmt="o", color=colour, capsize=3)
    axis.set_yticks(range(len(rows)), [_label(row) for row in reversed(rows)], fontsize=7)
    axis.set_ylim(-0.7, len(rows) - 0.3)
    axis.axvline(0.0, color="grey", linewidth=1)
    if with_margin:
        sign = 1.0 if primary in LOWER_IS_BETTER else -1.0
        axis.axvline(sign * margin, color="tab:red", linestyle="--", linewidth=1)
        axis.annotate(f"margin {sign * margin:+g}", (sign * margin, 1.0), xycoords=("data", "axes fraction"),
                      xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                      color="tab:red")


def plot_comparison(document: Mapping, output_dir: str | Path) -> dict[str, Path]:
    """Draw ``comparison.png`` (and ``comparison_roc.png`` where the JSON holds both ROC curves) from ``document``
    (a saved ``comparison.json``) into ``output_dir``."""
    plt = pyplot()
    out = Path(output_dir)
    with_interval = [row for row in document["rows"] if row.get("low") is not None]
    groups = [[row for row in with_interval if row["metric"] not in SEPARATE_SCALE],
              [row for row in with_interval if row["metric"] in SEPARATE_SCALE]]
    groups = [group for group in groups if group] or [[]]
    heights = [max(len(group), 1) for group in groups]
    figure, axes = plt.subplots(len(groups), 1, figsize=(7, 1.2 + 0.32 * sum(heights)), squeeze=False,
                                gridspec_kw={"height_ratios": heights})
    level = next((row["level"] for row in with_interval if "level" in row), 0.95)
    for axis, group in zip(axes[:, 0], groups):
        _forest(axis, group, document, with_margin=any(row["metric"] == document["primary"] for row in group))
        unit = document.get("units", {}).get(group[0]["metric"]) if group else None
        axis.set_xlabel(f"A - B with its {level:.0%} interval" + (f" ({unit})" if unit else ""))
    figure.suptitle(f"A is {document['verdict']} to B on {document['primary']} ({document['task']}, "
                    f"{document['cases']} cases)", fontsize=9)
    figure.tight_layout()
    files = {"png": save_figure(figure, out / "comparison.png")}
    roc = document.get("curves", {}).get("roc")
    if roc:
        figure, axis = plt.subplots(figsize=(4.5, 4.5))
        for arm, name in (("a", "A"), ("b", "B")):
            axis.plot(roc[arm]["fpr"], roc[arm]["tpr"], label=f"{name}: {document[f'runs_{arm}'][0][-40:]}")
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
        axis.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC of A and B (same test cases)")
        axis.legend(loc="lower right", fontsize=6)
        files["roc_png"] = save_figure(figure, out / "comparison_roc.png")
    return files
