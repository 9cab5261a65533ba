"""The hierarchical cutoff search: Stage 1 over block cut points, Stage 2 over the layers around the best one."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config_ids import check_component_options
from ..errors import SearchError
from ..locking import one_run_per_output
from ..provenance import sha256_file
from ..stats import DEFAULT_MARGINS
from ._bundle import BundleTask
from ._executors import Executor, make_executor
from ._plan import (REFERENCES, SEARCH_STRATEGIES, SHORT_NAMES, Candidate, applicable_cuts, candidates_for,
                    stage1_cuts, stage2_cuts)
from ._plan import neighbourhood as neighbourhood_cuts
from ._probes import PROBES, probe_ranking, spearman
from ._report import write_search_report
from ._rungs import rung_epochs
from ._runner import Budget, StageRunner
from ._store import ResultsStore
from ._verdicts import annotate


@dataclass
class SearchResult:
    """The aggregated table (one row per candidate), the named picks (``TTL-1``, ``TTL-2``, ``TTL-NI``, ``FTL``,
    ...), the probe rows, how many trial runs this call trained (a trial continued to a later rung counts once per
    rung) and how many it found already there, the cost summary, and the report files."""

    rows: list[dict]
    picks: dict[str, str]
    probes: list[dict]
    trained: int
    reused: int
    seconds: float
    cost: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)

    def row(self, label: str) -> dict:
        return next(r for r in self.rows if r["label"] == label)


def _best(rows: Sequence[dict], key: str) -> dict | None:
    """Highest ``key`` among the rows trained furthest (a candidate stopped at a rung is not compared with one
    trained longer); ties go to the smaller model (earlier unit)."""
    usable = [r for r in rows if not math.isnan(r.get(key, math.nan))]
    furthest = max((r["epochs"] for r in usable), default=0)
    usable = [r for r in usable if r["epochs"] == furthest]
    return max(usable, key=lambda r: (r[key], -(r["unit"] if r["unit"] is not None else 1 << 30)), default=None)


def configs_hash(task: BundleTask) -> str:
    digest = hashlib.sha256()
    for name in ("train.yaml", "evaluate.yaml"):
        digest.update((task.configs / name).read_bytes())
    return digest.hexdigest()[:16]


# ids that name the data: the search's fingerprint holds the data's content hash instead of these paths
_DATA_IDS = ("datalist", "dataset_dir")


def fingerprinted_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides as the results store compares them: files by content (weights moved elsewhere are the same
    weights), the data ids left out (the data's content hash stands for them)."""
    return {key: f"sha256:{sha256_file(value)}" if isinstance(value, str) and Path(value).is_file() else value
            for key, value in overrides.items() if key not in _DATA_IDS}


def check_search_options(*, strategies: Sequence[str], references: Sequence[str], seeds: int | Sequence[int],
                         probe_top_m: int | None, probe_rank_by: str, processes_per_trial: int,
                         gpus_per_trial: float, noninferior_to: str, margin: float | None,
                         budget_epochs: float | None, budget_device_hours: float | None, **_: Any) -> dict[str, Any]:
    """Refuse the options of :func:`run_search` that no bundle could make valid (before anything is read or
    trained); returns the normalised ones: ``strategies`` and ``references`` (FTL first) without repeats, ``seeds``
    as a list, ``processes_per_trial`` as an int."""
    strategies, references = list(dict.fromkeys(strategies)), list(dict.fromkeys(["full", *references]))
    if not strategies:
        raise SearchError("search strategies: give at least one of " + ", ".join(SEARCH_STRATEGIES))
    for name in strategies:
        if name not in SEARCH_STRATEGIES:
            raise SearchError(f"search strategy {name!r} is not a cut strategy; choose from "
                              f"{', '.join(SEARCH_STRATEGIES)} (references: {', '.join(REFERENCES)})")
    for name in references:
        if name not in REFERENCES:
            raise SearchError(f"search reference {name!r}: choose from {', '.join(REFERENCES)}")
    if probe_top_m is not None and probe_top_m < 1:
        raise SearchError(f"probe_top_m must be >= 1, got {probe_top_m}")
    if probe_rank_by not in PROBES:
        raise SearchError(f"probe_rank_by must be one of {', '.join(PROBES)}, got {probe_rank_by!r}")
    if int(processes_per_trial) != processes_per_trial or processes_per_trial < 1:
        raise SearchError(f"processes_per_trial must be an integer >= 1, got {processes_per_trial!r}")
    processes_per_trial = int(processes_per_trial)
    if processes_per_trial > 1 and 0 < gpus_per_trial < processes_per_trial:
        raise SearchError(f"processes_per_trial={processes_per_trial} needs a GPU per process; gpus_per_trial is "
                          f"{gpus_per_trial:g}")
    if noninferior_to not in ("best", "full"):
        raise SearchError(f"noninferior_to must be best or full, got {noninferior_to!r}")
    for name, value in (("margin", margin), ("budget_epochs", budget_epochs),
                        ("budget_device_hours", budget_device_hours)):
        if value is not None and not value > 0:
            raise SearchError(f"{name} must be > 0, got {value!r}")
    seeds = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise SearchError("search seeds: give at least one seed")
    return {"strategies": strategies, "references": references, "seeds": seeds,
            "processes_per_trial": processes_per_trial}


@one_run_per_output(SearchError)
def run_search(bundle_dir: str | Path, output_dir: str | Path, *, overrides: dict[str, Any] | None = None,
               strategies: Sequence[str] = ("truncate",), references: Sequence[str] = ("full",),
               cuts: str | Sequence[str] = "block", stage2: bool = True, neighbourhood: int = 1,
               n_folds: int | None = None, seeds: int | Sequence[int] = 1, probe: bool = False,
               probe_top_m: int | None = None, probe_rank_by: str = "linear", evaluate_test: bool = True,
               executor: str | Executor = "local", ray_address: str | None = None, ray_num_cpus: int | None = None,
               cpus_per_trial: int | None = None, gpus_per_trial: float = 0, processes_per_trial: int = 1,
               efficiency_runs: int = 10, efficiency_warmup: int = 3, keep_checkpoints: bool = False,
               early_stop: bool = True, eta: int = 3, min_epochs: int | None = None,
               budget_epochs: float | None = None, budget_device_hours: float | None = None,
               margin: float | None = None, noninferior_to: str = "best") -> SearchResult:
    """Hierarchical cutoff search over a bundle; see :mod:`medtl3d.search`.

    ``overrides`` are bundle ids every trial shares (epochs, image size, weights, dataset_dir, ...). Each candidate
    runs ``n_folds`` (default: the bundle's) x ``seeds`` trials; the best Stage 1 cut per strategy is picked on
    the mean validation key metric and its ``neighbourhood`` is searched in Stage 2. ``probe`` adds the
    kNN/linear probe ranking; ``probe_top_m`` trains Stage 1 only on the top-m block cuts by ``probe_rank_by``.
    Trials already in ``<output_dir>/trials.jsonl`` are not run again when the search's configuration and the
    data's *content* are unchanged (a different one is refused); one search at a time holds ``output_dir``.
    ``cpus_per_trial`` pins torch's threads in each trial (and is each Ray task's CPU request; None: all threads
    locally, 1 CPU per Ray task): give the same value to both executors for bit-identical numbers.
    ``processes_per_trial`` > 1 trains each trial
    data-parallel under torchrun with the bundle's ``multi_gpu_train.yaml`` (one GPU per process: give as many
    ``gpus_per_trial``; ``cpus_per_trial`` threads are shared among the processes).

    ``early_stop`` (default) makes each stage a successive-halving bracket (:mod:`._rungs`): rungs at
    ``min_epochs`` (default ``epochs // eta**2``), x ``eta``, ..., ``epochs``; the top ``1/eta`` continue from
    their checkpoints. The probe ranking (when probing) orders the candidates and breaks rung ties; it discards
    none unless ``probe_top_m`` is given. ``budget_epochs`` / ``budget_device_hours`` cap the search's cost over
    all its runs (a re-run with a larger budget continues). The picks: ``TTL-1`` / ``TTL-2`` the best of Stage 1
    / of both stages on mean validation score; ``TTL-NI`` the cheapest fully trained cut non-inferior at
    ``margin`` (default :data:`medtl3d.stats.DEFAULT_MARGINS` for the key metric) to ``noninferior_to``:
    ``best`` (the best fully trained candidate) or ``full`` (FTL).
    """
    start = time.perf_counter()
    out = Path(output_dir).resolve()
    checked = check_search_options(
        strategies=strategies, references=references, seeds=seeds, probe_top_m=probe_top_m,
        probe_rank_by=probe_rank_by, processes_per_trial=processes_per_trial, gpus_per_trial=gpus_per_trial,
        noninferior_to=noninferior_to, margin=margin, budget_epochs=budget_epochs,
        budget_device_hours=budget_device_hours)
    strategies, references, seeds = checked["strategies"], checked["references"], checked["seeds"]
    processes_per_trial = checked["processes_per_trial"]
    overrides = dict(overrides or {})
    if n_folds is not None:
        overrides["n_folds"] = int(n_folds)
    task = BundleTask(bundle_dir, overrides, out)
    if processes_per_trial > 1 and not (task.dir / "configs" / "multi_gpu_train.yaml").is_file():
        raise SearchError(f"processes_per_trial={processes_per_trial}: bundle {task.name} has no "
                          "configs/multi_gpu_train.yaml to train data-parallel with")
    folds = list(range(max(task.n_folds, 1)))
    max_epochs = int(task.parser["epochs"])
    rungs = rung_epochs(max_epochs, min_epochs, eta) if early_stop else [max_epochs]
    if len(rungs) > 1 and processes_per_trial > 1:
        raise SearchError("early stopping pauses trials in this process: it does not reach torchrun's ranks; "
                          "use processes_per_trial=1 or early_stop=False")
    body = task.backbone()
    plan1 = {s: stage1_cuts(body, s, cuts) for s in strategies}
    for reference in references:
        task.check_strategy(reference, None)
    for strategy, points in plan1.items():
        task.check_strategy(strategy, points[0].name)
    task.check_cost_input()  # the cost step runs after every trial: its input must fit now
    split = task.split(0)  # a k the data cannot support stops here (data resolved now), before anything trains
    probing = probe or probe_top_m is not None
    config = {"bundle": task.name, "bundle_configs": configs_hash(task),
              "overrides": fingerprinted_overrides(task.overrides), "data": task.data_hash(),
              "backbone": task.backbone_name, "strategies": strategies,
              "references": references, "cuts": cuts if isinstance(cuts, str) else list(cuts), "stage2": stage2,
              "neighbourhood": neighbourhood, "folds": folds, "seeds": seeds, "probe": probing,
              "probe_top_m": probe_top_m, "probe_rank_by": probe_rank_by, "evaluate_test": evaluate_test,
              # a different number of ranks trains on different batches (absent when 1: older stores stay valid)
              **({"processes_per_trial": processes_per_trial} if processes_per_trial > 1 else {})}
    store = ResultsStore(out / "trials.jsonl", config)

    probes: list[dict] = []
    if probing:
        saved = next(store.of_kind("probes"), None)
        if saved is None:
            print("medtl3d search: probing frozen pretrained features at every cut point", flush=True)
            # one probe per unit, named by its block cut point where it has one (later entries win)
            unique = sorted({c.unit: c for c in sorted(body.cut_points, key=lambda c: c.level == "block")}.values(),
                            key=lambda c: c.unit)
            saved = {"kind": "probes", "rows": probe_ranking(task, unique, folds, out / "probe_cache")}
            store.add(saved)
        probes = saved["rows"]
        if probe_top_m is not None:
            score = {r["unit"]: r[f"{probe_rank_by}_auroc"] for r in probes}
            for strategy, points in plan1.items():
                top = sorted(points, key=lambda c: -score.get(c.unit, -math.inf))[:probe_top_m]
                plan1[strategy] = sorted(top, key=lambda c: c.unit)

    prior = {r["unit"]: -r[f"{probe_rank_by}_auroc"] for r in probes if not math.isnan(r[f"{probe_rank_by}_auroc"])}

    def ordered(candidates) -> list[Candidate]:
        """A bracket's prior order: best probe score first when probing, else cheaper (earlier unit) first."""
        return sorted(candidates, key=lambda c: (prior.get(c.unit, math.inf), c.unit))

    runner = make_executor(executor, address=ray_address, num_cpus=ray_num_cpus, gpus_per_trial=gpus_per_trial)
    search = StageRunner(task, store, runner,
                         folds, seeds, out, threads=cpus_per_trial, processes=processes_per_trial,
                         evaluate_test=evaluate_test, keep_checkpoints=keep_checkpoints, rungs=rungs, eta=eta,
                         budget=Budget(budget_epochs, budget_device_hours))
    stage1 = [Candidate(r, None, 1) for r in references] + \
        ordered(c for s, points in plan1.items() for c in candidates_for(s, points, 1))
    search.run(stage1, "stage 1 (block cut points)" if cuts == "block" else "stage 1")
    rows1 = search.aggregate(stage1)
    key_metric = next((r["key_metric"] for r in rows1 if r["key_metric"]), None)
    if key_metric is None:
        raise SearchError(f"budget {search.budget} spent before any trial of this search finished")
    metric = f"val_{key_metric}_mean"
    best1 = {s: _best([r for r in rows1 if r["strategy"] == s], metric) for s in strategies}

    stage2_candidates: list[Candidate] = []
    if stage2:
        for strategy, row in best1.items():
            if row is None:
                continue
            evaluated = {c.unit for c in plan1[strategy]}
            new = candidates_for(strategy, stage2_cuts(body, strategy, row["cut"], evaluated, neighbourhood), 2)
            near = {c.unit for c in applicable_cuts(body, strategy, neighbourhood_cuts(body, row["cut"],
                                                                                        neighbourhood))}
            stage2_candidates += new
            # the bracket: the new cut points and the Stage 1 ones among them (trained epochs are reused)
            search.run(ordered([*new, *(c for c in stage1 if c.strategy == strategy and c.unit in near)]),
                       f"stage 2 {SHORT_NAMES[strategy]} (cut points within {neighbourhood} block(s) of "
                       f"{row['cut']})")
    rows = rows1 + search.aggregate(stage2_candidates)
    for row in rows:
        row.setdefault(metric, math.nan)
        row.setdefault(f"val_{key_metric}_std", math.nan)

    picks = {"FTL": "full"}
    for strategy in strategies:
        short = SHORT_NAMES[strategy]
        if best1[strategy] is not None:
            picks[f"{short}-1"] = best1[strategy]["label"]
        best2 = _best([r for r in rows if r["strategy"] == strategy], metric)
        if stage2 and best2 is not None:
            picks[f"{short}-2"] = best2["label"]
    add_costs(task, store, rows, strategies, efficiency_runs, efficiency_warmup)
    margin = margin if margin is not None else DEFAULT_MARGINS.get(key_metric, 0.02)
    chosen = annotate(rows, {r["label"]: search.records(c) for r, c in zip(rows, [*stage1, *stage2_candidates])},
                      key_metric, margin=margin, reference=noninferior_to, n_train=len(split["train"]),
                      n_test=len(split["val"]), strategies=strategies)
    picks.update({f"{SHORT_NAMES[s]}-NI": label for s, label in chosen.items()})
    for row in rows:
        row["pick"] = ", ".join(name for name, label in picks.items() if label == row["label"])
    correlations = _add_probes(rows, probes, strategies, metric)
    seconds = time.perf_counter() - start
    store.add({"kind": "run", "seconds": round(seconds, 3), "trained": search.trained})
    cost = _cost_summary(store, body, strategies, references, len(folds) * len(seeds), max_epochs)
    metadata = {**config, "key_metric": key_metric, "n_folds": len(folds), "executor": runner.name,
                "trials_total": sum(r["n"] for r in rows), "trained_this_run": search.trained,
                "reused": search.reused, "spearman": correlations, "rungs": rungs, "eta": eta, "margin": margin,
                "noninferior_to": noninferior_to, "budget": {"epochs": budget_epochs,
                                                             "device_hours": budget_device_hours},
                "budget_reached": search.budget_reached, "cost": cost}
    paths = write_search_report(out, rows, picks, metadata, key_metric)
    print(f"medtl3d search: {search.trained} trial run(s) trained ({search.epochs_trained} epochs), "
          f"{search.reused} reused, {seconds / 60:.1f} min; search total {cost['epochs']} epochs = "
          f"{cost['epochs_fraction']:.0%} of exhaustive; picks: " + ", ".join(f"{k}={v}" for k, v in picks.items())
          + f"; report: {paths['md']}", flush=True)
    return SearchResult(rows, picks, probes, search.trained, search.reused, seconds, cost, paths)


class CutoffSearch:
    """The cutoff search as a bundle component: ``search.yaml`` builds it from its ids and runs ``$@search.run()``.

    The options are :func:`run_search`'s, checked here (:func:`check_search_options`), so a wrong value stops while
    the config is parsed, before any data are read; ``executor`` may be an executor component
    (``search#executor``, e.g. :func:`make_executor` or a :class:`RayExecutor`). Errors start with ``search:``,
    the component's id in the bundles."""

    def __init__(self, bundle_dir: str | Path, output_dir: str | Path, **options: Any) -> None:
        check_component_options("search", run_search, lambda given: check_search_options(**given), SearchError,
                                bundle_dir, output_dir, **options)
        self.bundle_dir, self.output_dir, self.options = bundle_dir, output_dir, options

    def run(self) -> SearchResult:
        return run_search(self.bundle_dir, self.output_dir, **self.options)


def _cost_summary(store: ResultsStore, body, strategies: Sequence[str], references: Sequence[str], runs: int,
                  max_epochs: int) -> dict:
    """What the search spent over all its runs, next to an exhaustive search's cost (every layer-level cut point
    of each strategy plus the references, every fold x seed, all epochs; its time estimated at this search's
    seconds per epoch)."""
    trials = list(store.of_kind("trial"))
    epochs = sum(r["epochs_trained"] for r in trials)
    device = sum(r["device_seconds"] for r in trials)
    candidates = len(references) + sum(len(stage1_cuts(body, s, "all")) for s in strategies)
    exhaustive = candidates * runs * max_epochs
    return {"trainings": len({r["key"] for r in trials}), "trial_runs": len(trials), "epochs": epochs,
            "device_hours": device / 3600, "wall_hours": sum(r["seconds"] for r in store.of_kind("run")) / 3600,
            "exhaustive_trainings": candidates * runs, "exhaustive_epochs": exhaustive,
            "exhaustive_device_hours_estimate": exhaustive * device / epochs / 3600 if epochs else math.nan,
            "epochs_fraction": epochs / exhaustive}


def add_costs(task: BundleTask, store: ResultsStore, rows: list[dict], strategies: Sequence[str], runs: int,
              warmup: int) -> None:
    """Params / MACs / latency of every candidate (measured once per strategy and cut set, kept in the store)."""
    for strategy in strategies:
        cuts = sorted({r["cut"] for r in rows if r["strategy"] == strategy}, key=str)
        saved = next((r for r in store.of_kind("costs") if r["strategy"] == strategy and r["cuts"] == cuts), None)
        if saved is None:
            report = task.costs(strategy, cuts, runs, warmup)
            measured = [{"cut": None if row.is_full else row.cut, "params_m": row.params_m, "macs_g": row.macs_g,
                         "latency_ms": row.latency_median_ms, "params_ratio": row.params_ratio,
                         "macs_ratio": row.macs_ratio, "latency_ratio": row.latency_ratio}
                        for row in report.rows if row.batch == 1]
            saved = {"kind": "costs", "strategy": strategy, "cuts": cuts, "rows": measured}
            store.add(saved)
        by_cut = {m["cut"]: m for m in saved["rows"]}
        for row in rows:
            source = by_cut.get(row["cut"]) if row["strategy"] == strategy else (
                by_cut.get(None) if row["cut"] is None else None)
            if source is not None:
                row.update({k: v for k, v in source.items() if k != "cut"})
    for row in rows:
        for key in ("params_m", "macs_g", "latency_ms", "params_ratio", "macs_ratio", "latency_ratio"):
            row.setdefault(key, None)


def _add_probes(rows: list[dict], probes: Sequence[dict], strategies: Sequence[str], metric: str) -> dict:
    """Probe scores on each candidate's row and, per strategy, their Spearman correlation with ``metric``."""
    if not probes:
        return {}
    by_unit = {p["unit"]: p for p in probes}
    for row in rows:
        probe = by_unit.get(row["unit"]) if row["cut"] is not None else None
        for name in PROBES:
            row[f"probe_{name}_auroc"] = probe[f"{name}_auroc"] if probe else None
    correlations = {}
    for strategy in strategies:
        chosen = [r for r in rows if r["strategy"] == strategy and r.get("probe_linear_auroc") is not None]
        correlations[strategy] = {name: spearman([r[f"probe_{name}_auroc"] for r in chosen],
                                                 [r[metric] for r in chosen]) for name in PROBES}
    return correlations
