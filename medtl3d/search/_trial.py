"""One trial of a search: train the bundle for one (strategy, cut, fold, seed), read its validation metrics at the
best epoch, optionally score it on the test split, and return a plain record.

A trial is an ordinary bundle run (``train.yaml``, then ``train.yaml`` + ``evaluate.yaml``) in its own folder, so
anything a search trained can be evaluated, exported or analysed like any bundle model. The trial pins torch's
thread count and the bundle seeds everything, so a trial gives the same numbers in-process and in a Ray worker.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial (plain data: it travels to Ray workers by pickling)."""

    key: str
    bundle_dir: str
    ids: dict[str, Any]
    strategy: str
    cut: str | None
    fold: int
    seed: int
    stage: int
    threads: int | None = 1
    evaluate_test: bool = True
    keep_checkpoints: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def run_trial(spec: TrialSpec) -> dict:
    """Run ``spec`` from scratch (a folder left by an interrupted run is cleared first) and return its record."""
    import torch
    from monai.bundle import run

    out = Path(spec.ids["output_dir"])
    if out.exists():
        shutil.rmtree(out)
    configs = Path(spec.bundle_dir) / "configs"
    common = {"meta_file": str(configs / "metadata.json"), "logging_file": str(configs / "logging.conf")}
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(int(spec.threads))
    try:
        start = time.perf_counter()
        run(config_file=str(configs / "train.yaml"), **common, **spec.ids)
        seconds = time.perf_counter() - start
        summary = json.loads((out / "train" / "train_summary.json").read_text())
        best = next((row for row in summary["history"] if row["epoch"] == summary["best_epoch"]), {})
        test: dict[str, float] = {}
        if spec.evaluate_test:
            run(config_file=[str(configs / "train.yaml"), str(configs / "evaluate.yaml")], **common, **spec.ids)
            test = json.loads((out / "eval" / "metrics.json").read_text())
    finally:
        torch.set_num_threads(threads)
    if not spec.keep_checkpoints:  # the bundle's models/model.pt-style export stays; the resumable engine state goes
        for name in ("best.pt", "last.pt"):
            (out / "train" / name).unlink(missing_ok=True)
    return {
        "kind": "trial", "key": spec.key, "strategy": spec.strategy, "cut": spec.cut, "fold": spec.fold,
        "seed": spec.seed, "stage": spec.stage, "key_metric": summary["key_metric"],
        "val": {k[4:]: v for k, v in best.items() if k.startswith("val_")}, "test": test,
        "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"], "train_seconds": round(seconds, 3),
        "output_dir": str(out), **spec.meta,
    }
