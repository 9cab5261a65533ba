"""Benchmark: coverage of the 95% intervals of AUROC (DeLong, stratified bootstrap) on simulated data.

Binormal model: negatives ~ N(0, 1), positives ~ N(mu, 1), so the true AUROC is Phi(mu / sqrt(2)). For each true
AUROC and class size, ``--datasets`` data sets are drawn; each gets :func:`medtl3d.stats.delong_ci` and
:func:`medtl3d.stats.bootstrap_ci` (``auroc``, stratified, BCa with its percentile fallback, ``--resamples``
resamples). Reported per method: the share of intervals that contain the true AUROC (with its Monte Carlo standard
error), the mean width, how often each interval misses low / high, and the bootstrap's BCa fallbacks.

Usage: ``python scripts/bench_stats.py [--quick] [--datasets R] [--resamples B] [--output DIR]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats


def simulate(true_auc: float, per_class: int, datasets: int, resamples: int, seed: int) -> list[dict]:
    """One row per method: coverage of ``true_auc`` over ``datasets`` binormal data sets of ``per_class`` cases."""
    from medtl3d.stats import auroc, bootstrap_ci, delong_ci

    mu = math.sqrt(2.0) * stats.norm.ppf(true_auc)
    y = np.r_[np.ones(per_class, int), np.zeros(per_class, int)]
    intervals: dict[str, list[tuple[float, float]]] = {"DeLong (Wald)": [], "bootstrap BCa": []}
    fallbacks, start = 0, time.perf_counter()
    for child in np.random.SeedSequence(seed).spawn(datasets):
        rng = np.random.default_rng(child)
        scores = rng.normal(size=2 * per_class) + mu * y
        delong = delong_ci(y, scores)
        intervals["DeLong (Wald)"].append((delong.low, delong.high))
        boot = bootstrap_ci(auroc, y, scores, n_resamples=resamples, seed=rng.integers(2**32))
        intervals["bootstrap BCa"].append((boot.low, boot.high))
        fallbacks += "BCa undefined" in boot.method
    seconds = time.perf_counter() - start
    rows = []
    for method, bounds in intervals.items():
        low, high = np.array(bounds).T
        covered = (low <= true_auc) & (true_auc <= high)
        rows.append({
            "method": method, "true_auc": true_auc, "n_per_class": per_class, "datasets": datasets,
            "coverage": covered.mean(), "mc_se": math.sqrt(covered.mean() * (1 - covered.mean()) / datasets),
            "miss_low": (high < true_auc).mean(), "miss_high": (low > true_auc).mean(),
            "mean_width": (high - low).mean(),
            "note": (f"{resamples} resamples, {fallbacks} percentile fallbacks" if method.startswith("bootstrap")
                     else "auc +- 1.96 se, clipped to [0, 1]"),
            "seconds": seconds,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 data sets, 300 resamples, n=60 only")
    parser.add_argument("--datasets", type=int, default=500, help="simulated data sets per setting")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per data set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[60, 200], help="cases per class")
    parser.add_argument("--aucs", type=float, nargs="+", default=[0.8], help="true AUROCs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write bench_stats.{csv,json,md} here")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.resamples, args.sizes = 100, 300, [60]

    rows = []
    for true_auc in args.aucs:
        for per_class in args.sizes:
            rows += simulate(true_auc, per_class, args.datasets, args.resamples, args.seed)

    from medtl3d.reporting import markdown_table, write_table

    columns = ["method", "true_auc", "n_per_class", "datasets", "coverage", "mc_se", "miss_low", "miss_high",
               "mean_width", "seconds", "note"]
    title = (f"Coverage of 95% AUROC intervals, binormal data, {args.datasets} data sets per setting "
             f"(seconds: both methods together)")
    print(markdown_table(rows, columns, title))
    if args.output:
        write_table(args.output, "bench_stats", rows, metadata=vars(args) | {"output": str(args.output)},
                    title=title, columns=columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
