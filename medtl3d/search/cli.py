"""``medtl3d search``: the hierarchical cutoff search of a bundle from the command line.

Example: ``medtl3d search --bundle bundles/cxr_classification --strategies truncate,lwft --folds 5 --seeds 3
--set backbone=resnet50 --set weights=imagenet --set epochs=20``. Exit status 0 on success, 2 on bad input (one
line, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.presets import parse_preset_options
from ..errors import Medtl3dError
from ._search import run_search


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(commands) -> None:
    search = commands.add_parser("search", help="hierarchical cutoff search (TTL / TF / LWFT) of a bundle",
                                 description=__doc__.splitlines()[0])
    search.add_argument("--bundle", required=True, help="bundle directory (bundles/<name>)")
    search.add_argument("--output", help="search folder: results store, trials, report (default <bundle>/outputs/search)")
    search.add_argument("--strategies", default="truncate", help="comma-separated: truncate, transfusion, lwft, partial")
    search.add_argument("--references", default="", help="extra references besides FTL: random, linear_probe")
    search.add_argument("--cuts", default="block",
                        help="stage-1 cut points: block (default), all (exhaustive, no stage 2) or comma-separated names")
    search.add_argument("--no-stage2", action="store_true", help="stop after stage 1")
    search.add_argument("--neighbourhood", type=int, default=1, help="stage-2 width in blocks either side (default 1)")
    search.add_argument("--folds", type=int, help="k validation folds (default: the bundle's n_folds)")
    search.add_argument("--seeds", type=int, default=1, help="seeds per fold (default 1)")
    search.add_argument("--probe", action="store_true", help="rank every cut point with kNN / linear probes first")
    search.add_argument("--probe-top-m", type=int, help="stage 1 only on the top-m block cuts by probe score")
    search.add_argument("--probe-rank-by", default="linear", choices=("linear", "knn"))
    search.add_argument("--no-test", action="store_true", help="do not score trials on the test split")
    search.add_argument("--executor", default="local", choices=("local", "ray"))
    search.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    search.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    search.add_argument("--cpus-per-trial", type=int,
                        help="torch threads and Ray CPUs per trial (default: all threads locally, 1 per Ray task)")
    search.add_argument("--gpus-per-trial", type=float, default=0, help="Ray GPUs per trial")
    search.add_argument("--processes-per-trial", type=int, default=1,
                        help="train each trial data-parallel with N torchrun processes (one GPU each; default 1)")
    search.add_argument("--efficiency-runs", type=int, default=10, help="timed runs per model for the latency column")
    search.add_argument("--keep-checkpoints", action="store_true", help="keep each trial's engine checkpoints")
    search.add_argument("--set", action="append", metavar="ID=VALUE", default=[],
                        help="bundle id override shared by every trial (repeatable), e.g. --set epochs=20")


def run(args: argparse.Namespace) -> int:
    try:
        output = args.output or str(Path(args.bundle) / "outputs" / "search")
        run_search(args.bundle, output, overrides=parse_preset_options(args.set, "--set"),
                   strategies=_names(args.strategies), references=_names(args.references),
                   cuts=args.cuts if args.cuts in ("block", "layer", "all") else _names(args.cuts),
                   stage2=not args.no_stage2 and args.cuts == "block", neighbourhood=args.neighbourhood,
                   n_folds=args.folds, seeds=args.seeds, probe=args.probe, probe_top_m=args.probe_top_m,
                   probe_rank_by=args.probe_rank_by, evaluate_test=not args.no_test, executor=args.executor,
                   ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus, cpus_per_trial=args.cpus_per_trial,
                   gpus_per_trial=args.gpus_per_trial,
                   processes_per_trial=args.processes_per_trial, efficiency_runs=args.efficiency_runs,
                   keep_checkpoints=args.keep_checkpoints)
    except Medtl3dError as exc:
        print(f"medtl3d search: error: {exc}", file=sys.stderr)
        return 2
    return 0
