"""Training/evaluation engine: learning in 2D and 3D, LWFT groups, frozen units, clipping, checkpoints,
early stopping, kill-and-resume equality, series aggregation, segmentation, and errors before the first step."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from monai.data import Dataset
from torch import nn

from medtl3d.engine import evaluate, load_checkpoint, load_model, register_builder, train
from medtl3d.errors import TrainingError
from medtl3d.strategies import create_model

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "tensorboard": False}


def blob_rows(n, size, seed, amplitudes=(0.0, 1.5)):
    """Noise images; class c carries a centred blob of amplitude ``amplitudes[c]`` (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = i % len(amplitudes)
        image = torch.randn((1, *size), generator=g)
        image[(slice(None),) + tuple(slice(s // 4, s - s // 4) for s in size)] += amplitudes[label]
        rows.append({"image": image, "label": label, "id": f"case{i}"})
    return rows


def cbr(dims, num_classes=1, strategy="truncate", cut="cbr1", **kw):
    config = {"backbone": "cbr_tiny", "strategy": strategy, "cut": cut, "num_classes": num_classes,
              "spatial_dims": dims, "in_channels": 1, **kw}
    return create_model(**config), config


class Linear(nn.Module):
    """Flatten + linear: no norm layers, so its parameters are its whole state."""

    def __init__(self, features, outputs=1):
        super().__init__()
        self.fc = nn.Linear(features, outputs)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_2d_binary_learns_and_checkpoints_hold_initial_state_and_load_back(tmp_path):
    """Three epochs on centred blobs: the loss falls and the validation AUROC passes 0.8; checkpoints hold the
    initial state and load back. Margin measured for seeds 0-4 (model and data) with 1 and 2 threads, identical for
    both: AUROC 1.000 in every run, last epoch's loss 0.32-0.44 of the first."""
    torch.manual_seed(0)
    model, config = cbr(2)
    initial = {k: v.clone() for k, v in model.initial_state.items()}
    train_rows, val_rows = blob_rows(32, (16, 16), 0), blob_rows(16, (16, 16), 1)
    result = train(model, train_rows, val_rows, task="binary", output_dir=tmp_path, epochs=3, lr=1e-2,
                   batch_size=8, model_config=config, **QUIET)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.key_metric == "auroc" and result.best_metric > 0.8
    assert result.epochs_run == 3 and len(result.history) == 3
    assert result.best_metric == max(h["val_auroc"] for h in result.history)
    assert evaluate(model, val_rows, task="binary").metrics["auroc"] > 0.8

    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / name)
        assert set(ckpt["initial_state"]) == set(initial)
        assert all(torch.equal(ckpt["initial_state"][k], initial[k]) for k in initial)
        assert ckpt["model_config"] == config and ckpt["engine"]["epoch"] >= 1
        assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["engine"] == {"epoch": 3, "iteration": 12, "epoch_length": 4}
    assert all(torch.equal(v, model.state_dict()[k].cpu()) for k, v in last["model"].items())

    best = load_model(result.best_checkpoint)
    assert not best.training and type(best).__name__ == "TransferModel"
    assert all(torch.equal(best.initial_state[k], initial[k]) for k in initial)
    rebuilt = evaluate(best, val_rows, task="binary")
    assert rebuilt.metrics["auroc"] == pytest.approx(result.best_metric)
    assert [r["id"] for r in rebuilt.predictions] == [r["id"] for r in val_rows]
    assert (tmp_path / "history.csv").read_text().count("\n") == 4
    assert json.loads((tmp_path / "result.json").read_text())["best_epoch"] == result.best_epoch


def test_3d_multiclass_learns(tmp_path):
    """Three epochs, 3 classes in 3D: the loss falls and the validation AUROC passes 0.8. Margin measured for seeds
    0-4 with 1 and 2 threads, identical for both: AUROC 1.000 in every run, last epoch's loss 0.30-0.53 of the
    first."""
    torch.manual_seed(0)
    model, config = cbr(3, num_classes=3)
    amplitudes = (0.0, 1.5, -1.5)
    train_rows, val_rows = blob_rows(24, (8, 12, 12), 0, amplitudes), blob_rows(12, (8, 12, 12), 1, amplitudes)
    result = train(model, train_rows, val_rows, task="multiclass", output_dir=tmp_path, epochs=3, lr=1e-2,
                   batch_size=6, model_config=config, **QUIET)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.best_metric > 0.8
    rows = evaluate(load_model(result.best_checkpoint), val_rows, task="multiclass").predictions
    assert len(rows) == 12 and len(rows[0]["probabilities"]) == 3
    assert sum(rows[0]["probabilities"]) == pytest.approx(1.0, abs=1e-5)


def test_lwft_learning_rates_reach_the_optimizer_and_frozen_units_do_not_change(tmp_path):
    torch.manual_seed(0)
    model, config = cbr(2, strategy="lwft", cut="cbr2")
    body = model.backbone
    frozen = {k: v.clone() for i in (0, 1) for k, v in body.state_dict().items() if k in body.unit_state_keys(i)}
    trained = {k: v.clone() for k, v in body.state_dict().items() if k in body.unit_state_keys(2)}
    assert frozen and trained
    train(model, blob_rows(8, (16, 16), 0), blob_rows(4, (16, 16), 1), task="binary", output_dir=tmp_path,
          epochs=1, lr=0.02, batch_size=4, model_config=config, **QUIET)
    groups = load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"]
    # the schedule's base rates (the cosine schedule has decayed "lr" to 0 by the end of the run)
    assert {g["name"]: g["initial_lr"] for g in groups} == {"backbone_x0.1": pytest.approx(0.002), "head": 0.02}
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == sum(1 for p in model.parameters() if p.requires_grad)
    after = body.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items()), "frozen units (and BN statistics) moved"
    assert any(not torch.equal(after[k], v) for k, v in trained.items()), "units above the cut did not train"


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gradient_clipping_bounds_the_update(tmp_path, clip):
    torch.manual_seed(0)
    model = Linear(16)
    rows = [{"image": torch.randn(1, 4, 4) * 10, "label": i % 2} for i in range(4)]
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    # one SGD step with lr=1: the first momentum step moves the weights by exactly the (clipped) gradient
    train(model, rows, rows, task="binary", output_dir=tmp_path, epochs=1, lr=1.0, optimizer="sgd", batch_size=4,
          grad_clip=clip, **QUIET)
    step = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    if clip is None:
        assert step > 1e-2
    else:
        assert step == pytest.approx(clip, rel=1e-4)


def test_early_stopping_stops_and_a_finished_run_is_not_retrained(tmp_path, caplog):
    torch.manual_seed(0)
    rows = blob_rows(8, (4, 4), 0)
    model = Linear(16)
    # lr so small the validation AUROC never moves: patience 2 stops after epoch 3 of 10
    with caplog.at_level(logging.WARNING, logger="medtl3d.engine"):
        result = train(model, rows, rows, task="binary", output_dir=tmp_path, epochs=10, lr=1e-12,
                       early_stop_patience=2, batch_size=4, amp=True, progress=False)
    assert result.epochs_run == 3 and len(result.history) == 3
    assert json.loads((tmp_path / "result.json").read_text())["stopped_early"] is True
    assert "mixed precision is used on CUDA only" in caplog.text  # amp=True on CPU: float32, no crash
    assert (tmp_path / "tensorboard").is_dir() or "tensorboard is not installed" in caplog.text
    again = train(model, rows, rows, task="binary", output_dir=tmp_path, epochs=10, lr=1e-12,
                  early_stop_patience=2, batch_size=4, amp=True, **QUIET)
    assert again.epochs_run == 3 and again.history == result.history


RUN = textwrap.dedent('''
    import os, torch
    from medtl3d.engine import train
    from medtl3d.strategies import create_model

    class Rows(torch.utils.data.Dataset):
        """Noisy blobs with a random flip drawn from the global RNG; os._exit at the kill_at-th read."""
        def __init__(self, n, seed, kill_at=None):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 1, 12, 12, generator=g)
            self.y = torch.arange(n) % 2
            self.x[self.y == 1, :, 3:9, 3:9] += 1.0
            self.kill_at, self.reads = kill_at, 0
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            self.reads += 1
            if self.reads == self.kill_at:
                os._exit(17)
            x = self.x[i]
            return {"image": x.flip(-1) if torch.rand(()) < 0.5 else x, "label": int(self.y[i])}

    def run(out, kill_at=None):
        torch.manual_seed(1)
        model = create_model("cbr_tiny", strategy="truncate", cut="cbr1", num_classes=1, spatial_dims=2,
                             in_channels=1, dropout=0.3)
        result = train(model, Rows(16, 0, kill_at), Rows(8, 1), task="binary", output_dir=out, epochs=2,
                       lr=1e-2, batch_size=4, seed=5, progress=False, tensorboard=False)
        return result, model
''')


@pytest.mark.slow
def test_resume_after_a_kill_mid_epoch_ends_identical_to_an_uninterrupted_run(tmp_path):
    namespace: dict = {}
    exec(compile(RUN, "engine_run", "exec"), namespace)
    straight, straight_model = namespace["run"](str(tmp_path / "straight"))

    killed = tmp_path / "killed"
    # reads: 1 probe + 16 in epoch 1; the 26th read is the 9th of the last epoch (iteration 3 of 4)
    proc = subprocess.run([sys.executable, "-c", RUN + f"\nrun({str(killed)!r}, kill_at=26)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert load_checkpoint(killed / "last.pt")["engine"]["epoch"] == 1

    resumed, resumed_model = namespace["run"](str(killed))
    assert resumed.epochs_run == 2
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert resumed.best_metric == straight.best_metric and resumed.best_epoch == straight.best_epoch
    a, b = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"


def test_monai_random_transforms_and_metatensors_replay_identically_for_a_seed(tmp_path):
    from monai.transforms import Compose, EnsureTyped, RandFlipd, RandGaussianNoised

    augment = Compose([EnsureTyped(keys="image", track_meta=True), RandFlipd(keys="image", prob=0.5, spatial_axis=1),
                       RandGaussianNoised(keys="image", prob=1.0, std=0.5)])
    rows = blob_rows(16, (4, 4), 0)

    def weights(seed, out):
        torch.manual_seed(0)
        model = Linear(16)
        train(model, Dataset(rows, transform=augment), rows, task="binary", output_dir=tmp_path / out, epochs=2,
              batch_size=4, seed=seed, **QUIET)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    first, again, other = weights(3, "a"), weights(3, "b"), weights(4, "c")
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_evaluate_aggregates_windows_per_series_by_max_or_mean():
    class MeanLogit(nn.Module):
        def forward(self, x):
            return x.flatten(1).mean(1, keepdim=True)

    windows = {"A": ([-2.0, 1.0], 1), "B": ([-1.0, -1.5], 0), "C": ([0.5, -3.0], 1), "D": ([0.0, 0.2], 0)}
    rows = [{"image": torch.full((1, 2, 2), v), "label": y, "series": s, "id": f"{s}{i}"}
            for s, (values, y) in windows.items() for i, v in enumerate(values)]
    s = torch.sigmoid
    by_max = evaluate(MeanLogit(), rows, task="binary", series_key="series", aggregation="max")
    assert [r["id"] for r in by_max.predictions] == ["A", "B", "C", "D"]
    assert [r["label"] for r in by_max.predictions] == [1, 0, 1, 0]
    expected = [s(torch.tensor(max(v))).item() for v, _ in windows.values()]
    assert [r["probabilities"][0] for r in by_max.predictions] == pytest.approx(expected, abs=1e-6)
    assert by_max.metrics["auroc"] == pytest.approx(1.0)  # positives 0.73, 0.62 above negatives 0.27, 0.55
    by_mean = evaluate(MeanLogit(), rows, task="binary", series_key="series", aggregation="mean")
    expected = [s(torch.tensor(v)).mean().item() for v, _ in windows.values()]
    assert [r["probabilities"][0] for r in by_mean.predictions] == pytest.approx(expected, abs=1e-6)
    assert by_mean.metrics["auroc"] == pytest.approx(0.5)  # D's mean 0.52 now outranks both positives
    per_window = evaluate(MeanLogit(), rows, task="binary")
    assert len(per_window.predictions) == 8 and per_window.predictions[0]["id"] == "A0"


def test_segmentation_trains_a_unet_built_by_a_registered_builder(tmp_path):
    """A MONAI U-Net from a registered builder trains to best validation Dice > 0.7 and reloads from its checkpoint.
    Margin measured for seeds 0-4 (data and model) with 1 and 2 threads, the same for both: best Dice 0.885-0.918,
    last epoch's loss 0.31-0.34 of the first."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        image = torch.randn(1, 16, 16, generator=g) * 0.3
        r, c = torch.randint(0, 8, (2,), generator=g).tolist()
        mask = torch.zeros(1, 16, 16, dtype=torch.long)
        mask[:, r:r + 8, c:c + 8] = 1
        rows.append({"image": image + mask, "label": mask, "id": i})
    config = {"builder": "test_monai_unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
              "channels": (8, 16), "strides": (2,), "num_res_units": 0}
    from monai.networks.nets import UNet

    register_builder("test_monai_unet", UNet)
    torch.manual_seed(0)
    model = UNet(**{k: v for k, v in config.items() if k != "builder"})
    result = train(model, rows[:16], rows[16:], task="segmentation", output_dir=tmp_path, epochs=4, lr=1e-2,
                   batch_size=4, model_config=config, **QUIET)
    assert result.key_metric == "dice" and result.best_metric > 0.7
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    rebuilt = load_model(result.best_checkpoint)
    scores = evaluate(rebuilt, rows[16:], task="segmentation")
    assert scores.metrics["dice"] == pytest.approx(result.best_metric, abs=1e-6)
    assert set(scores.predictions[0]) == {"id", "dice", "jaccard", "hd95", "hd95_unit"}
    assert scores.predictions[0]["hd95_unit"] == "px"  # in-memory tensors record no spacing


def test_bad_options_and_labels_fail_before_the_first_iteration(tmp_path):
    rows = blob_rows(8, (4, 4), 0)
    model = Linear(16)
    with pytest.raises(TrainingError, match="task='regression'"):
        train(model, rows, rows, task="regression", output_dir=tmp_path, **QUIET)
    with pytest.raises(TrainingError, match="key_metric='dice'.*auroc"):
        train(model, rows, rows, task="binary", key_metric="dice", output_dir=tmp_path, **QUIET)
    with pytest.raises(TrainingError, match="single output logit"):
        train(Linear(16, 2), rows, rows, task="binary", output_dir=tmp_path, **QUIET)
    with pytest.raises(TrainingError, match="series_key"):
        train(model, rows, rows, task="segmentation", series_key="s", output_dir=tmp_path, **QUIET)
    bad = [dict(r) for r in rows]
    bad[5]["label"] = 2
    with pytest.raises(TrainingError, match=r"train_data: label of row 5 \(id='case5'\) holds \[2.0\]"):
        train(model, Dataset(bad), rows, task="binary", output_dir=tmp_path, **QUIET)
    assert not (tmp_path / "last.pt").exists()
    # a dataset that does not expose its rows is checked batch by batch, naming the case
    bad[5]["label"] = 5
    with pytest.raises(TrainingError, match=r"label of case 'case5' holds \[5.0\]"):
        train(Linear(16, 3), bad, rows, task="multiclass", output_dir=tmp_path, batch_size=8, **QUIET)
    bad[5]["label"] = 7
    with pytest.raises(TrainingError, match=r"row 5 \(id='case5'\) holds \[7.0\]; multiclass labels must be "
                                            r"integers in \[0, 2\]"):
        train(Linear(16, 3), Dataset(rows), Dataset(bad), task="multiclass", output_dir=tmp_path, **QUIET)
    with pytest.raises(TrainingError, match="cannot take an image of shape"):
        train(Linear(9), rows, rows, task="binary", output_dir=tmp_path, **QUIET)


def test_resume_refuses_a_checkpoint_of_a_different_run(tmp_path):
    rows = blob_rows(8, (4, 4), 0)
    train(Linear(16), rows, rows, task="binary", output_dir=tmp_path, epochs=1, batch_size=4, **QUIET)
    with pytest.raises(TrainingError, match="different run.*lr: 0.001 \\(checkpoint\\) vs 0.01"):
        train(Linear(16), rows, rows, task="binary", output_dir=tmp_path, epochs=2, lr=0.01, batch_size=4,
              **QUIET)
    # more epochs on the same run continue it
    more = train(Linear(16), rows, rows, task="binary", output_dir=tmp_path, epochs=2, batch_size=4, **QUIET)
    assert more.epochs_run == 2 and [h["epoch"] for h in more.history] == [1, 2]
    assert not math.isnan(more.best_metric)
    assert os.path.exists(tmp_path / "best.pt")


def test_mlflow_logs_params_and_per_epoch_metrics(tmp_path):
    import mlflow  # optional for users (extra 'tracking'), part of the 'test' extra: this test always runs
    rows = blob_rows(8, (4, 4), 0)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    train(Linear(16), rows, rows, task="binary", output_dir=tmp_path / "run", epochs=2, batch_size=4,
          mlflow_uri=uri, **QUIET)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medtl3d").experiment_id])
    assert run.data.params["task"] == "binary" and run.data.params["lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "auroc")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
