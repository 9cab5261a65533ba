"""The study's report: ``study_report.md`` (the five claims with their verdicts, the arms, the limits),
``study_report.json`` (everything, with each trial's fold, seed, history and per-case predictions file),
``study_report.csv`` (one row per arm), and two plots drawn only from the JSON's ``figures`` (so
:func:`plot_figures` on a saved report redraws them): validation score vs MACs per arm with its interval, and CKA
by depth (WT and RI, initial vs final; WT vs RI final)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from ..reporting import markdown_table, pyplot, save_figure, write_csv, write_json, write_text


def _flat(row: Mapping) -> dict:
    flat = {k: v for k, v in row.items() if k not in ("vs_reference", "vs_next")}
    flat.update({f"vs_ftl_{k}": v for k, v in (row.get("vs_reference") or {}).items()})
    return flat


def figures(rows: Sequence[Mapping], claims: Sequence[Mapping], key_metric: str) -> dict:
    """What the plots show, from the report's rows and claims: per arm its MACs and validation score with the
    interval across folds x seeds; claim 4's CKA by depth."""
    points = [{"label": r["label"], "name": r["name"], "strategy": r["strategy"], "control": r["control"],
               "macs_g": r.get("macs_g"), "score": r.get(f"val_{key_metric}_mean"),
               "low": r.get(f"val_{key_metric}_low"), "high": r.get(f"val_{key_metric}_high")} for r in rows]
    representation = next((c for c in claims if c["claim"] == 4), {})
    return {"key_metric": key_metric, "score_vs_cost": points, "cka_by_depth": representation.get("by_depth", [])}


def _finite(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def plot_figures(document: Mapping, output_dir: str | Path) -> dict[str, Path]:
    """Draw ``study_score_cost.png`` and ``study_cka.png`` from ``document["figures"]`` (a saved report's JSON)."""
    plt = pyplot()
    out = Path(output_dir)
    data = document["figures"]
    paths = {}
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for point in data["score_vs_cost"]:
        if not (_finite(point["macs_g"]) and _finite(point["score"])):
            continue
        error = None
        if _finite(point["low"]):
            error = [[point["score"] - point["low"]], [point["high"] - point["score"]]]
        axis.errorbar(point["macs_g"], point["score"], yerr=error, fmt="s" if point["control"] else "o",
                      mfc="none" if point["control"] else None, capsize=3, label=point["name"])
    axis.set_xlabel("MACs (G, batch 1)")
    axis.set_ylabel(f"validation {data['key_metric']} (95% CI)")
    axis.set_title("score vs cost per arm (hollow: random-init controls)")
    axis.legend(fontsize=6, ncol=2)
    paths["score_cost"] = save_figure(figure, out / "study_score_cost.png")
    figure, axis = plt.subplots(figsize=(7, 4))
    depths = [row["depth"] for row in data["cka_by_depth"]]
    for key, name in (("wt_initial_final", "WT: initial vs final"), ("ri_initial_final", "RI: initial vs final"),
                      ("wt_vs_ri_final", "WT final vs RI final")):
        axis.plot(depths, [row[key] for row in data["cka_by_depth"]], marker="o", label=name)
    axis.set_xlabel("depth (cut point)")
    axis.set_ylabel("linear CKA")
    axis.set_ylim(-0.05, 1.05)
    axis.set_title("representation change by depth" if depths else "representation change: not measured")
    axis.legend(fontsize=7)
    axis.tick_params(axis="x", labelrotation=45, labelsize=7)
    paths["cka"] = save_figure(figure, out / "study_cka.png")
    return paths


def _number(value, sign: bool = False) -> str:
    if not _finite(value):
        return "-"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def _comparison_rows(claim: Mapping) -> list[dict]:
    return [{"comparison": c["comparison"], "difference": _number(c.get("difference"), True),
             "95% CI": "-" if not _finite(c.get("low")) else f"[{c['low']:+.4f}, {c['high']:+.4f}]",
             "p": _number(c.get("p_value")), "runs": c.get("runs", "-"), "verdict": c["verdict"],
             "method": c.get("method") or c.get("note") or ""}
            for c in claim["comparisons"]]


def _markdown(rows, claims, limits, metadata) -> str:
    key = limits["key_metric"]
    lines = [f"# Study: {metadata['bundle']} ({metadata['backbone']})", "",
             f"{len(rows)} arms x {limits['folds']} fold(s) x {limits['seeds']} seed(s), {limits['epochs']} "
             f"epoch(s) each; key metric: validation {key}; non-inferiority margin {limits['margin']:g}; "
             f"intervals {limits['level']:.0%}. Random-init controls of the same architecture: "
             + (", ".join(metadata["controls"]) or "none") + ".", ""]
    for claim in claims:
        lines += [f"## Claim {claim['claim']}: {claim['title']}", "", f"**{claim['verdict']}**: {claim['statement']}",
                  "", f"Test: {claim['test']}.", ""]
        if claim["comparisons"]:
            lines += [markdown_table(_comparison_rows(claim)), ""]
        for share_key, where in (("feature_reuse", "validation"), ("feature_reuse_test_cases", "test cases")):
            share = claim.get(share_key)
            if share:
                interval = "-" if share["low"] is None else f"[{share['low']:.3f}, {share['high']:.3f}]"
                lines += [f"Feature-reuse share (WT - ST) / (WT - RI), {where}: {_number(share['estimate'])} "
                          f"{interval} ({share['method']}, {share['runs']} runs per arm).", ""]
        if claim.get("by_depth"):
            lines += [markdown_table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()}
                                      for row in claim["by_depth"]]), ""]
    table = [{"arm": r["name"], "weights": r["weights"], "n": r["n"],
              f"val {key}": _number(r.get(f"val_{key}_mean")),
              "95% CI": "-" if not _finite(r.get(f"val_{key}_low")) else
              f"[{r[f'val_{key}_low']:.4f}, {r[f'val_{key}_high']:.4f}]",
              f"test {key}": _number(r.get(f"test_{key}_mean")), "params (M)": _number(r.get("params_m")),
              "MACs (G)": _number(r.get("macs_g")), "latency (ms)": _number(r.get("latency_ms")),
              "vs WT": (r.get("vs_reference") or {}).get("verdict", "-")} for r in rows]
    smallest = limits["smallest_detectable_wt_ri"]
    lines += ["## Arms", "", markdown_table(table), "", "## Limits", "",
              f"- {limits['runs_per_arm']} run(s) per arm ({limits['folds']} fold(s) x {limits['seeds']} seed(s)); "
              f"{limits['train_cases']} training, {limits['val_cases']} validation, {limits['test_cases']} test "
              f"cases; claim 4 on {limits['cka_cases']} cases.",
              "- Smallest WT - RI difference this study detects with "
              f"{limits['power']:.0%} power: {_number(smallest)} {key}" if smallest is not None else
              "- Fewer than two paired runs: no interval, every verdict inconclusive.",
              "- Verdicts judge validation scores (the test column is reported, never used to decide); "
              "`inconclusive` means this sample size cannot decide, not that the arms are equal.", ""]
    return "\n".join(lines)


def write_study_report(output_dir: Path, rows: Sequence[Mapping], claims: Sequence[Mapping], limits: Mapping,
                       trials: Sequence[Mapping], cka: Sequence[Mapping], metadata: Mapping) -> dict[str, Path]:
    """Write the report files (atomically) under ``output_dir``; returns their paths."""
    document = {"claims": list(claims), "rows": list(rows), "limits": dict(limits), "trials": list(trials),
                "cka": list(cka), "figures": figures(rows, claims, limits["key_metric"]), "metadata": dict(metadata)}
    paths = {"json": write_json(output_dir / "study_report.json", document),
             "csv": write_csv(output_dir / "study_report.csv", [_flat(r) for r in rows]),
             "md": write_text(output_dir / "study_report.md", _markdown(rows, claims, limits, metadata))}
    paths.update(plot_figures(document, output_dir))
    return paths
