"""The search's final table (CSV, JSON, Markdown) and plots: a Pareto plot (validation metric against MACs and
latency, the non-dominated candidates joined) and a per-cut curve (validation metric mean ± std per strategy, probe
scores beside it, FTL as a line). The Markdown states the non-inferior pick with its margin and cost saving, which
cuts cannot be told apart from their neighbour, where early termination stopped each candidate, and what the
search cost next to an exhaustive one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from ..reporting import pyplot, markdown_table, save_figure, write_csv, write_json, write_text
from ._verdicts import LEVEL


def _pm(mean, std) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if std is not None and not math.isnan(std) else f"{mean:.4f}"


def _flat(row: Mapping) -> dict:
    """The row with its comparisons as columns (``vs_reference_verdict``, ``vs_next_relation``, ...) for the CSV."""
    flat = {k: v for k, v in row.items() if k not in ("vs_reference", "vs_next")}
    for key in ("vs_reference", "vs_next"):
        flat.update({f"{key}_{name}": value for name, value in (row.get(key) or {}).items()})
    return flat


def _interval(low, high) -> str:
    return "-" if low is None else f"[{low:.4f}, {high:.4f}]"


def _versus(comparison) -> str:
    if not comparison:
        return "-"
    if comparison["verdict"] == "reference":
        return "reference"
    return f"{comparison['verdict']} ({comparison['difference']:+.4f}, [{comparison['low']:+.4f}, " \
           f"{comparison['high']:+.4f}])"


def _next(comparison) -> str:
    return "-" if not comparison else f"{comparison['relation']} {comparison['next']}"


def _statements(rows: Sequence[Mapping], picks: Mapping[str, str], metadata: Mapping, key_metric: str) -> list[str]:
    """The non-inferior pick per strategy in words, with its cost saving against the reference, and a warning
    where the best cut cannot be told apart from the next deeper one."""
    by_label = {r["label"]: r for r in rows}
    reference = "the best fully trained candidate" if metadata["noninferior_to"] == "best" else "FTL"
    lines = [f"Intervals: {LEVEL:.0%}, across folds x seeds with the corrected resampled t-test (Nadeau & Bengio "
             "2003); differences paired by fold and seed, against the reference: "
             f"{reference}. Non-inferiority margin: {metadata['margin']:g} {key_metric}.", ""]
    for name, label in picks.items():
        row = by_label[label]
        if name.endswith("-NI"):
            versus = row["vs_reference"]
            anchor = by_label[versus["reference"]]
            saving = (f"; {row['macs_g']:.3g} GMACs, {row['macs_g'] / anchor['macs_g']:.0%} of "
                      f"{anchor['label']}'s" if row.get("macs_g") and anchor.get("macs_g") else "")
            how = "is the reference itself" if versus["verdict"] == "reference" else (
                f"is {versus['verdict']} to {anchor['label']} (difference {versus['difference']:+.4f}, "
                f"interval [{versus['low']:+.4f}, {versus['high']:+.4f}])")
            lines.append(f"- **{name}** = {label}: the cheapest fully trained cut non-inferior to {reference} at "
                         f"margin {metadata['margin']:g}; it {how}{saving}.")
        elif name.endswith("-2") or (name.endswith("-1") and f"{name[:-2]}-2" not in picks):
            near = row.get("vs_next")
            if near and near["relation"] == "indistinguishable from":
                lines.append(f"- {name} = {label} has the best mean, but it is not distinguishable from the next "
                             f"deeper cut {near['next']} (difference {near['difference']:+.4f}, interval "
                             f"[{near['low']:+.4f}, {near['high']:+.4f}]): not a winner over it.")
    for prefix in sorted({n[:-2] for n in picks if n.endswith("-1")} - {n[:-3] for n in picks if n.endswith("-NI")}):
        lines.append(f"- No fully trained {prefix} cut is shown non-inferior to {reference} at margin "
                     f"{metadata['margin']:g} with {metadata['n_folds']} fold(s) x {len(metadata['seeds'])} seed(s): "
                     f"each is inferior or inconclusive at this sample size, so there is no {prefix}-NI.")
    return lines + [""]


def _cost_lines(metadata: Mapping) -> list[str]:
    cost = metadata["cost"]
    rungs = metadata["rungs"]
    stopping = (f"Early termination: successive halving at {', '.join(map(str, rungs))} epochs, top 1/"
                f"{metadata['eta']} continue." if len(rungs) > 1 else "No early termination.")
    budget = " The budget was reached: candidates stopped where it ran out." if metadata["budget_reached"] else ""
    return [f"{stopping}{budget} Cost so far: {cost['trainings']} trainings ({cost['trial_runs']} trial runs), "
            f"{cost['epochs']} epochs, {cost['wall_hours'] * 60:.1f} min wall, {cost['device_hours'] * 60:.1f} min "
            f"summed train time; an exhaustive search: {cost['exhaustive_trainings']} trainings, "
            f"{cost['exhaustive_epochs']} epochs (~{cost['exhaustive_device_hours_estimate'] * 60:.0f} min at this "
            f"search's time per epoch): this search trained {cost['epochs_fraction']:.0%} of its epochs."]


def pareto_front(rows: Sequence[Mapping], cost: str, metric: str) -> list[Mapping]:
    """Rows no other row beats on both ``cost`` (lower) and ``metric`` (higher), sorted by cost."""
    usable = [r for r in rows if r.get(cost) is not None and not math.isnan(r.get(metric, math.nan))]
    front = [r for r in usable if not any(
        o[cost] <= r[cost] and o[metric] >= r[metric] and (o[cost] < r[cost] or o[metric] > r[metric])
        for o in usable)]
    return sorted(front, key=lambda r: r[cost])


def write_search_report(output_dir: str | Path, rows: Sequence[dict], picks: Mapping[str, str], metadata: Mapping,
                        key_metric: str) -> dict[str, Path]:
    """``search_report.{csv,json,md}``, ``search_pareto.png`` and ``search_cuts.png`` under ``output_dir``."""
    out = Path(output_dir)
    metric = f"val_{key_metric}_mean"
    paths = {"csv": write_csv(out / "search_report.csv", [_flat(r) for r in rows]),
             "json": write_json(out / "search_report.json", {"metadata": dict(metadata), "picks": dict(picks),
                                                               "rows": list(rows)})}
    test_key = f"test_{key_metric}_mean"
    # the companion metric of the key one (AUPRC beside AUROC, Jaccard beside Dice), when the task has it
    second = next((m for m in ("auprc", "jaccard") if m != key_metric and any(f"val_{m}_mean" in r for r in rows)),
                  None)
    extra = (lambda r: {f"val {second}": _pm(r.get(f"val_{second}_mean"), r.get(f"val_{second}_std")),
                        f"test {second}": _pm(r.get(f"test_{second}_mean"), r.get(f"test_{second}_std"))}) \
        if second else (lambda r: {})
    shown = [{"pick": r["pick"], "candidate": r["label"], "stage": r["stage"], "level": r["level"], "trials": r["n"],
              "trained": r["status"], f"val {key_metric}": _pm(r[metric], r[f"val_{key_metric}_std"]),
              f"{LEVEL:.0%} interval": _interval(r.get(f"val_{key_metric}_low"), r.get(f"val_{key_metric}_high")),
              "vs reference": _versus(r["vs_reference"]), "vs next deeper cut": _next(r["vs_next"]),
              f"test {key_metric}": _pm(r.get(test_key), r.get(f"test_{key_metric}_std")), **extra(r),
              "params (M)": r["params_m"], "GMACs": r["macs_g"], "latency (ms)": r["latency_ms"],
              "MACs vs FTL": r["macs_ratio"], "probe kNN": r.get("probe_knn_auroc"),
              "probe linear": r.get("probe_linear_auroc"), "train s": r["train_seconds_mean"]} for r in rows]
    lines = [f"# Cutoff search: {metadata['backbone']} on bundle {metadata['bundle']}", "",
             f"Selection by **validation {key_metric}** (mean over {metadata['n_folds']} fold(s) x "
             f"{len(metadata['seeds'])} seed(s)); the test split is reported, never used to select. Costs from "
             "medtl3d.efficiency at the bundle's input size, batch 1.", "",
             "Picks: " + ", ".join(f"**{name}** = {label}" for name, label in picks.items()), "",
             *_statements(rows, picks, metadata, key_metric), *_cost_lines(metadata), ""]
    if metadata.get("spearman"):
        lines += ["Rank correlation (Spearman) of the probe scores with the fine-tuned validation metric: "
                  + "; ".join(f"{s}: kNN {v['knn']:.3f}, linear {v['linear']:.3f}" for s, v in
                              metadata["spearman"].items()), ""]
    lines.append(markdown_table(shown))
    paths["md"] = write_text(out / "search_report.md", "\n".join(lines))
    paths["pareto_png"] = _plot_pareto(out / "search_pareto.png", rows, metric, key_metric, metadata)
    paths["cuts_png"] = _plot_cuts(out / "search_cuts.png", rows, key_metric, metadata)
    return paths


def _plot_pareto(path: Path, rows: Sequence[dict], metric: str, key_metric: str, metadata: Mapping) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, cost, label in ((axes[0], "macs_g", "GMACs per sample"), (axes[1], "latency_ms", "latency (ms, batch 1)")):
        for strategy in dict.fromkeys(r["strategy"] for r in rows):
            chosen = [r for r in rows if r["strategy"] == strategy and r.get(cost) is not None]
            marker = "*" if strategy == "full" else "o"
            ax.errorbar([r[cost] for r in chosen], [r[metric] for r in chosen],
                        yerr=[r[f"val_{key_metric}_std"] for r in chosen], fmt=marker, capsize=2,
                        markersize=12 if strategy == "full" else 6, label=strategy)
            for r in chosen:
                ax.annotate(r["cut"] or r["strategy"], (r[cost], r[metric]), fontsize=6)
        front = pareto_front(rows, cost, metric)
        if front:
            ax.plot([r[cost] for r in front], [r[metric] for r in front], "k--", linewidth=0.8, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation {key_metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"{metadata['backbone']}: validation {key_metric} vs cost")
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)


def _plot_cuts(path: Path, rows: Sequence[dict], key_metric: str, metadata: Mapping) -> Path:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(rows) + 3), 4.5))
    order = sorted({(r["unit"], r["cut"]) for r in rows if r["cut"] is not None})
    position = {cut: i for i, (_, cut) in enumerate(order)}
    for strategy in dict.fromkeys(r["strategy"] for r in rows if r["cut"] is not None):
        chosen = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["unit"])
        ax.errorbar([position[r["cut"]] for r in chosen], [r[f"val_{key_metric}_mean"] for r in chosen],
                    yerr=[r[f"val_{key_metric}_std"] for r in chosen], fmt="o-", capsize=2, label=strategy)
    probed = sorted((r for r in rows if r.get("probe_linear_auroc") is not None and r["cut"] is not None),
                    key=lambda r: r["unit"])
    seen: set[str] = set()
    probed = [r for r in probed if not (r["cut"] in seen or seen.add(r["cut"]))]
    for probe, style in (("knn", ":"), ("linear", "-.")):
        if probed:
            ax.plot([position[r["cut"]] for r in probed], [r[f"probe_{probe}_auroc"] for r in probed], style,
                    color="grey", label=f"{probe} probe (frozen, AUROC)")
    for r in rows:
        if r["cut"] is None:
            ax.axhline(r[f"val_{key_metric}_mean"], linestyle="--", color="k" if r["strategy"] == "full" else "r",
                       linewidth=0.9, label=f"{r['strategy']} (reference)")
    ax.set_xticks(range(len(order)), [cut for _, cut in order], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"validation {key_metric}")
    ax.set_title(f"{metadata['backbone']}: per-cut validation {key_metric} (mean ± std over trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)
