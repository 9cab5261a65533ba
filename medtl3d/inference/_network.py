"""The model an inference runs: a module, a medtl3d checkpoint or a TorchScript export (:func:`resolve_model`), and
for the bundles' configs the same refused under config id ``ckpt_path`` (one line) when missing or unusable."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..config_ids import ConfigIdError
from ..engine import load_model
from ..errors import Medtl3dError, TrainingError, one_line


def load_network(path: str) -> nn.Module:
    """A trained network from a medtl3d checkpoint (``.pt``) or a TorchScript export (``.ts``, from
    ``python -m monai.bundle ckpt_export``)."""
    if not Path(path).is_file():
        raise ConfigIdError("ckpt_path", f"checkpoint {path} does not exist; train the bundle first")
    try:
        return resolve_model(path, torch.device("cpu"))
    except Medtl3dError as err:  # e.g. a builder that is not registered: one line, not MONAI's wrapped traceback
        raise ConfigIdError("ckpt_path", str(err)) from None


def resolve_model(model: nn.Module | str | os.PathLike, device: torch.device) -> nn.Module:
    """A module, a medtl3d checkpoint (``.pt``) or a TorchScript export (``.ts``, e.g. from ``ckpt_export``)."""
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise TrainingError(f"model file {model} does not exist")
        model = _load_torchscript(model) if str(model).endswith(".ts") else load_model(model)
    if not isinstance(model, nn.Module):
        raise TrainingError(f"model must be a torch nn.Module or a checkpoint path, got {type(model).__name__}")
    return model.to(device).eval()


def _load_torchscript(path) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - torch's errors name no file and say nothing actionable
        raise TrainingError(f"model file {path} is not a TorchScript export ({type(err).__name__}: "
                            f"{one_line(err, 120)}): export the model with monai.bundle ckpt_export, or give the "
                            "medtl3d checkpoint (.pt)") from err


def _model_input(model: nn.Module) -> tuple[int, int] | None:
    """(spatial dimensions, channels) that the model's first convolution reads, or None without one. Works for
    TorchScript too (its modules keep their ``original_name``)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or \
                getattr(module, "original_name", None) in ("Conv1d", "Conv2d", "Conv3d"):
            weight = module.weight
            return weight.ndim - 2, int(weight.shape[1]) * int(getattr(module, "groups", 1))
    return None
