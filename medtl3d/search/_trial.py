"""One trial of a search: train the bundle for one (strategy, cut, fold, seed), read its validation metrics at the
best epoch, optionally score it on the test split, and return a plain record.

A trial is an ordinary bundle run (``train.yaml``, then ``train.yaml`` + ``evaluate.yaml``) in its own folder, so
anything a search trained can be evaluated, exported or analysed like any bundle model. Its logs and output go to
``trial.log`` in that folder (the search's console shows one line per trial); the root logger is restored after.
The trial pins torch's thread count and the bundle seeds everything, so a trial gives the same numbers in-process
and in a Ray worker.

A trial with ``stop_at`` pauses after that epoch (:func:`medtl3d.engine.pause_after`: the learning-rate schedule
still spans the trial's ``epochs``) and keeps its engine checkpoint; the same trial run again with a later
``stop_at`` (or none) continues from it, so the successive-halving rungs of a search never retrain an epoch.

With ``processes > 1`` the training is data-parallel: ``torchrun --standalone`` starts that many ranks on the
bundle's ``multi_gpu_train.yaml`` (one GPU each where CUDA is available, gloo on the CPU otherwise), with the
trial's ids in a config file merged last; the test scoring that follows runs in this process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine import pause_after
from ..reporting import write_text


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial (plain data: it travels to Ray workers by pickling)."""

    key: str
    bundle_dir: str
    ids: dict[str, Any]
    strategy: str
    cut: str | None
    fold: int
    seed: int
    stage: int
    threads: int | None = 1
    processes: int = 1
    evaluate_test: bool = True
    keep_checkpoints: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    stop_at: int | None = None  # pause after this epoch (a rung); not part of the trial's identity

    def identity(self) -> str:
        """What makes a folder this trial's: everything but where it pauses."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "stop_at"}, sort_keys=True, default=str)


def run_trial(spec: TrialSpec) -> dict:
    """Run ``spec`` and return its record.

    A folder left by an interrupted run of the same spec (``trial_spec.json`` equal) whose training had written a
    checkpoint is resumed: the engine continues from ``train/last.pt`` exactly where it stopped (bit-identical on
    CPU), so a killed search loses at most the epoch in progress; a trial paused at a rung continues the same way.
    Any other folder is cleared first. The record's ``paused`` is true when the trial stopped at ``stop_at`` before
    its last epoch (its checkpoints are kept to continue from); ``history`` holds every epoch's validation metrics.
    """
    import monai.bundle  # noqa: F401  (creates MONAI's bundle loggers before they are redirected)
    import torch

    out = Path(spec.ids["output_dir"])
    identity = spec.identity()
    stamp = out / "trial_spec.json"
    resumed = (out / "train" / "last.pt").is_file() and stamp.is_file() and stamp.read_text() == identity
    if out.exists() and not resumed:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(stamp, identity)
    configs = Path(spec.bundle_dir) / "configs"
    log = out / "trial.log"
    (out / "logging.conf").write_text(_LOGGING.format(path=str(log)))
    common = {"meta_file": str(configs / "metadata.json"), "logging_file": str(out / "logging.conf")}
    threads = torch.get_num_threads()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    if spec.threads:
        torch.set_num_threads(int(spec.threads))
    try:
        with open(log, "a") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), \
                _own_handlers_to(stream, _MONAI_LOGGERS):
            record = {**_train_and_score(spec, out, configs, common), "resumed": resumed}
    finally:
        torch.set_num_threads(threads)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    if not spec.keep_checkpoints and not record["paused"]:  # the bundle's model.pt stays; the engine state goes
        for name in ("best.pt", "last.pt"):
            (out / "train" / name).unlink(missing_ok=True)
    return record


# MONAI loggers with their own handler bound to the real stdout at import (propagate=False): redirected as well
_MONAI_LOGGERS = ("monai.bundle.scripts", "monai.bundle.workflows")


@contextlib.contextmanager
def _own_handlers_to(stream, names):
    """Point the given loggers' own handlers at ``stream`` for the duration, then put them back."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [list(logger.handlers) for logger in loggers]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    for logger, handlers in zip(loggers, saved):
        if handlers:
            logger.handlers[:] = [handler]
    try:
        yield
    finally:
        for logger, handlers in zip(loggers, saved):
            logger.handlers[:] = handlers


_LOGGING = """[loggers]
keys=root

[handlers]
keys=file

[formatters]
keys=full

[logger_root]
level=INFO
handlers=file

[handler_file]
class=FileHandler
level=INFO
formatter=full
args=({path!r}, 'a')

[formatter_full]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _train_and_score(spec: TrialSpec, out: Path, configs: Path, common: dict) -> dict:
    """The bundle's train run, its validation metrics at the best epoch, and (optionally) its test metrics."""
    from monai.bundle import run

    start = time.perf_counter()
    with pause_after(spec.stop_at):
        if spec.processes > 1:
            _train_data_parallel(spec, out, configs, common)
        else:
            run(config_file=str(configs / "train.yaml"), **common, **spec.ids)
    seconds = time.perf_counter() - start
    summary = json.loads((out / "train" / "train_summary.json").read_text())
    best = next((row for row in summary["history"] if row["epoch"] == summary["best_epoch"]), {})
    stopped_early = json.loads((out / "train" / "result.json").read_text())["stopped_early"]
    paused = spec.stop_at is not None and summary["epochs_run"] == spec.stop_at and not stopped_early
    test: dict[str, float] = {}
    if spec.evaluate_test and not paused:
        run(config_file=[str(configs / "train.yaml"), str(configs / "evaluate.yaml")], **common, **spec.ids)
        test = json.loads((out / "eval" / "metrics.json").read_text())
    return {
        "kind": "trial", "key": spec.key, "strategy": spec.strategy, "cut": spec.cut, "fold": spec.fold,
        "seed": spec.seed, "stage": spec.stage, "key_metric": summary["key_metric"],
        "val": {k[4:]: v for k, v in best.items() if k.startswith("val_")}, "test": test,
        "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"], "train_seconds": round(seconds, 3),
        "paused": paused, "history": [{k: v for k, v in row.items() if k == "epoch" or k.startswith("val_")}
                                      for row in summary["history"]],
        "output_dir": str(out), **spec.meta,
    }


def _train_data_parallel(spec: TrialSpec, out: Path, configs: Path, common: dict) -> None:
    """Train with ``spec.processes`` ranks under torchrun (the bundle's multi_gpu_train.yaml picks each rank's
    device, so the trial's ``device`` id is left out); its output is appended to ``trial.log``."""
    ids = write_text(out / "trial_ids.json", json.dumps({k: v for k, v in spec.ids.items() if k != "device"}))
    files = [str(configs / "train.yaml"), str(configs / "multi_gpu_train.yaml"), str(ids)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={spec.processes}", "-m", "monai.bundle", "run", "--config_file", json.dumps(files),
               "--meta_file", common["meta_file"], "--logging_file", common["logging_file"]]
    env = dict(os.environ)
    if spec.threads:
        env["OMP_NUM_THREADS"] = str(max(1, int(spec.threads) // spec.processes))
    sys.stdout.flush()
    with open(out / "trial.log", "a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        raise RuntimeError(f"torchrun with {spec.processes} processes exited with status {code}")
