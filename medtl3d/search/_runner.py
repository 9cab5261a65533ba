"""Running a search's stages: which trials train (or continue) to which epoch, through the executor, into the
results store.

Without early termination a stage trains every candidate's folds x seeds to the trials' ``epochs``. With it (more
than one rung, :mod:`._rungs`) a stage is a successive-halving bracket: all its candidates train to the first
rung, the promoted ones continue from their checkpoints to the next, and so on; references (FTL, ...) always train
to the end, as the baseline of every comparison. Every decision is recomputed from the store, so a re-run (after a
kill, or with a larger budget) trains only what is missing. A budget (epochs, or device-hours: train seconds x
processes per trial) is checked before each batch: once spent, nothing more starts and the search reports where
each candidate stopped.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ._bundle import BundleTask
from ._plan import REFERENCES, Candidate
from ._rungs import promote, reached, rung_score
from ._store import ResultsStore
from ._trial import TrialSpec


def trial_key(candidate: Candidate, fold: int, seed: int) -> str:
    return f"{candidate.label}/fold{fold}/seed{seed}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


@dataclass(frozen=True)
class Budget:
    """A cap on the search's cost over all its runs (None: no cap)."""

    epochs: float | None = None
    device_hours: float | None = None

    def spent(self, records: Sequence[dict]) -> bool:
        epochs = sum(r["epochs_trained"] for r in records)
        hours = sum(r["device_seconds"] for r in records) / 3600
        return (self.epochs is not None and epochs >= self.epochs) or \
            (self.device_hours is not None and hours >= self.device_hours)


class StageRunner:
    """Trains a search's stages into its store and aggregates the rows of its table."""

    def __init__(self, task: BundleTask, store: ResultsStore, executor, folds: list[int], seeds: list[int], out: Path,
                 *, threads: int | None, processes: int, evaluate_test: bool, keep_checkpoints: bool,
                 rungs: list[int], eta: int, budget: Budget, command: str = "search") -> None:
        self.task, self.store, self.executor = task, store, executor
        self.command = command  # the progress lines' prefix: medtl3d search / medtl3d study
        self.folds, self.seeds, self.out = folds, seeds, out
        self.threads, self.processes = threads, processes
        self.evaluate_test, self.keep_checkpoints = evaluate_test, keep_checkpoints
        self.rungs, self.eta, self.budget = rungs, eta, budget
        self.max_epochs = rungs[-1]
        self.trained = self.epochs_trained = 0
        self.budget_reached = False
        self._found: set[str] = set()  # trials found already at a target epoch ...
        self._continued: set[str] = set()  # ... and trials this call trained

    @property
    def reused(self) -> int:
        """Trials this call found already trained as far as it needed and did not train further."""
        return len(self._found - self._continued)

    # ------------------------------------------------------------------------------------------------ records
    def records(self, candidate: Candidate) -> list[dict]:
        found = (self.store.trial(trial_key(candidate, f, s)) for f in self.folds for s in self.seeds)
        return [r for r in found if r is not None]

    def _spec(self, candidate: Candidate, fold: int, seed: int, epoch: int) -> TrialSpec:
        folder = self.out / "trials" / candidate.label.replace("@", "_").replace("/", "_") / f"fold{fold}_seed{seed}"
        return TrialSpec(key=trial_key(candidate, fold, seed), bundle_dir=str(self.task.dir),
                         ids=self.task.trial_ids(candidate, fold, seed, folder), strategy=candidate.strategy,
                         cut=candidate.cut, fold=fold, seed=seed, stage=candidate.stage, threads=self.threads,
                         processes=self.processes, evaluate_test=self.evaluate_test,
                         keep_checkpoints=self.keep_checkpoints, stop_at=None if epoch >= self.max_epochs else epoch,
                         meta={"unit": candidate.unit, "level": candidate.level})

    # ------------------------------------------------------------------------------------------------ training
    def _train(self, candidates: Sequence[Candidate], epoch: int, title: str) -> None:
        """Bring every trial of ``candidates`` to ``epoch`` (the last one: to the end)."""
        specs, ready = [], 0
        for candidate in candidates:
            for fold in self.folds:
                for seed in self.seeds:
                    record = self.store.trial(trial_key(candidate, fold, seed))
                    if record is not None and reached(record, epoch):
                        ready += 1
                        self._found.add(record["key"])
                    else:
                        specs.append(self._spec(candidate, fold, seed, epoch))
        if not specs:
            return
        if self.budget.spent(list(self.store.of_kind("trial"))):
            self.budget_reached = True
            print(f"medtl3d {self.command}: budget {self.budget} spent; {title}: {len(specs)} trial(s) not started",
                  flush=True)
            return
        print(f"medtl3d {self.command}: {title}: {len(candidates)} candidate(s) x {len(self.folds)} fold(s) x "
              f"{len(self.seeds)} seed(s) to epoch {epoch}: {len(specs)} to train, {ready} already there", flush=True)
        done = [0]

        def finished(record: dict) -> None:
            before = self.store.trial(record["key"])
            record["epochs_trained"] = record["epochs_run"] - (before["epochs_run"] if before else 0)
            record["device_seconds"] = round(record["train_seconds"] * self.processes, 3)
            record["train_seconds_total"] = round(record["train_seconds"] + (before or {}).get("train_seconds_total",
                                                                                              0.0), 3)
            self.store.add(record)
            self._continued.add(record["key"])
            self.trained += 1
            self.epochs_trained += record["epochs_trained"]
            done[0] += 1
            value = record["val"].get(record["key_metric"], math.nan)
            state = f"paused at epoch {record['epochs_run']}" if record["paused"] else "done"
            print(f"medtl3d {self.command}: [{done[0]}/{len(specs)}] {record['key']}: val {record['key_metric']} "
                  f"{value:.4f} ({record['train_seconds']:.1f} s, {state})", flush=True)

        self.executor.map(specs, finished)

    def run(self, candidates: Sequence[Candidate], title: str) -> None:
        """Train ``candidates`` (in their order, the search's prior) by successive halving over the rungs;
        references go straight to the end."""
        if self.budget_reached:
            return
        references = [c for c in candidates if c.strategy in REFERENCES]
        bracket = [c for c in candidates if c.strategy not in REFERENCES]
        if references:
            self._train(references, self.max_epochs, f"{title}, references")
        order = [c.label for c in bracket]
        for i, epoch in enumerate(self.rungs):
            if not bracket or self.budget_reached:
                return
            last = epoch == self.max_epochs
            self._train(bracket, epoch, title if len(self.rungs) == 1 else
                        f"{title}, rung {i + 1}/{len(self.rungs)} ({len(bracket)} of {len(order)} candidates)")
            if last or self.budget_reached:
                return
            scores = {c.label: [rung_score(r, epoch, r["key_metric"]) for r in self.records(c) if reached(r, epoch)]
                      for c in bracket}
            kept = set(promote(scores, self.eta, order))
            bracket = [c for c in bracket if c.label in kept]

    # ------------------------------------------------------------------------------------------------ table
    def aggregate(self, candidates: Sequence[Candidate]) -> list[dict]:
        rows = []
        for candidate in candidates:
            records = self.records(candidate)
            row: dict[str, Any] = {"label": candidate.label, "strategy": candidate.strategy, "cut": candidate.cut,
                                   "unit": candidate.unit, "level": candidate.level, "stage": candidate.stage,
                                   "n": len(records), "key_metric": records[0]["key_metric"] if records else None}
            complete = len(records) == len(self.folds) * len(self.seeds) and not any(r["paused"] for r in records)
            epochs = self.max_epochs if complete else min((r["epochs_run"] for r in records), default=0)
            row.update(complete=complete, epochs=epochs, status="complete" if complete else "not started" if not
                       records else f"stopped at rung {self.rungs.index(epochs) + 1} ({epochs} epochs)"
                       if epochs in self.rungs else f"not finished ({epochs} epochs)",
                epochs_trained=sum(r["epochs_run"] for r in records))
            for split in ("val", "test"):
                for metric in dict.fromkeys(m for r in records for m in r[split]):
                    row[f"{split}_{metric}_mean"], row[f"{split}_{metric}_std"] = mean_std(
                        [r[split].get(metric, math.nan) for r in records])
            row["train_seconds_mean"] = mean_std([r["train_seconds_total"] for r in records])[0]
            rows.append(row)
        return rows
