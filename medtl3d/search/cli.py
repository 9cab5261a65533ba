"""``medtl3d search``: the hierarchical cutoff search of a bundle from the command line.

Example: ``medtl3d search --bundle bundles/cxr_classification --strategies truncate,lwft --folds 5 --seeds 3
--set backbone=resnet50 --set weights=imagenet --set epochs=18 --budget 40h``. Trials stop early by successive
halving (``--eta``, ``--min-epochs``; ``--no-early-stop`` trains every one to the end). Exit status 0 on success,
2 on bad input (one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.presets import parse_preset_options
from ..errors import Medtl3dError, SearchError
from ._search import run_search


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _budget(text: str | None) -> dict:
    """``--budget``: ``N`` or ``Nepochs`` (epochs summed over trials), ``Xh`` (device-hours)."""
    if text is None:
        return {}
    value = text.strip().lower()
    unit = "device_hours" if value.endswith("h") else "epochs"
    number = value.removesuffix("h") if unit == "device_hours" else value.removesuffix("epochs")
    try:
        return {f"budget_{unit}": float(number)}
    except ValueError:
        raise SearchError(f"--budget {text!r}: give epochs (e.g. 300 or 300epochs) or device-hours (e.g. 2.5h)") \
            from None


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
    search.add_argument("--probe-top-m", "--probe-top", type=int,
                        help="stage 1 only on the top-m block cuts by probe score (otherwise the probes only order "
                             "the candidates)")
    search.add_argument("--probe-rank-by", default="linear", choices=("linear", "knn"))
    search.add_argument("--no-test", action="store_true", help="do not score trials on the test split")
    search.add_argument("--no-early-stop", action="store_true", help="train every trial to the last epoch")
    search.add_argument("--eta", type=int, default=3, help="successive halving: keep the top 1/eta at each rung "
                                                          "(default 3)")
    search.add_argument("--min-epochs", type=int, help="first rung in epochs (default epochs // eta^2, at least 1)")
    search.add_argument("--budget", help="cap on the search's cost: epochs (300, 300epochs) or device-hours (2.5h)")
    search.add_argument("--margin", type=float,
                        help="non-inferiority margin of the key metric (default 0.02 AUROC, 0.01 Dice)")
    search.add_argument("--noninferior-to", default="best", choices=("best", "full"),
                        help="the non-inferior pick's reference: the best candidate (default) or FTL")
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
                   keep_checkpoints=args.keep_checkpoints, early_stop=not args.no_early_stop, eta=args.eta,
                   min_epochs=args.min_epochs, margin=args.margin, noninferior_to=args.noninferior_to,
                   **_budget(args.budget))
    except Medtl3dError as exc:
        print(f"medtl3d search: error: {exc}", file=sys.stderr)
        return 2
    return 0
