"""A trained network for the bundles' configs: a medtl3d checkpoint or a TorchScript export, refused under config
id ``ckpt_path`` (one line) when missing or unusable."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config_ids import ConfigIdError
from ..errors import Medtl3dError
from ._folder import resolve_model


def load_network(path: str) -> nn.Module:
    """A trained network from a medtl3d checkpoint (``.pt``) or a TorchScript export (``.ts``, from
    ``python -m monai.bundle ckpt_export``)."""
    if not Path(path).is_file():
        raise ConfigIdError("ckpt_path", f"checkpoint {path} does not exist; train the bundle first")
    try:
        return resolve_model(path, torch.device("cpu"))
    except Medtl3dError as err:  # e.g. a builder that is not registered: one line, not MONAI's wrapped traceback
        raise ConfigIdError("ckpt_path", str(err)) from None
