"""The seed papers' headline comparisons as ``medtl3d study`` runs, for ``docs/study_reproduction.md``.

Tasks: ``covid`` (real chest X-rays of ``../shared/data/cxr_covid_classification``: COVID-19 vs every other labelled
finding, grouped by patient; a balanced subset reduced once to ``--size`` px, as ``scripts/bench_search.py`` builds
it) and ``lungs`` (``../shared/data/cxr_lung_segmentation``: lung masks, Dice, patients from the source metadata).
The phantom task is ``scripts/demo.py``. ``--scale cpu`` is the small run the page reports; ``--scale gpu`` the
full-scale settings it recommends (all cases, 224 px, 5 folds x 3 seeds, every block cut, ST, TransFusion, LWFT).

    python scripts/study_reproduction.py covid --output outputs/study_covid
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LUNGS = REPO.parent / "shared" / "data" / "cxr_lung_segmentation"

# (bundle, study options, bundle overrides) per task and scale
SCALES = {
    "cpu": {"covid": ({"strategies": ["full", "truncate"], "cuts": ["stage5"], "n_folds": 3, "seeds": 1},
                      {"image_size": 64, "epochs": 6, "batch_size": 16, "lr": 3e-4}),
            "lungs": ({"strategies": ["full", "truncate"], "cuts": ["stage5"], "n_folds": 3, "seeds": 1},
                      {"image_size": 96, "epochs": 6, "batch_size": 8, "lr": 2e-3})},
    "gpu": {"covid": ({"strategies": ["full", "stats", "truncate", "transfusion", "lwft"], "cuts": "block",
                       "n_folds": 5, "seeds": 3}, {"image_size": 224, "epochs": 30, "batch_size": 32, "lr": 3e-4}),
            "lungs": ({"strategies": ["full", "stats", "truncate"], "cuts": "block", "n_folds": 5, "seeds": 3},
                      {"image_size": 256, "epochs": 60, "batch_size": 16, "lr": 2e-3})},
}
CASES = {"cpu": 160, "gpu": None}  # COVID images (balanced); None: every labelled one


def lungs_datalist(folder: Path) -> Path:
    """``index.csv`` with each X-ray's patient (several X-rays per patient) from the source metadata."""
    if not LUNGS.is_dir():
        raise SystemExit(f"study_reproduction: task lungs needs {LUNGS}")
    patient = {row["filename"].rsplit(".", 1)[0]: row["patientid"]
               for row in csv.DictReader(open(LUNGS / "source_metadata.csv", newline=""))}
    path = folder / "lungs.csv"
    folder.mkdir(parents=True, exist_ok=True)
    with open(LUNGS / "index.csv", newline="") as src, open(path, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "mask", "patient"])
        for row in csv.DictReader(src):
            writer.writerow([LUNGS / row["image"], LUNGS / row["mask"], patient[Path(row["image"]).stem]])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("covid", "lungs"))
    parser.add_argument("--output", required=True)
    parser.add_argument("--scale", default="cpu", choices=tuple(SCALES))
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_search import _covid_datalist

    from medtl3d.study import run_study

    options, overrides = SCALES[args.scale][args.task]
    out = Path(args.output)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    if args.task == "covid":
        bundle, datalist = "cxr_classification", _covid_datalist(data, CASES[args.scale], overrides["image_size"])
    else:
        bundle, datalist = "cxr_lung_segmentation", lungs_datalist(data)
        overrides = {**overrides, "label_field": "mask"}
    overrides = {**overrides, "datalist": str(datalist), "backbone": "mobilenet_v2", "weights": "mobilenet_v2.imagenet",
                 "test_fraction": 0.25, "amp": args.scale == "gpu", "tensorboard": False,
                 **({"device": "cpu"} if args.scale == "cpu" else {})}
    result = run_study(REPO / "bundles" / bundle, out / "study", overrides=overrides,
                       weights=["pretrained", "random"], **options)
    print(result.paths["md"].read_text())


if __name__ == "__main__":
    main()
