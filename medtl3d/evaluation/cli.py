"""``medtl3d compare RUN_A RUN_B``: paired comparison of two evaluated runs (or arms of runs) on the same test cases.

RUN_A (candidate) and RUN_B (reference) are evaluate output folders (``outputs/eval``, or a folder holding
``eval/``), or folders whose evaluations below them form an arm of several runs (folds x seeds). Example:
``medtl3d compare runs/truncate/eval runs/full/eval --margin 0.02 --output comparison``. Exit status 0 on success,
2 on bad input (one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import Medtl3dError
from ..locking import output_lock
from ._compare import compare_runs
from ._report import comparison_lines, write_comparison


def add_parser(commands) -> None:
    compare = commands.add_parser("compare", help="paired comparison of two evaluated runs (DeLong, bootstrap, "
                                  "McNemar, non-inferiority)", description=__doc__.splitlines()[0])
    compare.add_argument("run_a", metavar="RUN_A", help="candidate: an evaluate output folder, or a folder of them")
    compare.add_argument("run_b", metavar="RUN_B", help="reference: an evaluate output folder, or a folder of them")
    compare.add_argument("--margin", type=float,
                         help="non-inferiority margin on the primary metric (default 0.02 AUROC, 0.01 Dice)")
    compare.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    compare.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    compare.add_argument("--study", action="store_true",
                         help="compare the study-level evaluations (eval/study: CTPA series aggregated to studies)")
    compare.add_argument("--output", default="comparison",
                         help="folder for comparison.csv/json/md (default ./comparison)")


def run(args: argparse.Namespace) -> int:
    try:
        comparison = compare_runs([args.run_a], [args.run_b], margin=args.margin, level=args.level,
                                  n_resamples=args.resamples, seed=args.seed, study=args.study)
        with output_lock(args.output):
            files = write_comparison(args.output, comparison)
    except Medtl3dError as err:
        print(f"medtl3d: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(comparison_lines(comparison)))
    print(f"\nmedtl3d: comparison written to {files['md']}")
    return 0
