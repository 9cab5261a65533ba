"""Optimisation building blocks: parameter groups without weight decay on norms, biases, embeddings and position
tables (composed with a model's own LWFT learning-rate groups), and learning-rate schedules by name.

``cosine`` (the default for fine-tuning), ``step`` and ``constant`` are closed-form functions of the iteration
(``torch.optim.lr_scheduler.LambdaLR``) after an optional linear warm-up, stepped once per iteration; ``plateau`` is
torch's ``ReduceLROnPlateau`` on the validation loss, stepped after each validation. MONAI's ``LrScheduleHandler``
steps them (:class:`medtl3d.engine.handlers.LrSchedule`). Only the iteration count (and the plateau bookkeeping) is state, so a resumed run continues exactly.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from ..errors import TrainingError

SCHEDULERS = ("cosine", "step", "plateau", "constant")
# the scheduler_options each schedule takes (epochs for step_size; plateau's are ReduceLROnPlateau's own)
SCHEDULER_OPTIONS = {
    "cosine": ("min_lr_ratio",),
    "step": ("step_size", "gamma"),
    "plateau": ("factor", "patience", "threshold", "cooldown", "min_lr"),
    "constant": (),
}
# parameters named like this (the last part of the name) are position tables / tokens: never weight-decayed
POSITION_TABLES = frozenset({"pos_embed", "cls_token", "dist_token", "reg_token", "mask_token", "absolute_pos_embed",
                             "relative_position_bias_table", "position_embeddings", "pos_embedding"})
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)

OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": partial(torch.optim.SGD, momentum=0.9),
}


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the parameters that weight decay must not touch: biases, norm layers' affine parameters,
    ``nn.Embedding`` tables, position tables and tokens (:data:`POSITION_TABLES`), and whatever a module's own
    ``no_weight_decay()`` lists (the timm convention, names relative to that module)."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = module.no_weight_decay() if callable(getattr(module, "no_weight_decay", None)) else ()
        for name, _ in module.named_parameters(recurse=False):
            if (name == "bias" or name in POSITION_TABLES or name in own or isinstance(module, NORMS)
                    or isinstance(module, nn.Embedding)):
                names.add(prefix + name)
        names.update(prefix + name for name in own if "." in name)
    return names


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters.

    A model with its own ``param_groups(lr, weight_decay)`` (LWFT's discriminative learning rates, a U-Net's
    encoder/decoder) keeps its groups and their learning rates; otherwise one group ``all`` at ``lr``. With
    ``weight_decay > 0`` each group is split in two: ``<name>`` with the decay and ``<name>_no_decay`` (weight
    decay 0) holding the parameters of :func:`no_weight_decay`.
    """
    if callable(getattr(model, "param_groups", None)):
        groups = model.param_groups(lr, weight_decay)
    else:
        groups = [{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay, "name": "all"}]
    excluded = {id(p) for name, p in model.named_parameters() if name in no_weight_decay(model)}
    split = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        decay = group.get("weight_decay", weight_decay)
        if decay > 0:
            split.append({**group, "params": [p for p in params if id(p) not in excluded]})
            split.append({**group, "params": [p for p in params if id(p) in excluded], "weight_decay": 0.0,
                          "name": f"{group.get('name', 'group')}_no_decay"})
        else:
            split.append({**group, "params": params})
    split = [g for g in split if g["params"]]
    if not split:
        raise TrainingError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return split


def check_scheduler(name: str, warmup_epochs: float, options: Mapping | None) -> dict:
    """Refuse an unknown schedule (naming close matches), a negative warm-up, a warm-up with ``plateau`` and
    options the schedule does not take; returns the options as a dict."""
    if name not in SCHEDULERS:
        close = difflib.get_close_matches(str(name), SCHEDULERS, n=2)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise TrainingError(f"scheduler={name!r} is not supported; {hint}choose one of {', '.join(SCHEDULERS)}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float)) or not warmup_epochs >= 0:
        raise TrainingError(f"warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
    if name == "plateau" and warmup_epochs:
        raise TrainingError(f"warmup_epochs={warmup_epochs} does not apply to scheduler='plateau' (it follows the "
                            "validation loss); set warmup_epochs to 0")
    options = dict(options or {})
    unknown = sorted(set(options) - set(SCHEDULER_OPTIONS[name]))
    if unknown:
        takes = ", ".join(SCHEDULER_OPTIONS[name]) or "none"
        raise TrainingError(f"scheduler_options {', '.join(unknown)} do not apply to scheduler={name!r} "
                            f"(it takes: {takes})")
    return options


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0, **options):
    """The learning-rate schedule ``name`` over ``epochs`` x ``steps_per_epoch`` iterations.

    ``cosine``: linear warm-up over ``warmup_epochs`` (from lr/(W+1) to lr in W iterations), then cosine decay to
    ``min_lr_ratio`` x lr (default 0) at the end of the last epoch. ``step``: warm-up, then lr x ``gamma``
    (default 0.1) every ``step_size`` epochs (default a third of the run). ``constant``: warm-up, then lr.
    ``plateau``: ``ReduceLROnPlateau`` on the validation loss (options: factor, patience, threshold, cooldown,
    min_lr). Per-group learning rates (LWFT) are scaled alike.
    """
    options = check_scheduler(name, warmup_epochs, options)
    if name == "plateau":
        return ReduceLROnPlateau(optimizer, mode="min", **options)
    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)
    min_ratio = float(options.get("min_lr_ratio", 0.0))
    step_size = int(options.get("step_size", max(1, epochs // 3)))
    gamma = float(options.get("gamma", 0.1))
    if not 0 <= min_ratio <= 1 or step_size < 1 or not gamma > 0:
        raise TrainingError(f"scheduler_options {options} are out of range (min_lr_ratio in [0, 1], step_size >= 1, "
                            "gamma > 0)")

    def factor(step: int) -> float:  # a closure, not saved by LambdaLR.state_dict: the horizon is this run's
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if name == "step":
            return gamma ** (step // steps_per_epoch // step_size)
        return 1.0

    schedule = LambdaLR(optimizer, factor)
    schedule.per_iteration = True  # stepped after every iteration (medtl3d.engine.handlers.LrSchedule)
    return schedule
