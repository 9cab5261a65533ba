"""The training engine on the phantom datasets, read through medtl3d's readers and presets, in 2D (CXR opacity) and
3D (CTPA emboli, window-level training with series-level evaluation): a few CPU epochs make the training loss fall,
the held-out AUROC is a finite number in [0, 1], and a fresh evaluation of the final weights agrees with the
engine's own last validation.

The training is that of ``scripts/bench_learning.py`` (same function, the tests' seed 0). How high the held-out AUROC
gets is a learned quality that depends on the seed, the thread count, BLAS and the CPU; that script measures it over
seeds and thread counts. Here it is asserted only in 3D, where the measured margin is wide (issue 14, see each test).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from medtl3d.engine import evaluate


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py


@pytest.fixture(scope="module")
def bench():
    """scripts/bench_learning.py as a module."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_learning.py"
    spec = importlib.util.spec_from_file_location("bench_learning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(result, model, data, series_key=None):
    """Loss falls below 0.8 of its first epoch's; the best epoch's held-out AUROC (the checkpoint kept) is finite,
    and a fresh evaluation of the final weights is close to the engine's own last validation."""
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] * 0.8, losses
    assert result.key_metric == "auroc" and math.isfinite(result.best_metric), result.history
    assert 0.0 <= result.best_metric <= 1.0, result.history
    metrics = evaluate(model, data, task="binary", series_key=series_key).metrics
    assert metrics["auroc"] == pytest.approx(result.history[-1]["val_auroc"], abs=1e-6)
    return result.best_metric


def test_engine_trains_on_cxr_phantoms_2d(bench, tmp_path):
    """Measured (seeds 0-1, 1 thread; the rest not measured, each run took 1-4 min on a busy 2-CPU machine): last
    epoch's loss 0.27-0.36 of the first (asserted < 0.8); held-out AUROC 0.871-0.906, too close to the 0.8 that was
    asserted, so it moved to ``scripts/bench_learning.py --studies engine_cxr2d``."""
    result, model, val_data, series_key = bench.engine_phantoms("engine_cxr2d", 0, tmp_path)
    print("2D phantom AUROC", _check(result, model, val_data, series_key))


def test_engine_learns_ctpa_phantoms_3d(bench, tmp_path):
    """Also the series-level held-out AUROC above 0.8: a wide margin here. Measured for seeds 0-2 with 1 thread and
    seed 0 with 2 (seeds 3-4 not measured: 1.5-5 min a run on a busy 2-CPU machine): AUROC 0.933-0.997 (seed 0 the
    same for both thread counts), last epoch's loss 0.08-0.19 of the first."""
    result, model, val_data, series_key = bench.engine_phantoms("engine_ctpa3d", 0, tmp_path)
    auroc = _check(result, model, val_data, series_key)
    print("3D phantom series AUROC", auroc)
    assert auroc > 0.8, result.history
