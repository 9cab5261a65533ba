"""Training checkpoints: plain dicts of tensors and python containers, written atomically, read with
``torch.load(weights_only=True)``, and enough to rebuild the model (``model_config``) and to resume bit-exactly
(optimizer, scaler, engine counters, early-stopping state, history, RNG states).

Written by hand rather than with ignite's ``Checkpoint``/MONAI's ``CheckpointSaver`` because the file must also
carry the RNG states, the history and the model's *initial* state, and it must stay loadable without unpickling
arbitrary objects.
"""

from __future__ import annotations

import random
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import NoPretrainedWeightsWarning, TrainingError
from ..reporting import atomic_write
from ._builders import get_builder, plain_config

FORMAT = "medtl3d-checkpoint-1"


def save_checkpoint(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then ``os.replace``d into place."""
    atomic_write(path, partial(torch.save, {"format": FORMAT, **state}), durable=True)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file can fail anywhere inside the unpickler
        raise TrainingError(f"checkpoint {path} cannot be read safely (torch.load weights_only=True): {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a medtl3d training checkpoint (no format={FORMAT!r} entry)")
    return state


def rng_state() -> dict:
    """Every global RNG the training loop draws from (python, numpy, torch CPU and CUDA)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _builder(config: dict, where: str):
    """The registered builder the config names and its keyword arguments (plain data; ``weights`` None: the
    checkpoint holds the tensors). Unknown names are refused before anything is imported."""
    kwargs = plain_config(dict(config), f"{where}: model_config")
    fn = get_builder(kwargs.pop("builder", None), where)
    if "weights" in kwargs:
        kwargs["weights"] = None
    return fn, kwargs


def load_model(checkpoint_path, map_location="cpu") -> nn.Module:
    """Rebuild the model of a checkpoint from its ``model_config`` and load its weights (and ``initial_state``).

    ``model_config`` is passed to :func:`medtl3d.strategies.create_model` with ``weights=None`` (the checkpoint
    holds the weights), or, when it has a ``builder`` key, to that registered builder (see ``_builders``: a name,
    never an import path). The model is returned in eval mode.
    """
    state = load_checkpoint(checkpoint_path, map_location)
    config = state.get("model_config")
    if not isinstance(config, dict):
        raise TrainingError(f"checkpoint {checkpoint_path} has no model_config; rebuild the model yourself and "
                            "load checkpoint['model'] into it (pass model_config=... to train() next time)")
    fn, kwargs = _builder(config, str(checkpoint_path))
    try:
        with warnings.catch_warnings():  # built without weights on purpose: the checkpoint holds them
            warnings.simplefilter("ignore", NoPretrainedWeightsWarning)
            model = fn(**kwargs)
    except TrainingError:
        raise
    except Exception as err:  # noqa: BLE001 - any builder failure becomes one clear message
        raise TrainingError(f"checkpoint {checkpoint_path}: model_config {config} does not build a model: "
                            f"{type(err).__name__}: {err}") from err
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise TrainingError(f"checkpoint {checkpoint_path}: weights do not fit the model rebuilt from its "
                            f"model_config: {err}") from err
    model.initial_state = state["initial_state"]
    return model.to(map_location).eval()
