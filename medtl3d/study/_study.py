"""``run_study``: train the grid through the search's machinery, measure claim 4, judge the five claims, report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config_ids import check_component_options
from ..errors import StudyError, interface, setting
from ..locking import one_run_per_output
from ..search import (Budget, BundleTask, ResultsStore, StageRunner, add_costs, configs_hash,
                      Executor, fingerprinted_overrides, make_executor)
from ..stats import DEFAULT_MARGINS
from ..weights import weights_or_none
from . import _claims as claims
from ._grid import CONTROLLED, check_grid, expand_grid
from ._report import write_study_report
from ._representation import cka_rows


class StudyTask(BundleTask):
    """The bundle under the study's overrides; an arm's weights are the bundle's, or none for RI and the controls."""

    def trial_ids(self, candidate, fold: int, seed: int, output_dir) -> dict[str, Any]:
        ids = super().trial_ids(candidate, fold, seed, output_dir)
        if getattr(candidate, "control", False) or candidate.strategy == "random":
            ids["weights"] = "null"  # MONAI drops None overrides; also RI of bundles without a strategy id
        return ids

    def check_strategy(self, strategy: str, cut: str | None) -> None:
        super().check_strategy("full" if strategy == "random" else strategy, cut)  # RI: the full architecture

    def dataset(self, items: list[dict]):
        """``items`` with the bundle's validation preprocessing (what claim 4's CKA runs on)."""
        parser = self._parser(["train.yaml"], output_dir=str(self.work_dir), datalist=str(self.datalist))
        parser["split"] = {"train": [], "val": items, "test": []}
        return parser.get_parsed_content("val_dataset")


@dataclass
class StudyResult:
    """The arms' table, the five claims, the limits, how many trials this call trained / reused, the files."""

    rows: list[dict]
    claims: list[dict]
    limits: dict
    trained: int
    reused: int
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)

    def claim(self, number: int) -> dict:
        return next(c for c in self.claims if c["claim"] == number)


def check_study_options(*, seeds: int | Sequence[int], margin: float | None, cka_cases: int, divergence_cka: float,
                        convergence_fraction: float, processes_per_trial: int,
                        describe: Callable[[str, Any], str] = setting, **_: Any) -> list[int]:
    """Refuse the options of :func:`run_study` that no bundle could make valid, each named by ``describe(name,
    value)`` (default: as the user's interface sets it); returns the seeds as a list."""
    given, seeds = seeds, list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    for name, value, ok, what in (
            ("seeds", given, bool(seeds), "give at least one seed"),
            ("margin", margin, margin is None or margin > 0, "must be > 0"),
            ("cka_cases", cka_cases, int(cka_cases) >= 4, "must be >= 4 (CKA needs a few cases)"),
            ("divergence_cka", divergence_cka, 0 < divergence_cka < 1, "must be in (0, 1)"),
            ("convergence_fraction", convergence_fraction, 0 < convergence_fraction <= 1, "must be in (0, 1]"),
            ("processes_per_trial", processes_per_trial, int(processes_per_trial) >= 1, "must be an integer >= 1")):
        if not ok:
            raise StudyError(f"{describe(name, value)}: {what}")
    return seeds


@one_run_per_output(StudyError)
def run_study(bundle_dir: str | Path, output_dir: str | Path, *, overrides: dict[str, Any] | None = None,
              strategies: Sequence[str] = ("full", "stats", "truncate", "transfusion", "lwft"),
              weights: Sequence[str] = ("pretrained", "random"), cuts: str | Sequence[str] = "block",
              n_folds: int | None = None, seeds: int | Sequence[int] = 2, margin: float | None = None,
              evaluate_test: bool = True, executor: str | Executor = "local", ray_address: str | None = None,
              ray_num_cpus: int | None = None, cpus_per_trial: int | None = None, gpus_per_trial: float = 0,
              processes_per_trial: int = 1, efficiency_runs: int = 10, efficiency_warmup: int = 3,
              cka_cases: int = 64, divergence_cka: float = 0.5, convergence_fraction: float = 0.95) -> StudyResult:
    """Train the grid of :func:`medtl3d.study.expand_grid` (each arm ``n_folds`` (default: the bundle's) x
    ``seeds``) into ``<output_dir>/trials.jsonl`` through the search's trial store and executors, then judge the
    five claims and write ``study_report.{md,json,csv}``, ``study_score_cost.png`` and ``study_cka.png``; see
    :mod:`medtl3d.study`. Trials already in the store are not trained again (a different grid, configuration or
    data is refused); one study at a time holds ``output_dir``. ``margin``: the non-inferiority margin of the key
    metric (default 0.02 AUROC, 0.01 Dice); ``cka_cases``: test cases claim 4 measures on; ``divergence_cka``:
    the WT-vs-RI CKA below which the two are said to diverge; ``convergence_fraction``: claim 5's share of the
    final validation score. The execution options are the search's (:func:`medtl3d.search.run_search`)."""
    out = Path(output_dir)
    start = time.perf_counter()
    seeds = check_study_options(seeds=seeds, margin=margin, cka_cases=cka_cases, divergence_cka=divergence_cka,
                                convergence_fraction=convergence_fraction, processes_per_trial=processes_per_trial)
    overrides = dict(overrides or {})
    if n_folds is not None:
        overrides["n_folds"] = int(n_folds)
    task = StudyTask(bundle_dir, overrides, out)
    if weights_or_none(task.parser.get_parsed_content("weights")) is None:
        where = "--set weights" if interface() == "cli" else "bundle id 'weights'"
        raise StudyError(f"{where} is null: a study compares pretrained weights with random init; give the bundle "
                         "pretrained weights (a catalogue name, see `medtl3d weights list`, or a file)")
    body = task.backbone()
    arms = expand_grid(body, strategies, cuts, weights)
    for strategy in dict.fromkeys(a.strategy for a in arms):  # a strategy the bundle cannot build stops here
        task.check_strategy(strategy, next(a.cut for a in arms if a.strategy == strategy))
    task.check_cost_input()  # the cost step runs after every trial: its input must fit now
    split = task.split(0)
    folds = list(range(max(task.n_folds, 1)))
    config = {"study": True, "bundle": task.name, "bundle_configs": configs_hash(task),
              "overrides": fingerprinted_overrides(task.overrides), "data": task.data_hash(),
              "backbone": task.backbone_name, "arms": [a.label for a in arms], "folds": folds, "seeds": seeds,
              "evaluate_test": evaluate_test,
              **({"processes_per_trial": processes_per_trial} if processes_per_trial > 1 else {})}
    store = ResultsStore(out / "trials.jsonl", config)
    epochs = int(task.parser["epochs"])
    executor = make_executor(executor, address=ray_address, num_cpus=ray_num_cpus, gpus_per_trial=gpus_per_trial)
    runner = StageRunner(task, store, executor,
                         folds, seeds, out, threads=cpus_per_trial, processes=int(processes_per_trial),
                         evaluate_test=evaluate_test, keep_checkpoints=False, rungs=[epochs], eta=3,
                         budget=Budget(), command="study")
    runner.run(arms, "study grid")
    rows = runner.aggregate(arms)
    for row, arm in zip(rows, arms):
        row.update(name=arm.name, control=arm.control,
                   weights="random" if arm.control or arm.strategy == "random" else "pretrained")
    key_metric = next((r["key_metric"] for r in rows if r["key_metric"]), None)
    cut_strategies = list(dict.fromkeys(a.strategy for a in arms if a.cut is not None)) or ["truncate"]
    add_costs(task, store, rows, cut_strategies, efficiency_runs, efficiency_warmup)
    records = {arm.label: runner.records(arm) for arm in arms}
    margin = margin if margin is not None else DEFAULT_MARGINS.get(key_metric, 0.02)
    n_train, n_val = len(split["train"]), len(split["val"])
    picks = claims.annotate_rows(rows, records, key_metric, margin, n_train, n_val)
    items = split["test"] or split["val"]
    cka = cka_rows(store, records, task.dataset(items[: int(cka_cases)]), "block",
                   int(task.parser["batch_size"])) if records.get("random") else []
    folders = {label: [str(Path(r["output_dir"]) / "eval") for r in found] for label, found in records.items()
               if found and all(r["test"] for r in found)}
    judged = [claims.claim_transfer(records, key_metric, margin, n_train, n_val, folders),
              claims.claim_truncation(rows, picks, records, key_metric, margin, n_train, n_val, folders),
              claims.claim_budget(rows, picks, key_metric, margin, folders),
              claims.claim_representation(cka, n_train, n_val, divergence_cka),
              claims.claim_convergence(records, key_metric, convergence_fraction, n_train, n_val)]
    limits = {"folds": len(folds), "seeds": len(seeds), "runs_per_arm": len(folds) * len(seeds),
              "train_cases": n_train, "val_cases": n_val, "test_cases": len(split["test"]),
              "cka_cases": min(int(cka_cases), len(items)), "epochs": epochs, "level": claims.LEVEL,
              "margin": margin, "key_metric": key_metric,
              "smallest_detectable_wt_ri": judged[0].get("smallest_detectable"), "power": claims.POWER}
    seconds = time.perf_counter() - start
    store.add({"kind": "run", "seconds": round(seconds, 3), "trained": runner.trained})
    trials = [{"key": r["key"], "arm": label, "fold": r["fold"], "seed": r["seed"], "val": r["val"],
               "test": r["test"], "history": r["history"], "output_dir": r["output_dir"],
               "predictions": str(Path(r["output_dir"]) / "eval" / "predictions.csv") if r["test"] else None}
              for label, found in records.items() for r in found]
    metadata = {**config, "key_metric": key_metric, "executor": executor.name, "trained_this_run": runner.trained,
                "reused": runner.reused, "controls": [a.label for a in arms if a.control],
                "controlled_strategies": list(CONTROLLED), "divergence_cka": divergence_cka,
                "convergence_fraction": convergence_fraction, "seconds": round(seconds, 3)}
    paths = write_study_report(out, rows, judged, limits, trials, cka, metadata)
    print(f"medtl3d study: {runner.trained} trial(s) trained, {runner.reused} reused, {seconds / 60:.1f} min; "
          + "; ".join(f"claim {c['claim']}: {c['verdict']}" for c in judged) + f"; report: {paths['md']}",
          flush=True)
    return StudyResult(rows, judged, limits, runner.trained, runner.reused, seconds, paths)



class Study:
    """The study as a bundle component: ``study.yaml`` builds it from its ids and runs ``$@study.run()``.

    The options are :func:`run_study`'s, checked here (:func:`check_study_options`, and the grid's strategies and
    weights), so a wrong value stops while the config is parsed, before any data are read; ``executor`` may be an
    executor component (``study#executor``). Errors start with ``study:``, the component's id in the bundles."""

    def __init__(self, bundle_dir: str | Path, output_dir: str | Path, **options: Any) -> None:
        def check(given: dict) -> None:
            check_study_options(**given, describe=lambda name, value: f"{name}={value!r}")
            check_grid(given["strategies"], given["weights"])

        check_component_options("study", run_study, check, StudyError, bundle_dir, output_dir, **options)
        self.bundle_dir, self.output_dir, self.options = bundle_dir, output_dir, options

    def run(self) -> StudyResult:
        return run_study(self.bundle_dir, self.output_dir, **self.options)
