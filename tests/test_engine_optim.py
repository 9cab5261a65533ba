"""Optimisation and run behaviour of the engine: weight-decay groups (composed with LWFT's learning rates), the
learning-rate schedules and their exact resume, the model-selection rule, the thread count and progress bars."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import medtl3d.engine.handlers.progress as progress_handler
from medtl3d.engine import _trainer, load_checkpoint, train
from medtl3d.engine.optim import build_scheduler, no_weight_decay, param_groups
from medtl3d.engine.selection import select_epoch
from medtl3d.errors import TrainingError
from medtl3d.strategies import create_model

QUIET = {"progress": False, "tensorboard": False}


def rows(n, seed, size=12):
    """Noise images; positives carry a centred blob (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image = torch.randn((1, size, size), generator=g)
        image[:, size // 4: size - size // 4, size // 4: size - size // 4] += float(i % 2)
        out.append({"image": image, "label": i % 2, "id": f"case{i}"})
    return out


def cbr(strategy="truncate", cut="cbr1"):
    return create_model("cbr_tiny", strategy=strategy, cut=cut, num_classes=1, spatial_dims=2, in_channels=1)


class Tokens(nn.Module):
    """A transformer-like model: embedding, position table, class token, layer norm, linear layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.norm = nn.LayerNorm(4)
        self.block = nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4), nn.GroupNorm(2, 4))
        self.head = nn.Linear(4, 1)


def test_weight_decay_spares_norms_biases_embeddings_and_position_tables():
    model = Tokens()
    assert no_weight_decay(model) == {
        "embed.weight", "pos_embed", "cls_token", "norm.weight", "norm.bias", "block.0.bias", "block.1.weight",
        "block.1.bias", "block.2.weight", "block.2.bias", "head.bias"}
    groups = param_groups(model, lr=0.1, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("all", 0.05), ("all_no_decay", 0.0)]
    assert sorted(names[id(p)] for p in groups[0]["params"]) == ["block.0.weight", "head.weight"]
    assert sum(len(g["params"]) for g in groups) == len(names)
    # without weight decay there is nothing to split
    assert [g["name"] for g in param_groups(model, lr=0.1)] == ["all"]


def test_lwft_groups_keep_their_learning_rates_and_are_split_by_decay():
    model = cbr("lwft", "cbr2")
    groups = param_groups(model, lr=0.02, weight_decay=0.01)
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {
        "backbone_x0.1": (pytest.approx(0.002), 0.01), "backbone_x0.1_no_decay": (pytest.approx(0.002), 0.0),
        "head": (0.02, 0.01), "head_no_decay": (0.02, 0.0)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter once, no frozen one
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(p.ndim > 1 for p in model.parameters() if id(p) in decayed)  # conv / linear weights only


def lrs(name, epochs=4, steps=5, warmup=0, **options):
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0},
                                 {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}], lr=1.0)
    scheduler = build_scheduler(name, optimizer, epochs=epochs, steps_per_epoch=steps, warmup_epochs=warmup,
                                **options)
    seen = []
    for _ in range(epochs * steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_schedules_follow_their_closed_forms_and_scale_every_group():
    cosine = lrs("cosine", warmup=1)
    head = [lr for lr, _ in cosine]
    assert head[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])  # linear warm-up over epoch 1
    assert head[5:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 15)) for i in range(15)])
    assert all(low == pytest.approx(high / 10) for high, low in cosine)  # LWFT's ratio kept
    assert [lr for lr, _ in lrs("cosine")][0] == 1.0  # no warm-up: the first step at the full rate
    step = [lr for lr, _ in lrs("step", step_size=2, gamma=0.5)]
    assert step == pytest.approx([1.0] * 10 + [0.5] * 10)
    assert [lr for lr, _ in lrs("constant", warmup=0.4)] == pytest.approx([1 / 3, 2 / 3] + [1.0] * 18)


@pytest.mark.parametrize("name, options, message", [
    ("cosin", {}, "scheduler='cosin' is not supported; did you mean 'cosine'"),
    ("cosine", {"gamma": 0.5}, "scheduler_options gamma do not apply to scheduler='cosine' .*min_lr_ratio"),
    ("plateau", {"warmup_epochs": 1}, "warmup_epochs=1 does not apply to scheduler='plateau'"),
    ("step", {"warmup_epochs": -1}, "warmup_epochs must be a number >= 0"),
])
def test_bad_schedules_are_refused_naming_the_option(tmp_path, name, options, message):
    warmup = options.pop("warmup_epochs", 0)
    with pytest.raises(TrainingError, match=message):
        train(cbr(), rows(4, 0), rows(4, 1), task="binary", output_dir=tmp_path, scheduler=name,
              warmup_epochs=warmup, scheduler_options=options, **QUIET)
    with pytest.raises(TrainingError, match="select='best' is not a model-selection rule"):
        train(cbr(), rows(4, 0), rows(4, 1), task="binary", output_dir=tmp_path, select="best", **QUIET)
    with pytest.raises(TrainingError, match="num_threads must be None .* got 0"):
        train(cbr(), rows(4, 0), rows(4, 1), task="binary", output_dir=tmp_path, num_threads=0, **QUIET)


class Interrupt(Exception):
    pass


class Rows(torch.utils.data.Dataset):
    """Blob rows with a random flip from the global RNG; raises ``Interrupt`` at the ``stop_at``-th read."""

    def __init__(self, n, seed, stop_at=None):
        self.rows, self.stop_at, self.reads = rows(n, seed), stop_at, 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.stop_at:
            raise Interrupt
        row = self.rows[i]
        return {**row, "image": row["image"].flip(-1) if torch.rand(()) < 0.5 else row["image"]}


def test_resume_restores_the_schedule_exactly(tmp_path, monkeypatch):
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setitem(_trainer.OPTIMIZERS, "adamw", RecordingAdamW)
    options = {"task": "binary", "epochs": 3, "lr": 1e-2, "batch_size": 4, "weight_decay": 0.01, "seed": 3,
               "warmup_epochs": 1, **QUIET}

    def run(out, stop_at=None):
        torch.manual_seed(1)
        model = cbr("lwft", "cbr2")
        return train(model, Rows(16, 0, stop_at), Rows(8, 1), output_dir=out, **options), model

    straight, straight_model = run(tmp_path / "straight")
    straight_lrs = list(seen)
    assert len(straight_lrs) == 12 and len(set(map(tuple, straight_lrs))) == 12  # warm-up, then cosine decay
    seen.clear()
    with pytest.raises(Interrupt):  # reads: 1 probe + 16 in epoch 1; the 22nd is in epoch 2
        run(tmp_path / "resumed", stop_at=22)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["engine"]["epoch"] == 1
    first = seen[:4]
    seen.clear()
    resumed, resumed_model = run(tmp_path / "resumed")
    assert first + seen == straight_lrs
    assert resumed.history == [{**r, "seconds": s["seconds"]} for r, s in zip(straight.history, resumed.history)]
    a, b = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"


def test_plateau_lowers_the_rate_when_the_validation_loss_stalls_and_resumes(tmp_path):
    options = {"task": "binary", "lr": 1e-6, "optimizer": "sgd", "batch_size": 4, "scheduler": "plateau",
               "scheduler_options": {"patience": 0, "factor": 0.5}, **QUIET}
    # no norm layers, and a rate too small to move the loss: every validation after the first is a stall
    linear = lambda: nn.Sequential(nn.Flatten(), nn.Linear(144, 1))  # noqa: E731
    train(linear(), rows(8, 0), rows(8, 1), output_dir=tmp_path, epochs=2, **options)
    lr = lambda: load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"][0]["lr"]  # noqa: E731
    assert lr() == pytest.approx(0.5e-6)
    train(linear(), rows(8, 0), rows(8, 1), output_dir=tmp_path, epochs=3, **options)
    assert lr() == pytest.approx(0.25e-6)  # the plateau bookkeeping came back with the checkpoint


HISTORY = [
    {"epoch": 1, "val_auroc": 0.60, "val_loss": 0.70},
    {"epoch": 2, "val_auroc": 1.00, "val_loss": 0.60},
    {"epoch": 3, "train_loss": 0.1},  # not validated
    {"epoch": 4, "val_auroc": 1.00, "val_loss": 0.30},
    {"epoch": 5, "val_auroc": math.nan, "val_loss": 0.20},
    {"epoch": 6, "val_auroc": 0.90, "val_loss": 0.25},
]


def test_selection_rules_on_constructed_histories():
    assert select_epoch(HISTORY, "key_metric") == 4  # the tie at 1.000 goes to the lower loss
    assert select_epoch(HISTORY, "loss") == 5
    assert select_epoch(HISTORY, "last") == 6
    # EMA (decay 0.5): 0.6, 0.8, 0.9, (nan skipped), 0.9 -> the tie at 0.9 goes to epoch 6's lower loss
    assert select_epoch(HISTORY, "ema") == 6
    spike = [{"epoch": e, "val_auroc": v, "val_loss": 0.5} for e, v in enumerate([0.6, 0.95, 0.7, 0.9, 0.92], 1)]
    assert select_epoch(spike, "key_metric") == 2 and select_epoch(spike, "ema") == 5
    assert select_epoch([{"epoch": 1, "val_auroc": math.nan, "val_loss": 0.1}]) == 0


def test_training_selects_by_the_rule_and_records_it(tmp_path):
    torch.manual_seed(0)
    result = train(cbr(), rows(16, 0), rows(8, 1), task="binary", output_dir=tmp_path, epochs=3, lr=1e-2,
                   batch_size=4, select="loss", **QUIET)
    assert result.select == "loss" and json.loads((tmp_path / "result.json").read_text())["select"] == "loss"
    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == select_epoch(result.history, "loss") == losses.index(min(losses)) + 1
    assert result.best_metric == result.history[result.best_epoch - 1]["val_auroc"]
    assert load_checkpoint(result.best_checkpoint)["engine"]["epoch"] == result.best_epoch
    assert all(0 < v < 2 for v in losses)


def test_num_threads_holds_for_the_run_and_is_restored(tmp_path):
    seen = []

    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.rows = rows(8, 0)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            seen.append(torch.get_num_threads())
            return self.rows[i]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(cbr(), Counting(), rows(4, 1), task="binary", output_dir=tmp_path, epochs=1, batch_size=4,
              num_threads=1, **QUIET)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen[-8:] == [1] * 8  # the epoch's reads (the first read is the up-front check, before the run)


def test_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    options = {"task": "binary", "epochs": 1, "batch_size": 4, "tensorboard": False, "progress": True}
    train(cbr(), rows(8, 0), rows(4, 1), output_dir=tmp_path / "log", **options)
    assert "\r" not in capsys.readouterr().err  # stderr is not a terminal under pytest
    monkeypatch.setattr(progress_handler, "on_terminal", lambda: True)
    train(cbr(), rows(8, 0), rows(4, 1), output_dir=tmp_path / "tty", **options)
    assert "\r" in capsys.readouterr().err


def test_lr_finder_scans_the_training_groups_and_leaves_the_weights(tmp_path):
    from medtl3d.engine.lr_finder import find_lr

    torch.manual_seed(0)
    model = cbr("lwft", "cbr2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = find_lr(model, rows(32, 0), task="binary", output_dir=tmp_path, start_lr=1e-6, end_lr=1.0, num_iter=24,
                     batch_size=8, diverge_th=1e9)
    assert len(result.lrs) == len(result.losses) == 24
    assert result.lrs[0] == pytest.approx(1e-6 * 1e6 ** (1 / 24)) and result.lrs[-1] == pytest.approx(1.0)
    assert result.lrs[0] < result.suggestion < result.lrs[-1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the finder changed the model"
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["metadata"]["group_lr_scales"] == {"backbone_x0.1": pytest.approx(0.1), "head": 1.0}
    assert saved["metadata"]["suggested_lr"] == result.suggestion and len(saved["rows"]) == 24
    assert (tmp_path / "lr_find.png").stat().st_size > 1000 and (tmp_path / "lr_find.csv").is_file()


def test_lr_find_command_runs_a_bundle_on_its_phantoms(tmp_path, capsys):
    from medtl3d import cli

    bundle = ["lr-find", "--bundle", "bundles/cxr_classification", "--output", str(tmp_path)]
    tiny = ["backbone=cbr_tiny", "weights=null", "strategy=truncate", "cut=cbr2", "phantom_cases=24",
            "phantom_size=32",
            "image_size=32", "n_folds=3", "batch_size=4", "lr_find_num_iter=20"]
    assert cli.main([*bundle, *(a for t in tiny for a in ("--set", t))]) == 0
    out = capsys.readouterr().out
    rows_written = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())["rows"]
    suggestion = float(out.split("suggested lr ")[1].split()[0])
    assert len(rows_written) == 20 and rows_written[0]["lr"] < suggestion < rows_written[-1]["lr"]
    assert (tmp_path / "lr_find" / "lr_find.png").is_file() and (tmp_path / "lr_find" / "lr_find.md").is_file()
    assert cli.main([*bundle, "--set", "lr_find_num_iterr=20"]) == 2
    assert "--set lr_find_num_iterr: unknown id" in capsys.readouterr().err
