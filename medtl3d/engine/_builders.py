"""The model builders a checkpoint may name: data never becomes code.

A checkpoint's ``model_config["builder"]`` is a *name* looked up here, never imported as a dotted path (a file
saying ``builder: "os.system"`` would otherwise run a command when loaded). The names are the package's own
builders, builders registered in-process with :func:`register_builder` (code the user runs), and entry points of
group ``medtl3d.builders`` declared by plugins the user installed (``name = "package.module:function"``). Any other
name is refused before anything is imported. The dotted paths older checkpoints recorded map to the package names.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import TrainingError
from ..models import create_unet
from ..models.builders import build_classifier
from ..strategies import create_model

ENTRY_POINT_GROUP = "medtl3d.builders"
CLASSIFIER, UNET, TRANSFER_MODEL = "classifier", "unet", "transfer_model"
# what checkpoints written before the registry recorded as their builder
_LEGACY_NAMES = {"medtl3d.workflows.build_classifier": CLASSIFIER, "medtl3d.models.create_unet": UNET,
                 "medtl3d.models.unet.create_unet": UNET, "medtl3d.strategies.create_model": TRANSFER_MODEL}
_registered: dict[str, Callable[..., torch.nn.Module]] = {}


def _package_builder(name: str) -> Callable[..., torch.nn.Module]:
    """The package's own builders (below the engine in the layering)."""
    if name == CLASSIFIER:
        return build_classifier
    if name == UNET:
        return create_unet
    return create_model


def register_builder(name: str, builder: Callable[..., torch.nn.Module]) -> None:
    """Make ``name`` loadable: checkpoints whose ``model_config["builder"]`` is ``name`` are rebuilt by ``builder``."""
    if name in (CLASSIFIER, UNET, TRANSFER_MODEL) or name in _LEGACY_NAMES:
        raise TrainingError(f"model builder name {name!r} belongs to medtl3d; register yours under another name")
    _registered[name] = builder


def _entry_point(name: str):
    matches = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    return matches[0] if matches else None


def available_builders() -> list[str]:
    """Every builder name a checkpoint may use (package, registered, installed plugins)."""
    plugins = [ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return sorted({CLASSIFIER, UNET, TRANSFER_MODEL, *_registered, *plugins})


def get_builder(name: str | None, where: str) -> Callable[..., torch.nn.Module]:
    """The builder called ``name`` (None: :func:`medtl3d.strategies.create_model`, as in the oldest checkpoints);
    refused with one line naming ``where`` (the file) and the name when it is not registered."""
    name = TRANSFER_MODEL if name is None else _LEGACY_NAMES.get(name, name)
    if not isinstance(name, str):
        raise TrainingError(f"{where}: model_config builder {name!r} is not a builder name")
    if name in (CLASSIFIER, UNET, TRANSFER_MODEL):
        return _package_builder(name)
    if name in _registered:
        return _registered[name]
    entry = _entry_point(name)
    if entry is None:
        raise TrainingError(f"{where}: model_config builder {name!r} is not a registered model builder (known: "
                            f"{', '.join(available_builders())}); refused without importing anything: only load "
                            f"models from sources you trust, and install the plugin that provides {name!r} "
                            f"(entry point group {ENTRY_POINT_GROUP}) if it is one")
    try:
        return entry.load()
    except Exception as err:  # noqa: BLE001 - a broken plugin becomes one line naming it
        raise TrainingError(f"{where}: model builder {name!r} (plugin {entry.value}) cannot be loaded: "
                            f"{type(err).__name__}: {err}") from err


def plain_config(value: Any, name: str) -> Any:
    """``value`` as plain python data (None, bool, int, float, str, lists, str-keyed dicts; paths and devices
    become strings), or a TrainingError naming the first part that is not: a model_config is data, never objects."""
    if isinstance(value, (Path, torch.device)):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(plain_config(v, f"{name}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Mapping):
        return {str(k): plain_config(v, f"{name}.{k}") for k, v in value.items()}
    raise TrainingError(f"{name} is a {type(value).__name__}; model_config may hold only plain python values")
