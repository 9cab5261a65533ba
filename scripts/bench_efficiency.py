"""The standard efficiency report set, printed as Markdown tables.

ResNet-50 and DenseNet-121 at 3x224x224, ResNeXt3D-101 at 3x16x112x112, PENet at 1x24x192x192 and I3D at
3x16x224x224; every block cut point; truncate and transfusion. ``--quick`` is for a CPU: few runs, and the 3D
models at a quarter of their spatial size. Backbones not registered (yet) are skipped with a note.
"""

from __future__ import annotations

import argparse

from medtl3d.backbones import list_backbones
from medtl3d.efficiency import efficiency_report

STANDARD_SET = [
    ("resnet50", "3x224x224"),
    ("densenet121", "3x224x224"),
    ("resnext3d_101", "3x16x112x112"),
    ("penet", "1x24x192x192"),
    ("i3d", "3x16x224x224"),
]
QUICK_SHAPES = {"resnext3d_101": "3x16x32x32", "penet": "1x16x48x48", "i3d": "3x8x56x56"}
STRATEGIES = ("truncate", "transfusion")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 3 runs, 1 warm-up, smaller 3D inputs")
    parser.add_argument("--only", help="comma-separated subset of backbones")
    parser.add_argument("--output", help="also write each report's CSV/JSON/MD/PNG under this directory")
    args = parser.parse_args()
    runs, warmup = (3, 1) if args.quick else (args.runs, args.warmup)
    wanted = set(args.only.split(",")) if args.only else None
    for name, shape in STANDARD_SET:
        if wanted is not None and name not in wanted:
            continue
        if name not in list_backbones():
            print(f"_{name}: not registered, skipped_\n")
            continue
        shape = QUICK_SHAPES.get(name, shape) if args.quick else shape
        for strategy in STRATEGIES:
            report = efficiency_report(name, strategy, "block", shape, device=args.device, runs=runs, warmup=warmup,
                                       output_dir=args.output)
            print(report.to_markdown())


if __name__ == "__main__":
    main()
