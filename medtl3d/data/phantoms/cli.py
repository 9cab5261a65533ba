"""``medtl3d phantoms``: write one of the synthetic datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .ctpa import generate_ctpa
from .cxr import generate_cxr
from .histology import generate_histology


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.lower().replace(",", "x").split("x"))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.lower().replace(",", "x").split("x"))


def add_parser(subparsers) -> None:
    """Register ``medtl3d phantoms {ctpa,cxr,histology}``."""
    p = subparsers.add_parser("phantoms", help="write synthetic CTPA / CXR / H&E phantoms with a datalist")
    p.add_argument("kind", choices=("ctpa", "cxr", "histology"))
    p.add_argument("--output", required=True, help="folder to write into")
    p.add_argument("--n", type=int, help="number of cases (default: 16 CTPA, 32 CXR / histology)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positive-fraction", type=float, default=0.5)
    p.add_argument("--fmt", choices=("nifti", "dicom"), default="nifti", help="CTPA image format")
    p.add_argument("--shape", type=_ints, default=(32, 64, 64), help="CTPA slices x rows x cols (default 32x64x64)")
    p.add_argument("--spacing", type=_floats, default=(2.0, 1.0, 1.0), help="CTPA mm, slices x rows x cols")
    p.add_argument("--series-per-study", type=int, default=1,
                   help="CTPA series per study (default 1; > 1 adds the datalist field 'study')")
    p.add_argument("--size", type=int, default=128, help="CXR / histology image side (default 128)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Generate the phantoms ``args`` ask for and print the datalist path; returns the exit status."""
    common = {"positive_fraction": args.positive_fraction, "seed": args.seed}
    generators: dict[str, Callable[[], Path]] = {
        "ctpa": lambda: generate_ctpa(args.output, args.n or 16, shape=args.shape, spacing=args.spacing,
                                      fmt=args.fmt, series_per_study=args.series_per_study, **common),
        "cxr": lambda: generate_cxr(args.output, args.n or 32, size=args.size, **common),
        "histology": lambda: generate_histology(args.output, args.n or 32, size=args.size, **common),
    }
    print(generators[args.kind]())
    return 0
