"""The evaluation report as an ignite handler: a bundle's ``evaluate.yaml`` lists it among the test evaluator's
handlers (MONAI's ``SupervisedEvaluator``), so scoring is MONAI's loop and the report is one swappable piece."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

from ignite.engine import Engine, Events

from ..data.splits import split_summary
from ..engine import load_checkpoint, task_metrics
from ..errors import EvaluationError
from ..provenance import data_hash, dataset_items, sha256_file
from ..reporting import markdown_table, write_csv, write_text
from ._cases import CaseReport, case_report, choose_threshold
from ._levels import STUDY_TASKS, StudyLevel
from ._report import write_evaluation
from ._threshold import FixedThreshold

STUDY_FOLDER, PREDICTIONS = "study", "predictions.csv"


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
    the predictions. Binary tasks are scored at ``threshold`` (``evaluate#threshold``): a component called with the
    level reported (:class:`~medtl3d.evaluation.ValidationThreshold`, chosen on the validation split, or
    :class:`~medtl3d.evaluation.FixedThreshold`), or a number (a fixed threshold); without one it is 0.5 and the
    report says it was not chosen on data. ``study`` (a :class:`~medtl3d.evaluation.StudyLevel`) adds the same
    report at study level in ``output_dir/study`` (series aggregated to studies, its threshold chosen on
    validation studies), recorded in the series-level ``evaluation.json``. ``checkpoint`` (its training record),
    ``fold`` and ``data_seed`` are recorded so a comparison can pair runs across folds x seeds. List it after
    :class:`~medtl3d.engine.handlers.OutputLock`, which holds ``output_dir`` while it writes.
    """

    def __init__(self, output_dir: str | Path, cases, *, task: str, checkpoint: str | Path,
                 threshold: Callable | float | None = None, study: StudyLevel | None = None, fold: int | None = None,
                 data_seed: int | None = None, n_resamples: int = 2000, level: float = 0.95,
                 bootstrap_seed: int = 0) -> None:
        self.output_dir, self.cases, self.task, self.checkpoint = Path(output_dir), cases, task, str(checkpoint)
        self.threshold = FixedThreshold(threshold) if isinstance(threshold, (int, float)) else threshold
        if study is not None and study.active and task not in STUDY_TASKS:
            raise EvaluationError(f"study_key={study.key!r}: a study level needs a task where a study is positive "
                                  f"when any series is ({', '.join(STUDY_TASKS)}), not {task!r}")
        self.study, self.fold, self.data_seed = study, fold, data_seed
        self.bootstrap = {"n_resamples": n_resamples, "level": level, "seed": bootstrap_seed}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def _threshold(self, level=None):
        if self.task != "binary":
            return None
        if self.threshold is None:
            warnings.warn("evaluate: no threshold component, so the operating point is at a fixed 0.5, not chosen "
                          "on validation data", UserWarning, stacklevel=3)
            return choose_threshold(None)
        return self.threshold(level)

    def _report(self, folder: Path, rows: list[dict], threshold, metadata: dict) -> CaseReport:
        """The case-level report of ``rows`` in ``folder``, beside its ``predictions.csv``."""
        report = case_report(rows, self.task, threshold=threshold, level=self.bootstrap["level"],
                             n_resamples=self.bootstrap["n_resamples"], seed=self.bootstrap["seed"])
        predictions = write_csv(folder / PREDICTIONS, rows)
        write_evaluation(folder, report, rows, {**metadata, "predictions": predictions.name,
                                                "predictions_sha256": sha256_file(predictions)})
        return report

    def _study_report(self, out: Path, metadata: dict) -> dict | None:
        """The study-level report in ``out/study``; what the series-level record says about it. A study folder
        left by an earlier run is removed when this run has no study level, so none outlives its series."""
        folder = out / STUDY_FOLDER
        if self.study is None or not self.study.active:
            if (folder / "evaluation.json").is_file():
                shutil.rmtree(folder)
            return None
        rows = self.study.test(self.cases.rows)
        try:
            threshold = self._threshold(self.study.validation)
        except EvaluationError as err:
            raise EvaluationError(f"study level (study_key={self.study.key!r}): {err}; set a fixed threshold "
                                  "(--evaluate#threshold 0.5) or --evaluate#study#_disabled_ true") from None
        level = {"level": "study", "study_key": self.study.key, "aggregation": self.study.aggregation,
                 "studies": len(rows), "series": len(self.cases.rows)}
        report = self._report(folder, rows, threshold, {**metadata, **level,
                                                        "series_predictions": f"../{PREDICTIONS}"})
        _print_report(report, folder, "study level: ")
        return {**level, "folder": STUDY_FOLDER}

    def __call__(self, engine: Engine) -> None:
        out, rows = self.output_dir, self.cases.rows
        metrics = {name: float(engine.state.metrics[name]) for name in task_metrics(self.task)}
        write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        write_text(out / "metrics.md", markdown_table([{"metric": k, "value": v} for k, v in metrics.items()]))
        data = engine.data_loader.dataset
        metadata = {"checkpoint": self.checkpoint, **training_record(self.checkpoint), "fold": self.fold,
                    "data_seed": self.data_seed, "test_sha256": data_hash(dataset_items(data))["sha256"],
                    "bootstrap": self.bootstrap, "split": split_summary({"test": dataset_items(data) or []})[0]}
        threshold = self._threshold()
        study = self._study_report(out, metadata)
        report = self._report(out, rows, threshold, {**metadata, **({"study_level": study} if study else {})})
        _print_report(report, out)


def _print_report(report: CaseReport, folder: Path, prefix: str = "") -> None:
    for row in report.metrics:
        ci = "" if row["low"] is None else f" [{row['low']:.4f}, {row['high']:.4f}] ({row['interval']})"
        estimate = "-" if row["estimate"] is None else f"{row['estimate']:.4f}"
        print(f"medtl3d: {prefix}{row['metric']} {estimate}{ci}")
    if report.threshold is not None:
        print(f"medtl3d: {prefix}threshold {report.threshold['threshold']:.4g} ({report.threshold['rule']})")
    print(f"medtl3d: {prefix}evaluation report -> {folder}/evaluation.md")
