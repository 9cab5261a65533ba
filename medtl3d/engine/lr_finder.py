"""Learning-rate range test (Smith 2017, fastai's ``lr_find``) on ignite's ``FastaiLRFinder``.

The optimizer gets the parameter groups training would use (:func:`medtl3d.engine.optim.param_groups`), so a
truncated or an LWFT model is scanned as it will be trained: every group's rate rises exponentially from
``start_lr`` to ``end_lr`` times its own scale (LWFT's backbone at a tenth of the head). The rates reported are the
base rate (scale 1, the ``lr`` option of training). ``FastaiLRFinder`` restores the model and optimizer when it is
done, so the model leaves the finder with the weights it came with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from ignite.handlers import FastaiLRFinder
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys, set_determinism
from torch import nn

from ..config_ids import check_component_options
from ..errors import TrainingError
from ..reporting import pyplot, save_figure, write_table
from ._blocks import ID_KEY
from ._checks import _device_and_amp, _first_sample, _probe_outputs
from ._tasks import BatchPreparer, check_labels_upfront, make_loss
from .optim import OPTIMIZERS, param_groups
from .runtime import torch_threads


@dataclass
class LRFindResult:
    """The scanned base learning rates, their (smoothed) losses, the suggested rate and the files written."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    files: dict[str, Path]


def check_lr_find_options(*, start_lr: float, end_lr: float, num_iter: int, optimizer: str, batch_size: int,
                          **_) -> None:
    """Refuse the options of :func:`find_lr` that no model or data could make valid."""
    if optimizer not in OPTIMIZERS:
        raise TrainingError(f"optimizer={optimizer!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")
    if not 0 < start_lr < end_lr:
        raise TrainingError(f"start_lr must be > 0 and below end_lr, got start_lr={start_lr!r}, end_lr={end_lr!r}")
    for name, value, low in (("num_iter", num_iter, 3), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TrainingError(f"{name} must be an integer >= {low}, got {value!r}")


def find_lr(model: nn.Module, train_data, *, task: str, output_dir, start_lr: float = 1e-7, end_lr: float = 1.0,
            num_iter: int = 100, weight_decay: float = 0.0, optimizer: str = "adamw", batch_size: int = 8,
            num_workers: int = 0, device="cpu", seed: int = 0, num_threads: int | None = None,
            diverge_th: float = 5.0, smooth_f: float = 0.05) -> LRFindResult:
    """Train ``model`` for ``num_iter`` iterations on ``train_data`` (samples as for :func:`train`) while the
    learning rate rises exponentially from ``start_lr`` to ``end_lr`` (stopping early once the loss exceeds
    ``diverge_th`` x its best); write ``lr_find.csv/json/md`` and ``lr_find.png`` (loss vs learning rate, log
    scale, suggestion marked) to ``output_dir`` and return the suggestion: the rate of the steepest loss descent
    before the minimum (ignite's ``lr_suggestion``). The model's weights are left as they were."""
    check_lr_find_options(start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, optimizer=optimizer,
                          batch_size=batch_size)
    device, _ = _device_and_amp(device, False)
    set_determinism(seed=seed)
    model.to(device)
    num_outputs = _probe_outputs(model, _first_sample(train_data, "train_data"), task, device, "train_data")
    check_labels_upfront(train_data, task, num_outputs, "train_data", ID_KEY)

    groups = param_groups(model, 1.0, weight_decay)  # each group's "lr" is its scale of the base rate
    scales = [g["lr"] for g in groups]
    reference = scales.index(max(scales))
    for group in groups:  # the first iteration runs before the finder sets any rate
        group["lr"] = start_lr * group["lr"]
    opt = OPTIMIZERS[optimizer](groups, lr=start_lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        generator=generator, drop_last=len(train_data) % batch_size == 1 and len(train_data) > 1)
    trainer = SupervisedTrainer(
        device=device, max_epochs=math.ceil(num_iter / len(loader)), train_data_loader=loader, network=model,
        optimizer=opt, loss_function=make_loss(task), decollate=False,
        prepare_batch=BatchPreparer(task, num_outputs, ID_KEY, "train_data"),
    )
    finder = FastaiLRFinder()
    model.train()
    with torch_threads(num_threads), finder.attach(
            trainer, {"model": model, "optimizer": opt}, output_transform=lambda out: out[CommonKeys.LOSS].item(),
            num_iter=num_iter, start_lr=[start_lr * s for s in scales], end_lr=[end_lr * s for s in scales],
            diverge_th=diverge_th, smooth_f=smooth_f) as scanning:
        scanning.run()
    history = finder.get_results()  # ignite records one iteration past num_iter (beyond end_lr): left out
    lrs = [float(lr[reference] if isinstance(lr, list) else lr) / scales[reference] for lr in history["lr"]]
    lrs, losses = lrs[:num_iter], [float(v) for v in history["loss"][:num_iter]]
    try:
        suggested = finder.lr_suggestion()
    except RuntimeError as err:  # the curve has no descent before its minimum
        raise TrainingError(f"the learning-rate range test found no descending loss between start_lr={start_lr:g} "
                            f"and end_lr={end_lr:g} ({err}); lower start_lr or raise end_lr") from None
    suggestion = float(suggested[reference] if isinstance(suggested, list) else suggested) / scales[reference]
    files = _write(Path(output_dir), lrs, losses, suggestion,
                   {"task": task, "optimizer": optimizer, "weight_decay": weight_decay, "batch_size": batch_size,
                    "start_lr": start_lr, "end_lr": end_lr, "num_iter": num_iter, "seed": seed,
                    "group_lr_scales": {g["name"]: g["lr"] for g in groups}, "suggested_lr": suggestion})
    return LRFindResult(lrs=lrs, losses=losses, suggestion=suggestion, files=files)


def _write(output_dir: Path, lrs: list[float], losses: list[float], suggestion: float, metadata: dict) -> dict:
    rows = [{"iteration": i + 1, "lr": lr, "loss": loss} for i, (lr, loss) in enumerate(zip(lrs, losses))]
    files = write_table(output_dir, "lr_find", rows, metadata, title=f"Learning-rate range test (suggested lr "
                                                                        f"{suggestion:.3g})")
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(lrs, losses)
    axis.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.3g}")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate (base group)")
    axis.set_ylabel("training loss (smoothed)")
    axis.legend()
    figure.tight_layout()
    files["png"] = save_figure(figure, output_dir / "lr_find.png")
    return files


class LRFinder:
    """The range test as a bundle component: ``lr_find.yaml`` builds it from its ids and runs
    ``$@lr_find.run()``. The options are :func:`find_lr`'s, checked here (:func:`check_lr_find_options`), so a
    wrong value stops while the config is parsed; errors start with ``lr_find:``, the component's id in the
    bundles."""

    def __init__(self, model: nn.Module, train_data, **options) -> None:
        check_component_options("lr_find", find_lr, lambda given: check_lr_find_options(**given), TrainingError,
                                model, train_data, **options)
        self.model, self.train_data, self.options = model, train_data, options

    def run(self) -> LRFindResult:
        """Scan, write ``lr_find.csv/json/md/png`` to ``output_dir`` and print the suggested rate."""
        result = find_lr(self.model, self.train_data, **self.options)
        print(f"medtl3d: suggested lr {result.suggestion:.3g} (scanned {result.lrs[0]:.3g} .. "
              f"{result.lrs[-1]:.3g}); plot in {result.files['png']}")
        return result
