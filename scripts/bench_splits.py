"""Benchmark: how evenly the test hold-out keeps the classes and the intended size, over data seeds.

Compares :func:`medtl3d.data.splits.holdout_split` (one fold of scikit-learn's ``StratifiedGroupKFold``) with a
patient-level draw stratified by each patient's class (``train_test_split`` over patients, the hold-out medtl3d used
before), on the real COVID-19 chest X-ray metadata in ``../shared/data`` (531 labelled images of 311 patients; skipped
when absent) and on a constructed pathology cohort where one slide holds 28 patches, 25 of them positive. Reported
per method and data set over ``--seeds`` seeds: the test part's size as a fraction of the cases (mean, min, max), how
far its share of positives is from the overall one (mean, max), and the largest group's share of the test part.

Usage: ``python scripts/bench_splits.py [--seeds N] [--fraction F]``.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

COVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr_covid_classification" / "metadata.csv"


def patient_draw(items: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """The baseline: patients drawn by ``train_test_split``, stratified by each patient's most frequent class."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for item in items:
        votes[item["patient"]][item["label"]] += 1
    patients = list(votes)
    strata = [votes[p].most_common(1)[0][0] for p in patients]
    _, held = train_test_split(patients, test_size=fraction, random_state=seed, stratify=strata)
    held = set(held)
    return [i for i in items if i["patient"] not in held], [i for i in items if i["patient"] in held]


def cohorts() -> dict[str, list[dict]]:
    found = {}
    if COVID.is_file():
        with open(COVID, newline="") as handle:
            found["COVID-19 CXR (real)"] = [
                {"image": row["filename"], "label": int("COVID-19" in row["finding"]), "patient": row["patientid"]}
                for row in csv.DictReader(handle) if row["finding"] != "todo"]
    slides = [{"image": f"s{s}_{k}", "label": int(k < (3 if s % 3 == 0 else 1)), "patient": f"S{s}"}
              for s in range(40) for k in range(4)]  # 4 patches a slide, 1 or (every third slide) 3 positive
    slides += [{"image": f"big_{k}", "label": int(k < 25), "patient": "BIG"} for k in range(28)]
    found["slides, one of 28 patches (constructed)"] = slides
    return found


def main(argv=None) -> int:
    from medtl3d.data.splits import holdout_split, split_summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    print("| data | hold-out | test fraction mean (min-max) | positive share - overall: mean, max | "
          "largest group share max |")
    print("|---|---|---|---|---|")
    for name, items in cohorts().items():
        overall = np.mean([i["label"] for i in items])
        for method, split in (("patient draw (train_test_split)", patient_draw),
                              ("StratifiedGroupKFold fold", holdout_split)):
            sizes, gaps, shares = [], [], []
            for seed in range(args.seeds):
                _, test = split(items, args.fraction, seed=seed)
                sizes.append(len(test) / len(items))
                gaps.append(abs(np.mean([i["label"] for i in test]) - overall))
                shares.append(split_summary({"test": test})[0][0]["largest_group_share"])
            print(f"| {name} | {method} | {np.mean(sizes):.3f} ({min(sizes):.3f}-{max(sizes):.3f}) | "
                  f"{np.mean(gaps):.3f}, {max(gaps):.3f} | {max(shares):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
