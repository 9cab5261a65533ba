"""``medtl3d study``: the five claims of the seed papers on a bundle's data (see :mod:`medtl3d.study`).

Example: ``medtl3d study --bundle bundles/cxr_classification --folds 3 --seeds 2 --set backbone=mobilenet_v2
--set weights=mobilenet_v2.imagenet --set epochs=10``. Re-running with the same options trains nothing new.
Exit status 0 on success, 2 on bad input (one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.presets import parse_preset_options
from ..errors import Medtl3dError
from ._study import run_study


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(commands) -> None:
    study = commands.add_parser("study", help="the seed papers' claims (WT vs RI, truncation, TF/LWFT, CKA, "
                                              "convergence) with verdicts on a bundle's data",
                                description=__doc__.splitlines()[0])
    study.add_argument("--bundle", required=True, help="bundle directory (bundles/<name>)")
    study.add_argument("--output", help="study folder: results store, trials, report (default <bundle>/outputs/study)")
    study.add_argument("--strategies", default="full,stats,truncate,transfusion,lwft",
                       help="comma-separated grid strategies: full (always), stats, truncate, transfusion, lwft, "
                            "partial")
    study.add_argument("--weights", default="pretrained,random",
                       help="grid weights: pretrained (the bundle's), random (RI and the cut arms' RI controls)")
    study.add_argument("--cuts", default="block",
                       help="cut points: block (default), layer, all or comma-separated names")
    study.add_argument("--folds", type=int, help="k validation folds (default: the bundle's n_folds)")
    study.add_argument("--seeds", type=int, default=2, help="seeds per fold (default 2)")
    study.add_argument("--margin", type=float, help="non-inferiority margin (default 0.02 AUROC, 0.01 Dice)")
    study.add_argument("--no-test", action="store_true", help="do not score trials on the test split")
    study.add_argument("--cka-cases", type=int, default=64, help="test cases claim 4's CKA runs on (default 64)")
    study.add_argument("--divergence-cka", type=float, default=0.5,
                       help="WT-vs-RI CKA below which claim 4 calls a depth diverged (default 0.5)")
    study.add_argument("--convergence-fraction", type=float, default=0.95,
                       help="claim 5: share of the final validation score to reach (default 0.95)")
    study.add_argument("--executor", default="local", choices=("local", "ray"))
    study.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    study.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    study.add_argument("--cpus-per-trial", type=int, help="torch threads and Ray CPUs per trial")
    study.add_argument("--gpus-per-trial", type=float, default=0, help="Ray GPUs per trial")
    study.add_argument("--processes-per-trial", type=int, default=1,
                       help="train each trial data-parallel with N torchrun processes (one GPU each; default 1)")
    study.add_argument("--efficiency-runs", type=int, default=10, help="timed runs per model for the latency column")
    study.add_argument("--set", action="append", metavar="ID=VALUE", default=[],
                       help="bundle id override shared by every trial (repeatable), e.g. --set epochs=20")


def run(args: argparse.Namespace) -> int:
    try:
        output = args.output or str(Path(args.bundle) / "outputs" / "study")
        run_study(args.bundle, output, overrides=parse_preset_options(args.set, "--set"),
                  strategies=_names(args.strategies), weights=_names(args.weights),
                  cuts=args.cuts if args.cuts in ("block", "layer", "all") else _names(args.cuts),
                  n_folds=args.folds, seeds=args.seeds, margin=args.margin, evaluate_test=not args.no_test,
                  executor=args.executor, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
                  cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                  processes_per_trial=args.processes_per_trial, efficiency_runs=args.efficiency_runs,
                  cka_cases=args.cka_cases, divergence_cka=args.divergence_cka,
                  convergence_fraction=args.convergence_fraction)
    except Medtl3dError as exc:
        print(f"medtl3d study: error: {exc}", file=sys.stderr)
        return 2
    return 0
