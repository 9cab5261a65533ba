"""The evaluation report as an ignite handler: a bundle's ``evaluate.yaml`` lists it among the test evaluator's
handlers (MONAI's ``SupervisedEvaluator``), so scoring is MONAI's loop and the report is one swappable piece."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ignite.engine import Engine, Events

from ..data.splits import split_summary
from ..engine import load_checkpoint, task_metrics
from ..provenance import data_hash, dataset_items, sha256_file
from ..reporting import markdown_table, write_csv, write_text
from ._cases import case_report, choose_threshold
from ._report import write_evaluation


def training_record(ckpt_path: str | Path) -> dict:
    """What the evaluated model's checkpoint says about its training run: run id, seed, training-set size and the
    content hashes of its training and validation data (empty for a TorchScript export, which keeps none)."""
    if Path(ckpt_path).suffix != ".pt":
        return {}
    state = load_checkpoint(ckpt_path)
    run_config, provenance = state.get("run_config") or {}, state.get("provenance") or {}
    data = provenance.get("data") or {}
    return {"run_id": provenance.get("run_id"), "seed": run_config.get("seed"),
            "train_cases": run_config.get("train_size"),
            "train_sha256": (data.get("train") or {}).get("sha256"),
            "val_sha256": (data.get("val") or {}).get("sha256")}


class EvaluationReport:
    """When the evaluator completes, write ``output_dir``: ``predictions.csv`` (one row per case, per series with
    a series key), ``metrics.json`` / ``metrics.md`` (point estimates) and the case-level report of
    :func:`~medtl3d.evaluation.write_evaluation` (every metric with its interval over cases, PNGs).

    ``cases`` is the evaluator's case collector (:func:`medtl3d.engine.components.case_metrics`), whose rows are
    the predictions. For binary tasks the decision threshold is chosen on validation data: ``validator`` (an
    evaluator over the validation split whose case collector is ``val_cases``) runs first, and the threshold
    (Youden, or the highest reaching ``target_sensitivity``) is applied unchanged to the test cases; without a
    validator it is 0.5 and the report says it was not chosen on data. ``checkpoint`` (its training record),
    ``fold`` and ``data_seed`` are recorded so a comparison can pair runs across folds x seeds. List it after
    :class:`~medtl3d.engine.handlers.OutputLock`, which holds ``output_dir`` while it writes.
    """

    def __init__(self, output_dir: str | Path, cases, *, task: str, checkpoint: str | Path, validator=None,
                 val_cases=None, target_sensitivity: float | None = None, fold: int | None = None,
                 data_seed: int | None = None, n_resamples: int = 2000, level: float = 0.95,
                 bootstrap_seed: int = 0) -> None:
        self.output_dir, self.cases, self.task, self.checkpoint = Path(output_dir), cases, task, str(checkpoint)
        self.validator, self.val_cases, self.target_sensitivity = validator, val_cases, target_sensitivity
        self.fold, self.data_seed = fold, data_seed
        self.bootstrap = {"n_resamples": n_resamples, "level": level, "seed": bootstrap_seed}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def threshold(self):
        if self.task != "binary":
            return None
        if self.validator is None:
            warnings.warn("evaluate: no validator, so the operating point is at a fixed 0.5, not chosen on "
                          "validation data", UserWarning, stacklevel=2)
            return choose_threshold(None, target_sensitivity=self.target_sensitivity)
        self.validator.run()
        return choose_threshold(self.val_cases.rows, target_sensitivity=self.target_sensitivity)

    def __call__(self, engine: Engine) -> None:
        out, rows = self.output_dir, self.cases.rows
        metrics = {name: float(engine.state.metrics[name]) for name in task_metrics(self.task)}
        report = case_report(rows, self.task, threshold=self.threshold(), level=self.bootstrap["level"],
                             n_resamples=self.bootstrap["n_resamples"], seed=self.bootstrap["seed"])
        predictions = write_csv(out / "predictions.csv", rows)
        write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        write_text(out / "metrics.md", markdown_table([{"metric": k, "value": v} for k, v in metrics.items()]))
        data = engine.data_loader.dataset
        metadata = {"checkpoint": self.checkpoint, **training_record(self.checkpoint), "fold": self.fold,
                    "data_seed": self.data_seed, "predictions": predictions.name,
                    "predictions_sha256": sha256_file(predictions),
                    "test_sha256": data_hash(dataset_items(data))["sha256"], "bootstrap": self.bootstrap,
                    "split": split_summary({"test": dataset_items(data) or []})[0]}
        write_evaluation(out, report, rows, metadata)
        for row in report.metrics:
            ci = "" if row["low"] is None else f" [{row['low']:.4f}, {row['high']:.4f}] ({row['interval']})"
            estimate = "-" if row["estimate"] is None else f"{row['estimate']:.4f}"
            print(f"medtl3d: {row['metric']} {estimate}{ci}")
        if report.threshold is not None:
            print(f"medtl3d: threshold {report.threshold['threshold']:.4g} ({report.threshold['rule']})")
        print(f"medtl3d: evaluation report -> {out}/evaluation.md")
