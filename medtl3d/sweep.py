"""Per-cutoff reports: train and evaluate a bundle once per (strategy, cut point), join the test metrics with the
efficiency module's params / MACs / latency, and write CSV + JSON + Markdown + PNG.

Each candidate is one ordinary bundle run (``train.yaml``, then ``train.yaml`` + ``evaluate.yaml``) with the
strategy and cut as config overrides, in its own output folder; a candidate whose ``eval/metrics.json`` already
exists is not trained again, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger("medtl3d.sweep")


@dataclass
class Candidate:
    """One transfer choice to train: a strategy and (for cut strategies) a cut point."""

    strategy: str
    cut: str | None = None

    @property
    def label(self) -> str:
        return self.strategy if self.cut is None else f"{self.strategy}@{self.cut}"

    @property
    def folder(self) -> str:
        return self.label.replace("@", "_").replace("/", "_")


@dataclass
class CandidateResult:
    strategy: str
    cut: str | None
    level: str | None
    metrics: dict[str, float]
    train_seconds: float
    params_m: float | None = None
    macs_g: float | None = None
    latency_ms: float | None = None
    params_ratio: float | None = None
    macs_ratio: float | None = None
    latency_ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_candidate(bundle_dir: str | Path, candidate: Candidate, output_dir: str | Path,
                  overrides: dict[str, Any] | None = None) -> tuple[dict[str, float], float]:
    """Train then evaluate ``bundle_dir`` with the candidate's strategy/cut; returns (test metrics, seconds).

    Reuses ``<output_dir>/eval/metrics.json`` when a previous run finished it.
    """
    from monai.bundle import run

    out = Path(output_dir)
    metrics_file = out / "eval" / "metrics.json"
    if metrics_file.is_file():
        seconds = json.loads((out / "timing.json").read_text())["train_seconds"] if (out / "timing.json").is_file() \
            else float("nan")
        return json.loads(metrics_file.read_text()), seconds
    configs = Path(bundle_dir) / "configs"
    ids = {**(overrides or {}), "strategy": candidate.strategy, "cut": candidate.cut, "output_dir": str(out),
           "ckpt_path": str(out / "model.pt")}
    meta, logging_file = str(configs / "metadata.json"), str(configs / "logging.conf")
    start = time.perf_counter()
    run(config_file=str(configs / "train.yaml"), meta_file=meta, logging_file=logging_file, **ids)
    seconds = time.perf_counter() - start
    _atomic_text(out / "timing.json", json.dumps({"train_seconds": seconds}))
    run(config_file=[str(configs / "train.yaml"), str(configs / "evaluate.yaml")], meta_file=meta,
        logging_file=logging_file, **ids)
    return json.loads(metrics_file.read_text()), seconds


def cut_sweep(bundle_dir: str | Path, output_dir: str | Path, *, backbone: str, input_shape: Sequence[int],
              strategies: Sequence[str] = ("truncate",), cuts: str | Sequence[str] = "block",
              include_full: bool = True, spatial_dims: int | None = None, key_metric: str = "auroc",
              efficiency_runs: int = 10, efficiency_warmup: int = 3, overrides: dict[str, Any] | None = None,
              num_classes: int = 1) -> list[CandidateResult]:
    """Train/evaluate every (strategy, cut) of ``cuts`` (plus FTL), measure each model's cost, write the report.

    ``overrides`` go to every bundle run (e.g. epochs, image size, weights); ``input_shape`` (channels first, no
    batch) is the shape the costs are measured at.
    """
    from .backbones import build_backbone
    from .efficiency import efficiency_report

    out = Path(output_dir)
    overrides = {**(overrides or {}), "backbone": backbone}
    if spatial_dims is not None:
        overrides["spatial_dims"] = spatial_dims
    with torch.device("meta"):
        body = build_backbone(backbone, spatial_dims)
    names = [c.name for c in (body.cut_points_at(cuts) if isinstance(cuts, str) else
                              [body.cut_point(c) for c in cuts])]
    levels = {c.name: c.level for c in body.cut_points}
    candidates = ([Candidate("full")] if include_full else []) + [Candidate(s, c) for s in strategies for c in names]

    shape = "x".join(str(int(s)) for s in input_shape)
    costs: dict[tuple[str, str | None], Any] = {}
    for strategy in strategies:
        report = efficiency_report(backbone, strategy, names, shape, runs=efficiency_runs, warmup=efficiency_warmup,
                                   num_classes=num_classes, output_dir=out / "efficiency")
        for row in report.rows:
            costs[("full", None) if row.is_full else (row.strategy, row.cut)] = row

    results: list[CandidateResult] = []
    for index, candidate in enumerate(candidates, 1):
        logger.info("candidate %d/%d: %s", index, len(candidates), candidate.label)
        print(f"medtl3d sweep: [{index}/{len(candidates)}] {candidate.label}", flush=True)
        metrics, seconds = run_candidate(bundle_dir, candidate, out / "runs" / candidate.folder, overrides)
        cost = costs.get((candidate.strategy, candidate.cut))
        results.append(CandidateResult(
            strategy=candidate.strategy, cut=candidate.cut, level=levels.get(candidate.cut) if candidate.cut else None,
            metrics=metrics, train_seconds=seconds,
            params_m=cost.params_m if cost else None, macs_g=cost.macs_g if cost else None,
            latency_ms=cost.latency_median_ms if cost else None,
            params_ratio=cost.params_ratio if cost else None, macs_ratio=cost.macs_ratio if cost else None,
            latency_ratio=cost.latency_ratio if cost else None,
        ))
    write_sweep_report(results, out, backbone=backbone, key_metric=key_metric,
                       context={"bundle": str(bundle_dir), "input_shape": shape, "overrides": overrides})
    return results


def _rows(results: Sequence[CandidateResult]) -> tuple[list[str], list[dict]]:
    metric_names = list(dict.fromkeys(k for r in results for k in r.metrics))
    rows = []
    for r in results:
        row = {"strategy": r.strategy, "cut": r.cut or "(full model)", "level": r.level or ""}
        row.update({m: r.metrics.get(m) for m in metric_names})
        row.update({"params_m": r.params_m, "macs_g": r.macs_g, "latency_ms": r.latency_ms,
                    "params_ratio": r.params_ratio, "macs_ratio": r.macs_ratio, "latency_ratio": r.latency_ratio,
                    "train_seconds": r.train_seconds})
        rows.append(row)
    columns = ["strategy", "cut", "level", *metric_names, "params_m", "macs_g", "latency_ms", "params_ratio",
               "macs_ratio", "latency_ratio", "train_seconds"]
    return columns, rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_sweep_report(results: Sequence[CandidateResult], output_dir: str | Path, *, backbone: str,
                       key_metric: str, context: dict | None = None) -> dict[str, Path]:
    """``cutoff_report.{csv,json,md,png}``: metric, params, MACs and latency per candidate, FTL marked."""
    out = Path(output_dir)
    columns, rows = _rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": out / "cutoff_report.csv", "json": out / "cutoff_report.json", "md": out / "cutoff_report.md",
             "png": out / "cutoff_report.png"}
    _atomic_text(paths["csv"], buffer.getvalue())
    _atomic_text(paths["json"], json.dumps({"backbone": backbone, "key_metric": key_metric, **(context or {}),
                                            "results": [asdict(r) for r in results]}, indent=2, default=str))
    lines = [f"# Per-cutoff report: {backbone}", "",
             f"Key metric: **{key_metric}** on the test split. Params/MACs/latency from medtl3d.efficiency "
             f"(ratios against the full model).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    _atomic_text(paths["md"], "\n".join(lines) + "\n")
    _plot(results, paths["png"], backbone, key_metric)
    return paths


def _plot(results: Sequence[CandidateResult], path: Path, backbone: str, key_metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next((r for r in results if r.strategy == "full"), None)
    strategies = list(dict.fromkeys(r.strategy for r in results if r.strategy != "full"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for strategy in strategies:
        chosen = [r for r in results if r.strategy == strategy]
        x = range(len(chosen))
        axes[0].plot(x, [r.metrics.get(key_metric, float("nan")) for r in chosen], "o-", label=strategy)
        axes[0].set_xticks(list(x), [r.cut for r in chosen], rotation=45, ha="right")
        axes[1].plot([r.macs_g for r in chosen], [r.metrics.get(key_metric, float("nan")) for r in chosen], "o",
                     label=strategy)
        for r in chosen:
            axes[1].annotate(r.cut, (r.macs_g or 0, r.metrics.get(key_metric, float("nan"))), fontsize=7)
    if full is not None:
        value = full.metrics.get(key_metric, float("nan"))
        axes[0].axhline(value, color="k", linestyle="--", label="full model (FTL)")
        axes[1].plot([full.macs_g], [value], "k*", markersize=12, label="full model (FTL)")
    axes[0].set_ylabel(f"test {key_metric}")
    axes[0].set_title(f"{backbone}: {key_metric} per cut point")
    axes[1].set_xlabel("GMACs per sample")
    axes[1].set_ylabel(f"test {key_metric}")
    axes[1].set_title("metric vs cost")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
