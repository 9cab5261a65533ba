"""Reading weight files safely and loading them into a backbone (and optionally its published head).

Accepted sources: ``None``; a catalogue name (:mod:`.catalogue`: ``densenet121.imagenet``, or ``imagenet`` for the
backbone's own entry; timm tags); a local
``.pth/.pt/.bin/.ckpt/.safetensors/.npz`` file in any of the known layouts. Files are read with
``torch.load(weights_only=True)`` (never arbitrary unpickling) or ``numpy.load(allow_pickle=False)``; wrappers such as
``{"state_dict": ...}`` (Hara), ``{"model_state": ...}`` (PENet) and ``module.`` prefixes are removed; the family's
converter maps foreign layouts onto the native keys; the first conv is adapted to the input channels and 2D kernels
are inflated for 3D twins. Anything that still does not fit is an error that lists the keys.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import UnsafeCheckpointError, WeightsError
from ..provenance import sha256_file
from ._adapt import adapt_input_channels, inflate_state_dict
from .catalogue import WeightsEntry, entry_for_file, entry_state, get_weights, list_weights, weights_for

WRAPPER_KEYS = ("state_dict", "model_state", "model_state_dict", "model", "net", "network", "params_ema")
PREFIXES = ("module.", "_orig_mod.")
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".npz", ".tar")


@dataclass
class LoadReport:
    """What happened while loading: where from, how many tensors loaded, which were adapted (first conv to the
    input channels, 2D kernels inflated to 3D), and the published head kept aside."""

    source: str
    adapted: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    head_state: dict[str, torch.Tensor] = field(default_factory=dict)
    loaded: int = 0
    channels: str | None = None

    def describe(self) -> dict:
        """The report as plain data, recorded in the model's provenance (loading is strict: a missing tensor stops
        it, so a finished load has none missing)."""
        return {"tensors_loaded": self.loaded, "tensors_missing": 0, "adapted": list(self.adapted),
                "channel_adaptation": self.channels, "inflated_to_3d": len(self.inflated),
                "published_head": sorted(self.head_state)}

    def summary(self) -> str:
        """One line for the log."""
        parts = [f"{self.loaded} tensors loaded, 0 missing"]
        if self.channels:
            parts.append(self.channels)
        if self.inflated:
            parts.append(f"{len(self.inflated)} kernels inflated 2D->3D")
        if self.head_state:
            parts.append(f"published head ({', '.join(sorted(self.head_state))}) kept aside")
        return "; ".join(parts)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weight file into a flat ``{key: tensor}`` dict, refusing anything that needs unpickling."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            raw: object = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends name no file
            raise WeightsError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc}); it is "
                               "truncated or corrupt: download or export it again") from exc
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                raw = {k: torch.from_numpy(np.array(archive[k])) for k in archive.files if archive[k].dtype != np.str_}
        except ValueError as exc:
            raise UnsafeCheckpointError(
                f"{path}: the .npz holds object arrays that need pickle; refused ({exc})"
            ) from exc
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{path}: this checkpoint needs arbitrary unpickling (weights_only=False), which could run code "
                f"from the file, so medtl3d refuses it. Re-save only its state_dict, e.g. "
                f"torch.save(model.state_dict(), 'clean.pth'). Detail: {str(exc).splitlines()[0]}"
            ) from exc
        except Exception as exc:
            raise WeightsError(f"{path}: not a readable PyTorch weight file ({type(exc).__name__}: {exc})") from exc
    return flatten_checkpoint(raw, str(path))


def flatten_checkpoint(raw: object, source: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}``-style containers and strip ``module.`` prefixes."""
    while isinstance(raw, Mapping) and not _is_state_dict(raw):
        inner = next((raw[k] for k in WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            kinds = {k: type(v).__name__ for k, v in list(raw.items())[:10]}
            raise WeightsError(f"{source}: no state_dict found; top-level entries are {kinds}")
        raw = inner
    if not isinstance(raw, Mapping):
        raise WeightsError(f"{source}: expected a dict of tensors, found {type(raw).__name__}")
    state = {}
    for key, value in raw.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _is_state_dict(raw: Mapping) -> bool:
    return len(raw) > 0 and all(isinstance(v, torch.Tensor) for v in raw.values())


def resolve_weights(backbone_name: str, weights: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and the record of where it came from, for ``weights``: a file (recognised as a catalogue entry's
    published file by its name, then checked by hash), or a catalogue name (``densenet121.imagenet``, or short:
    ``imagenet`` for ``<backbone>.imagenet``; ``timm/<model>.<tag>`` or the tag alone for timm backbones)."""
    path = Path(weights)
    if path.is_file():
        entry = entry_for_file(path)
        if entry is None:
            return read_checkpoint(path), {"entry": None, "file": str(path.resolve()), "sha256": sha256_file(path)}
        return entry_state(_fitting(entry, backbone_name), path, read_checkpoint)
    entry = weights_for(backbone_name, str(weights))
    if entry is not None:
        return entry_state(_fitting(entry, backbone_name), None, read_checkpoint)
    known = [n for n in list_weights() if get_weights(n).architecture == backbone_name]
    raise WeightsError(
        f"weights={str(weights)!r} for backbone {backbone_name!r} is neither an existing file nor a catalogue name "
        f"(for {backbone_name}: {', '.join(known) or 'none'}; `medtl3d weights list` shows all)"
    )


def _fitting(entry: WeightsEntry, backbone_name: str) -> WeightsEntry:
    if entry.architecture != backbone_name:
        raise WeightsError(f"weights {entry.name!r} are for architecture {entry.architecture!r}, not {backbone_name!r}")
    return entry


def first_conv_key(model: nn.Module, in_channels: int) -> str | None:
    """State key of the first convolution that reads the input."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.in_channels == in_channels:
            return f"{name}.weight"
    return None


def load_backbone_state(backbone, state: dict[str, torch.Tensor], source: str, *,
                        head_keys: Sequence[str]) -> LoadReport:
    """Load ``state`` strictly into ``backbone``; the published head's keys (under the prefixes ``head_keys``, from
    the backbone's registry entry) are returned in the report, not loaded."""
    report = LoadReport(source=source)
    state = backbone.convert_state_dict(dict(state))
    head_prefixes = tuple(p + "." for p in head_keys)
    body: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        (report.head_state if key.startswith(head_prefixes) else body)[key] = value
    target = backbone.state_dict()

    body = _normalise_batch_counters(body, target)
    conv_key = first_conv_key(backbone, backbone.in_channels)
    if conv_key in body and conv_key in target and body[conv_key].shape[1] != target[conv_key].shape[1]:
        have, want = body[conv_key].shape[1], target[conv_key].shape[1]
        body[conv_key] = adapt_input_channels(body[conv_key], want)
        report.adapted.append(conv_key)
        report.channels = f"{conv_key}: {have} -> {want} input channels (" + (
            "kernels summed" if want == 1 else f"kernels repeated, scaled by {have}/{want}") + ")"
    body, report.inflated = inflate_state_dict(body, target)  # after adapting: a 1-channel 3D twin of an RGB net

    missing = sorted(set(target) - set(body))
    unexpected = sorted(set(body) - set(target))
    mismatched = sorted(
        f"{k}: file {tuple(body[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(body) & set(target)
        if tuple(body[k].shape) != tuple(target[k].shape)
    )
    if missing or unexpected or mismatched:
        raise WeightsError(_mismatch_message(backbone.name, source, missing, unexpected, mismatched))
    backbone.load_state_dict({k: v.to(target[k].dtype) for k, v in body.items()}, strict=True)
    report.loaded = len(body)
    return report


def _normalise_batch_counters(body: dict, target: dict) -> dict:
    """BatchNorm ``num_batches_tracked`` as torch's own loader treats it: absent (old files, converted TF/Keras
    weights) means 0, a one-element tensor becomes a scalar. The counter holds no learned information."""
    body = dict(body)
    for key, goal in target.items():
        if not key.endswith("num_batches_tracked"):
            continue
        value = body.get(key)
        if value is None:
            body[key] = torch.zeros_like(goal)
        elif value.numel() == 1 and value.shape != goal.shape:
            body[key] = value.reshape(goal.shape)
    return body


def _mismatch_message(name, source, missing, unexpected, mismatched) -> str:
    def listing(title: str, items: list[str]) -> str:
        if not items:
            return ""
        shown = "\n    ".join(items[:15])
        more = f"\n    ... and {len(items) - 15} more" if len(items) > 15 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    return (
        f"weights from {source} do not fit backbone {name!r} (is the file for another architecture?)"
        + listing("missing in the file", missing)
        + listing("unexpected in the file", unexpected)
        + listing("shape mismatch", mismatched)
    )
