"""How far fine-tuning moved each layer's weights: per-layer L2 distance and cosine similarity, initial vs final.

Matsoukas et al. (CVPR'22) report, per layer, the L2 distance between the weights a model started fine-tuning from
and its final weights. Their code built the per-module dictionaries and then measured the *whole* state for every
module, so every layer got the same number; here every row measures only the tensors that layer owns.

A layer is a unit of the :class:`~medtl3d.backbones.Backbone` (``per="unit"``, the cut-point granularity) or a
parameterised module (``per="module"``: each conv / norm / linear). Only parameters are compared: norm running
statistics are buffers and are left out; norm-layer affine parameters are left out by default too (as in Matsoukas
et al.), since they are not feature detectors. Tensors of a layer are flattened and concatenated into one vector
``w``; with ``d = w_final - w_initial`` and ``n`` parameters a row holds:

- ``l2``: ``||d||_2``; ``l2_rms``: ``||d||_2 / sqrt(n)`` (size-normalised, comparable across layers);
- ``l2_per_param``: ``||d||_2 / n`` (Matsoukas et al.'s normalisation, per layer);
- ``relative_l2``: ``||d||_2 / ||w_initial||_2``; ``cosine``: cosine similarity of ``w_initial`` and ``w_final``.

Small, exact tensor algebra: no library computes this per backbone unit, so it is written here (float64).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ..errors import AnalysisError
from ._registry import register_analysis

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def split_model(model: nn.Module):
    """``(backbone, prefix)``: a TransferModel's backbone with its ``backbone.`` state prefix, or a bare Backbone."""
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "units"):
        return backbone, "backbone."
    if hasattr(model, "units") and hasattr(model, "unit_state_keys"):
        return model, ""
    raise AnalysisError(
        f"{type(model).__name__} is neither a medtl3d TransferModel nor a Backbone: per-layer analyses need the "
        "backbone's units to group weights into layers"
    )


def _norm_parameter_keys(model: nn.Module) -> set[str]:
    return {
        f"{name}.{p}" if name else p
        for name, module in model.named_modules()
        if isinstance(module, _NORMS)
        for p, _ in module.named_parameters(recurse=False)
    }


def layer_groups(model: nn.Module, per: str = "unit", include_norm: bool = False,
                 include_head: bool = True) -> list[tuple[str, int | None, list[str]]]:
    """``(layer name, unit index, parameter keys)`` in forward order; layers without parameters are left out.

    Keys outside the backbone's units (the head) form a last layer called ``head`` (unit index None).
    """
    if per not in ("unit", "module"):
        raise AnalysisError(f"per must be 'unit' or 'module', got {per!r}")
    backbone, prefix = split_model(model)
    parameters = [name for name, _ in model.named_parameters()]
    excluded = set() if include_norm else _norm_parameter_keys(model)
    unit_of = {prefix + key: index for key, index in backbone.unit_of_key().items()}
    groups: list[tuple[str, int | None, list[str]]] = []
    if per == "unit":
        for index, unit in enumerate(backbone.units):
            owned = set(prefix + k for k in backbone.unit_state_keys(index))
            keys = [k for k in parameters if k in owned and k not in excluded]
            if keys:
                groups.append((unit.name, index, keys))
    else:
        by_module: dict[str, list[str]] = {}
        for key in parameters:
            if key in unit_of and key not in excluded:
                by_module.setdefault(key.rpartition(".")[0] or key, []).append(key)
        groups.extend((module, unit_of[keys[0]], keys) for module, keys in by_module.items())
    if include_head:
        rest = [k for k in parameters if k not in unit_of and k not in excluded]
        if rest:
            groups.append(("head", None, rest))
    return groups


def _flat(state: Mapping[str, torch.Tensor], keys: list[str], which: str) -> torch.Tensor:
    missing = [k for k in keys if k not in state]
    if missing:
        raise AnalysisError(f"{which} state has no tensor {missing[0]!r} ({len(missing)} of the layer's keys missing)")
    return torch.cat([torch.as_tensor(state[k]).detach().reshape(-1).to("cpu", torch.float64) for k in keys])


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


@register_analysis("weights", "distance")
def weight_distance(initial_state: Mapping[str, torch.Tensor], final_state: Mapping[str, torch.Tensor],
                    model: nn.Module, per: str = "unit", include_norm: bool = False,
                    include_head: bool = True) -> list[dict]:
    """One row per layer: ``layer, unit, tensors, params, l2, l2_rms, l2_per_param, relative_l2, cosine``.

    ``model`` only supplies the structure (which keys make a layer); its own weights are not read. The states are
    ``checkpoint["initial_state"]`` and ``checkpoint["model"]`` of a training checkpoint.
    """
    rows = []
    for name, unit, keys in layer_groups(model, per, include_norm, include_head):
        initial = _flat(initial_state, keys, "initial")
        final = _flat(final_state, keys, "final")
        if initial.shape != final.shape:
            bad = next(k for k in keys if tuple(initial_state[k].shape) != tuple(final_state[k].shape))
            raise AnalysisError(
                f"layer {name}: {bad!r} is {tuple(initial_state[bad].shape)} initially but "
                f"{tuple(final_state[bad].shape)} finally; the two states are not of the same architecture"
            )
        if not (torch.isfinite(initial).all() and torch.isfinite(final).all()):
            raise AnalysisError(f"layer {name}: non-finite weights in the initial or final state")
        n = initial.numel()
        l2 = float(torch.linalg.vector_norm(final - initial))
        norm_i = float(torch.linalg.vector_norm(initial))
        norm_f = float(torch.linalg.vector_norm(final))
        rows.append({
            "layer": name,
            "unit": unit,
            "tensors": len(keys),
            "params": n,
            "l2": l2,
            "l2_rms": l2 / math.sqrt(n),
            "l2_per_param": l2 / n,
            "relative_l2": _ratio(l2, norm_i),
            "cosine": _ratio(float(initial @ final), norm_i * norm_f),
        })
    return rows
