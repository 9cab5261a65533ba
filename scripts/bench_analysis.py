"""Benchmark: streaming (exact) linear / debiased CKA against torch-cka and a plain full-batch computation.

Two models (a random backbone and a copy with perturbed weights) see the same random images; every method builds
the layer x layer CKA matrix over the block cut points with flattened activations. Each method runs in its own
subprocess so that its peak resident memory (sampled every 2 ms, minus the RSS before the method started) is its
own. Reported per method: wall and CPU time (forward passes included; the ``forward only`` row is that share,
``cka_cpu_s`` the CPU time beyond it; CPU time, summed over threads, is the steadier number on a shared machine),
peak memory, the largest deviation from the full-batch float64 value of the same CKA variant, and the NaN count.

- ``full batch``: all flattened activations kept, float64 Gram matrices (n x n), biased and unbiased HSIC;
- ``exact stream (auto)``: :class:`medtl3d.analysis.similarity.MinibatchCKA` (any batch split gives the
  full-batch value), each layer pair accumulated in Gram space (rows kept, ``n x n``) or feature space
  (``p_a x p_b`` statistics), whichever is smaller; ``exact stream (gram)`` / ``exact stream (features)`` force
  one space for every pair, to show what the choice saves;
- ``minibatch stream``: the same class with ``estimator="minibatch"`` (Nguyen et al. 2021 per-batch unbiased HSIC
  averaged; float64);
- ``torch-cka``: PyPI ``torch-cka`` (the same per-batch estimator in float32 with forward hooks), when installed.

Usage: ``python scripts/bench_analysis.py [--quick] [--output DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

EXACT = {"exact stream (auto)": "auto", "exact stream (gram)": "gram", "exact stream (features)": "features"}
METHODS = ("forward only", "full batch", *EXACT, "minibatch stream", "torch-cka")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sample the process's resident memory in a thread; ``peak`` is the largest increase over the start."""

    def __enter__(self) -> "PeakRSS":
        self.start, self.peak, self._running = _rss_bytes(), 0, True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss_bytes() - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() - self.start)


def build(args):
    """The two models (random, and perturbed by 0.5 std per tensor), the images and the cut points."""
    from medtl3d.backbones import create_backbone

    torch.manual_seed(0)
    model_a = create_backbone(args.backbone, spatial_dims=2, in_channels=3).eval()
    model_b = copy.deepcopy(model_a)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model_b.parameters():
            if p.numel() > 1:
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=generator))
    images = torch.randn(args.n, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
    cuts = list(dict.fromkeys(c.name for c in model_a.cut_points_at("block")))
    return model_a, model_b, images, cuts


def run_method(method: str, args) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    from medtl3d.analysis.activations import iter_paired_activations
    from medtl3d.analysis.similarity import MinibatchCKA, hsic_gram

    model_a, model_b, images, cuts = build(args)
    result: dict = {}
    with PeakRSS() as memory:
        start, start_cpu = time.perf_counter(), time.process_time()
        pairs = lambda: iter_paired_activations(model_a, model_b, images, cuts, policy="flatten",  # noqa: E731
                                                batch_size=args.batch)
        if method == "forward only":
            for _ in pairs():
                pass
        elif method == "full batch":
            parts_a, parts_b = {c: [] for c in cuts}, {c: [] for c in cuts}
            for acts_a, acts_b in pairs():
                for c in cuts:
                    parts_a[c].append(acts_a[c].double())
                    parts_b[c].append(acts_b[c].double())
            grams_a = {c: (lambda x: x @ x.T)(torch.cat(parts_a[c])) for c in cuts}
            grams_b = {c: (lambda x: x @ x.T)(torch.cat(parts_b[c])) for c in cuts}
            for variant, debiased in (("debiased", True), ("linear", False)):
                self_a = {c: hsic_gram(k, k, debiased) for c, k in grams_a.items()}
                self_b = {c: hsic_gram(k, k, debiased) for c, k in grams_b.items()}
                result[variant] = [[hsic_gram(grams_a[i], grams_b[j], debiased) / np.sqrt(self_a[i] * self_b[j])
                                    for j in cuts] for i in cuts]
        elif method in EXACT or method == "minibatch stream":
            estimator = "exact" if method in EXACT else "minibatch"
            variants = (("debiased", True), ("linear", False)) if estimator == "exact" else (("debiased", True),)
            for variant, debiased in variants:  # one pass per variant, so each row times one matrix
                accumulator = MinibatchCKA(debiased=debiased, estimator=estimator, max_bytes=float("inf"),
                                           accumulation=EXACT.get(method, "auto"))
                for acts_a, acts_b in pairs():
                    accumulator.update(acts_a, acts_b)
                result[variant] = accumulator.compute().tolist()
                result[f"{variant}_time_s"] = time.perf_counter() - start
                result[f"{variant}_cpu_s"] = time.process_time() - start_cpu
                start, start_cpu = time.perf_counter(), time.process_time()
        elif method == "torch-cka":
            from torch_cka import CKA

            modules = [model_a.cut_point(c).module for c in cuts]
            cka = CKA(model_a, model_b, model1_name="A", model2_name="B", model1_layers=modules,
                      model2_layers=modules)
            loader = DataLoader(TensorDataset(images), batch_size=args.batch)
            with torch.no_grad():
                cka.compare(loader, loader)
            result["debiased"] = cka.export()["CKA"].double().tolist()
        result.setdefault("time_s", time.perf_counter() - start)
        result.setdefault("cpu_s", time.process_time() - start_cpu)
    result["peak_mib"] = memory.peak / 2**20
    return result


def child(method: str, args) -> None:
    try:
        print(json.dumps(run_method(method, args)))
    except Exception as error:  # reported in the table, e.g. a package that fails on this torch
        print(json.dumps({"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (256 images of 16 px)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n", type=int, default=1024, help="number of images")
    parser.add_argument("--size", type=int, default=32, help="image side (px)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, help="write bench_analysis.{csv,json,md} here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.size, args.batch = 256, 16, 32
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return 0

    forwarded = ["--backbone", args.backbone, "--n", str(args.n), "--size", str(args.size), "--batch",
                 str(args.batch), "--threads", str(args.threads)]
    results = {}
    for method in METHODS:
        done = subprocess.run([sys.executable, __file__, "--child", method, *forwarded], capture_output=True,
                              text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        results[method] = json.loads(lines[-1]) if lines else {"error": (done.stderr.strip().splitlines() or
                                                                         ["no output"])[-1][:200]}
    reference = results["full batch"]
    forward_cpu_s = results["forward only"].get("cpu_s")
    rows = []
    for method in METHODS:
        result = results[method]
        if "error" in result:
            rows.append({"method": method, "cka": "-", "note": f"failed: {result['error']}"})
            continue
        variants = [v for v in ("debiased", "linear") if v in result] or [None]
        for variant in variants:
            row = {"method": method, "cka": variant or "-",
                   "time_s": result.get(f"{variant}_time_s", result["time_s"]),
                   "cpu_s": result.get(f"{variant}_cpu_s", result["cpu_s"]), "peak_MiB": result["peak_mib"]}
            if forward_cpu_s and method != "forward only":
                row["cka_cpu_s"] = row["cpu_s"] - forward_cpu_s  # the similarity's own share beyond the forward passes
            if variant is not None:
                matrix = np.asarray(result[variant], dtype=float)
                row["nan"] = int(np.isnan(matrix).sum())
                if "error" not in reference:
                    row["max_abs_diff_vs_full"] = float(np.nanmax(np.abs(matrix - np.asarray(reference[variant]))))
            row["note"] = {"full batch": "float64 Gram (n x n), the reference",
                           "exact stream (auto)": "per pair the smaller of Gram / feature space",
                           "exact stream (gram)": "rows kept, n x n Gram matrices",
                           "exact stream (features)": "feature-space statistics, O(p_a p_b) per pair",
                           "minibatch stream": "per-batch unbiased HSIC averaged (Nguyen et al.)",
                           "torch-cka": "torch-cka 0.21 per-batch estimator, float32",
                           "forward only": "both models' forward passes"}[method]
            rows.append(row)

    from medtl3d.reporting import markdown_table, write_table

    columns = ["method", "cka", "time_s", "cpu_s", "cka_cpu_s", "peak_MiB", "max_abs_diff_vs_full", "nan", "note"]
    title = (f"CKA of {args.backbone} vs perturbed copy, {len(build(args)[3])} block cuts, flattened, n={args.n}, "
             f"{args.size}px, batch {args.batch}, {args.threads} threads")
    print(markdown_table(rows, columns, title))
    if args.output:
        write_table(args.output, "bench_analysis", rows, metadata=vars(args) | {"output": str(args.output)},
                    title=title, columns=columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
