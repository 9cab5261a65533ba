"""The training engine on the phantom datasets, read through medtl3d's readers and presets: a few CPU epochs make
the training loss fall and the held-out AUROC rise above 0.8, in 2D (CXR opacity) and 3D (CTPA emboli, window-level
training with series-level evaluation)."""

from __future__ import annotations

import pytest
import torch

from medtl3d.backbones import create_backbone
from medtl3d.data.datalists import holdout_split, load_datalist
from medtl3d.data.phantoms import generate_ctpa, generate_cxr
from medtl3d.data.presets import preset
from medtl3d.data.windows import WindowDataset
from medtl3d.engine import evaluate, train
from medtl3d.strategies import apply_strategy
from medtl3d.workflows import image_dataset


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py


def _small_model(spatial_dims: int, cut: str, width_factor: float):
    body = create_backbone("cbr_tiny", spatial_dims=spatial_dims, in_channels=1, slim_from=0,
                           width_factor=width_factor)
    return apply_strategy(body, "truncate", 1, cut=cut)


def _check(result, model, data, series_key=None):
    """Loss falls; the held-out AUROC of the best epoch (the checkpoint kept) is above 0.8, and a fresh
    evaluation of the final weights is close to the engine's own last validation."""
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] * 0.8, losses
    assert result.key_metric == "auroc" and result.best_metric > 0.8, result.history
    metrics = evaluate(model, data, task="binary", series_key=series_key).metrics
    assert metrics["auroc"] == pytest.approx(result.history[-1]["val_auroc"], abs=1e-6)
    return result.best_metric


def test_engine_learns_cxr_phantoms_2d(tmp_path):
    items = load_datalist(generate_cxr(tmp_path / "cxr", 320, size=64, seed=0), task="classification",
                          num_classes=1)
    train_items, val_items = holdout_split(items, 0.25, seed=0)
    transform = preset("cxr", train=False, size=64)
    train_data = image_dataset(train_items, transform, task="binary")
    val_data = image_dataset(val_items, transform, task="binary")
    torch.manual_seed(0)
    model = _small_model(2, "cbr3", 4)
    result = train(model, train_data, val_data, task="binary", output_dir=tmp_path / "run", epochs=14, lr=3e-3,
                   batch_size=16, progress=False, tensorboard=False)
    print("2D phantom AUROC", _check(result, model, val_data))


def test_engine_learns_ctpa_phantoms_3d(tmp_path):
    items = load_datalist(generate_ctpa(tmp_path / "ctpa", 160, shape=(16, 32, 32), spacing=(4.0, 2.0, 2.0),
                                        seed=0), task="classification", num_classes=1)
    train_items, val_items = holdout_split(items, 0.25, seed=0)
    transform = preset("ct", train=False, size=32)
    train_data = WindowDataset(train_items, transform, num_slices=16)
    val_data = WindowDataset(val_items, transform, num_slices=16)
    torch.manual_seed(0)
    model = _small_model(3, "cbr3", 8)
    result = train(model, train_data, val_data, task="binary", output_dir=tmp_path / "run", epochs=12, lr=3e-3,
                   batch_size=8, progress=False, tensorboard=False, series_key="series")
    print("3D phantom series AUROC", _check(result, model, val_data, series_key="series"))
