"""The bundles' model-zoo layout: train.yaml's components can be changed one at a time (a torch scheduler instead
of ours, a handler removed, the trainer's epochs, the metrics' post-transform), the engine block is the same in
every bundle, a wrong key metric or a locked folder stops the run before it writes anything, an old ``last.pt`` is
refused with its reason, and the history-based handlers (early stopping, model selection) follow their rules on
constructed histories."""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, run

from ignite.engine import Engine, Events

from medtl3d.engine import load_checkpoint, post_transform
from medtl3d.engine._checkpoint import FORMAT
from medtl3d.engine.components import case_metrics
from medtl3d.engine.handlers import EarlyStop, LrSchedule, OutputLock, SelectModel, TrainingCheckpoint
from medtl3d.engine.optim import build_scheduler
from medtl3d.errors import TrainingError
from medtl3d.locking import output_lock
from medtl3d.workflows import ConfigIdError

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
NAMES = ("ctpa_pe_classification", "cxr_lung_segmentation", "cxr_classification", "pathology_mitosis_classification")
MARK = "# ==== components"
TINY = {"backbone": "cbr_tiny", "weights": "null", "phantom_cases": 16, "phantom_size": 64, "image_size": 64,
        "batch_size": 4,
        "n_folds": 2, "device": "cpu", "amp": False, "tensorboard": False, "lr": 0.01}


def _train_yaml(name: str) -> str:
    return str(BUNDLES / name / "configs" / "train.yaml")


@pytest.mark.parametrize("config", ["train.yaml", "evaluate.yaml", "inference.yaml", "search.yaml", "study.yaml",
                                    "efficiency.yaml", "analysis.yaml", "lr_find.yaml"])
def test_the_components_block_is_the_same_in_every_bundle(config):
    """MONAI cannot include a file relative to the including one (``%file#id`` macros resolve against the current
    directory), and a bundle must stay self-contained: each config repeats the block, and this test keeps the
    copies one (see the README, "Bundles in model-zoo form")."""
    blocks = {name: (BUNDLES / name / "configs" / config).read_text().split(MARK, 1) for name in NAMES}
    assert all(len(parts) == 2 for parts in blocks.values())
    assert len({parts[1] for parts in blocks.values()}) == 1


@pytest.mark.slow  # trains two epochs and evaluates: 68 s on the shared 2-core machine
def test_a_torch_scheduler_steps_per_epoch_a_removed_handler_is_gone_and_evaluation_is_configurable(tmp_path):
    """StepLR (step 1, gamma 0.5) replaces ours: after 2 epochs (the trainer's max_epochs, not ``epochs``) the
    learning rate is lr / 4 (stepped per iteration it would be lr / 2**iterations); without SelectModel no epoch is
    selected: no best.pt, the bundle model comes from last.pt."""
    handlers = ConfigParser.load_config_file(_train_yaml("cxr_classification"))["train"]["handlers"]
    kept = [h for h in handlers if h["_target_"] != "medtl3d.engine.handlers.SelectModel"]
    assert len(kept) == len(handlers) - 1
    run(config_file=_train_yaml("cxr_classification"), output_dir=str(tmp_path), ckpt_path=str(tmp_path / "m.pt"),
        **TINY, **{"train#trainer#max_epochs": 2, "train#handlers": kept,
                   "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "optimizer": "@optimizer",
                                    "step_size": 1, "gamma": 0.5}})
    last = load_checkpoint(tmp_path / "train" / "last.pt")
    assert last["engine"]["epoch"] == 2 and len(last["history"]) == 2
    assert last["scheduler"]["step_size"] == 1 and last["scheduler"]["last_epoch"] == 2
    assert [g["lr"] for g in last["optimizer"]["param_groups"]] == pytest.approx([0.01 / 4] *
                                                                                 len(last["optimizer"]["param_groups"]))
    assert not (tmp_path / "train" / "best.pt").exists() and not (tmp_path / "train" / "tensorboard").exists()
    result = json.loads((tmp_path / "train" / "result.json").read_text())
    assert result["best_epoch"] == 0 and result["epochs_run"] == 2
    assert torch.equal(load_checkpoint(tmp_path / "m.pt")["model"]["head.weight"], last["model"]["head.weight"])


    # evaluate.yaml's report handler, changed on the command line: the threshold is the highest reaching 100%
    # sensitivity on the validation split (run by train.yaml's validate#evaluator), then applied to the test cases
    evaluate = str(BUNDLES / "cxr_classification" / "configs" / "evaluate.yaml")
    run(config_file=[_train_yaml("cxr_classification"), evaluate], output_dir=str(tmp_path),
        ckpt_path=str(tmp_path / "m.pt"), **{**TINY, "tensorboard": True}, **{
            "evaluate#threshold#target_sensitivity": 1.0, "evaluate#handlers#1#n_resamples": 50})
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["threshold"]["rule"].startswith("sensitivity >= 1 on ") and report["threshold"]["sensitivity"] == 1
    assert report["metadata"]["bootstrap"]["n_resamples"] == 50
    assert report["metadata"]["checkpoint"] == str(tmp_path / "m.pt") and report["cases"] >= 2
    # the validation run that chose the threshold logged nothing, even with tensorboard on
    assert not (tmp_path / "eval" / "tensorboard").exists() and not (tmp_path / "train" / "tensorboard").exists()


def test_lr_schedule_steps_ours_per_iteration_and_torch_schedulers_per_epoch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert LrSchedule(build_scheduler("cosine", opt, epochs=2, steps_per_epoch=3)).per_iteration
    assert not LrSchedule(torch.optim.lr_scheduler.StepLR(opt, 1)).per_iteration
    assert LrSchedule(torch.optim.lr_scheduler.StepLR(opt, 1), per_iteration=True).per_iteration


class _State:
    def __init__(self, history, epoch):
        self.history, self.epoch = history, epoch


class _Engine:
    def __init__(self, history):
        self.state, self.terminated = _State(history, history[-1]["epoch"]), False

    def terminate(self):
        self.terminated = True


def _history(*scores, loss=None):
    return [{"epoch": i + 1, "val_auroc": s, "val_loss": (loss or [1.0] * len(scores))[i]} for i, s in enumerate(scores)]


@pytest.mark.parametrize("scores, patience, stops", [
    ((0.5, 0.6, 0.6, 0.6), 2, True),       # two validations without a strict improvement
    ((0.5, 0.6, 0.6, 0.7), 2, False),      # the count resets on an improvement
    ((math.nan, math.nan), 1, True),       # an undefined metric never improves
    ((0.5, 0.6, 0.55), 2, False),
])
def test_early_stop_counts_validations_without_improvement(scores, patience, stops):
    engine = _Engine(_history(*scores))
    EarlyStop(patience, "auroc")(engine)
    assert engine.terminated is stops


def test_early_stop_ignores_epochs_without_validation():
    history = _history(0.5, 0.5)
    history.insert(1, {"epoch": 2, "train_loss": 0.3})
    history[2]["epoch"] = 3
    assert EarlyStop(1, "auroc").waited(history) == 1


def test_select_model_replays_the_history_and_marks_the_new_best():
    engine = _Engine(_history(0.7, 0.8, 0.8, loss=[1.0, 0.9, 0.5]))
    SelectModel("key_metric", "auroc")(engine)  # tie on AUROC: the lower validation loss wins
    assert (engine.state.best_epoch, engine.state.best_metric, engine.state.best_improved) == (3, 0.8, True)
    engine = _Engine(_history(0.7, 0.9, 0.8))
    SelectModel("key_metric", "auroc")(engine)
    assert (engine.state.best_epoch, engine.state.best_improved) == (2, False)


def test_a_wrong_key_metric_stops_with_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigIdError, match="config id 'key_metric': 'dcie' is not a metric of task 'binary'; "
                                            "choose one of auroc, "):
        run(config_file=_train_yaml("cxr_classification"), output_dir=str(tmp_path), key_metric="dcie", **TINY)
    assert not (tmp_path / "phantoms").exists()  # checked before any data is made


def _hold(folder, held, stop):
    with output_lock(folder):
        held.set()
        stop.wait(120)


def test_a_run_refused_on_a_locked_folder_writes_no_tensorboard_file(tmp_path):
    """The TensorBoard writer is a component parsed before the trainer starts; its event file must wait for the
    output lock, or a refused second run leaves one in the first run's folder."""
    fork = multiprocessing.get_context("fork")
    held, stop = fork.Event(), fork.Event()
    holder = fork.Process(target=_hold, args=(tmp_path / "train", held, stop))
    holder.start()
    try:
        assert held.wait(60)
        with pytest.raises(ConfigIdError, match="config id 'output_dir': output folder .* is being written by "):
            run(config_file=_train_yaml("cxr_classification"), output_dir=str(tmp_path),
                ckpt_path=str(tmp_path / "m.pt"), **{**TINY, "tensorboard": True})
        assert not (tmp_path / "train" / "tensorboard").exists()
    finally:
        holder.kill()
        holder.join()


def test_post_transforms_are_monai_activations_and_feed_the_metrics():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(post_transform("multiclass")(logits), torch.softmax(logits, 1))
    torch.testing.assert_close(post_transform("binary")(logits[:, :1]), torch.sigmoid(logits[:, :1]))
    seg = torch.zeros(1, 3, 2, 2)
    seg[0, 2, 0, 0] = seg[0, 1, 1, 1] = 5.0
    assert post_transform("segmentation")(seg).long().tolist() == [[[[2, 0], [0, 1]]]]
    labels, scores = torch.tensor([0, 0, 1, 1]), torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    default, flipped = case_metrics("binary"), case_metrics("binary", postprocessing=lambda x: 1 - torch.sigmoid(x))
    for collector in (default, flipped):
        collector.reset()
        collector.update((scores, labels, None))
    assert default.compute()["auroc"] == 1.0 and flipped.compute()["auroc"] == 0.0  # the component is what is scored
    assert flipped.rows[0]["probabilities"] == pytest.approx([1 - torch.sigmoid(torch.tensor(-2.0)).item()])


def test_an_old_last_pt_is_refused_with_what_it_lacks(tmp_path):
    model = torch.nn.Linear(2, 1)
    torch.save({"format": FORMAT, "model": model.state_dict(), "run_config": {}}, tmp_path / "last.pt")
    handler = TrainingCheckpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 initial_state=model.state_dict(), run_config={})
    engine = Engine(lambda *_: None)
    handler.attach(engine)
    with pytest.raises(TrainingError, match=r"last.pt cannot be resumed: it lacks scaler, engine, history, "
                                            r"stopped_early, initial_state, rng \(written by an older medtl3d"):
        handler.started(engine)


def test_the_output_lock_is_held_while_completed_handlers_publish(tmp_path):
    """ExportModel and EvaluationReport write at COMPLETED, attached after OutputLock: the lock outlasts them."""
    engine, held = Engine(lambda *_: None), []
    OutputLock({"output_dir": str(tmp_path)}).attach(engine)
    engine.add_event_handler(Events.COMPLETED, lambda _: held.append((tmp_path / ".medtl3d.lock.json").is_file()))
    engine.run([0], max_epochs=1)
    assert held == [True] and not (tmp_path / ".medtl3d.lock.json").exists()  # released after them
