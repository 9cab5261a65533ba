"""Layer re-initialisation robustness (Zhang, Bengio & Singer 2019; Matsoukas et al. 2022).

Take the fine-tuned model, put one layer back where it started and re-evaluate: a layer whose reset barely hurts
was not needed by fine-tuning ("robust"), one whose reset ruins the model was. Two modes:

- ``reinit``: the layer gets its *initial* weights (``checkpoint["initial_state"]``, i.e. pretrained for WT), as in
  Matsoukas et al.'s ``--layer_importance``;
- ``rerand``: the layer gets fresh random weights from the backbone family's own initialiser (a new backbone is
  built with the same registry name and build arguments, seeded, and the layer's tensors are taken from it).

A layer is a backbone unit (``groups="unit"``) or all the units of one block cut point (``groups="block"``), and
optionally the head. Both parameters and buffers (norm running statistics) are reset, since both are part of the
initial state. After each evaluation the layer is restored, and the model gets back its own weights at the end.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backbones import build_backbone
from ..errors import AnalysisError, Medtl3dError
from ._registry import register_analysis
from .predictions import METRICS, metric_value, model_outputs
from .weights import split_model

MODES = ("reinit", "rerand")


def classification_metric(batches: Iterable, metric: str = "accuracy") -> Callable[[nn.Module], float]:
    """An ``evaluate(model) -> float`` callback: ``accuracy`` or ``auroc`` of the model on labelled ``batches``
    (a DataLoader or any re-iterable of ``(image, label)`` pairs / ``{"image", "label"}`` dicts)."""
    if metric not in METRICS:
        raise AnalysisError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")

    def evaluate(model: nn.Module) -> float:
        return metric_value(*model_outputs(model, batches), metric)

    return evaluate


def layer_sets(model: nn.Module, groups: str = "unit", include_head: bool = False) -> list[tuple[str, str, list[str]]]:
    """``(name, units, state keys)`` of every layer to reset, in forward order; units without state are left out."""
    backbone, prefix = split_model(model)
    if groups == "unit":
        spans = [(unit.name, [i]) for i, unit in enumerate(backbone.units)]
    elif groups == "block":
        spans, start = [], 0
        for cut in backbone.cut_points_at("block"):
            spans.append((cut.name, list(range(start, cut.unit + 1))))
            start = cut.unit + 1
    else:
        raise AnalysisError(f"groups must be 'unit' or 'block', got {groups!r}")
    sets = []
    for name, units in spans:
        keys = [prefix + k for i in units for k in backbone.unit_state_keys(i)]
        if keys:
            label = str(units[0]) if len(units) == 1 else f"{units[0]}-{units[-1]}"
            sets.append((name, label, keys))
    if include_head:
        owned = {prefix + k for k in backbone.unit_of_key()}
        rest = [k for k in model.state_dict() if k not in owned]
        if rest:
            sets.append(("head", "head", rest))
    return sets


def _fresh_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """State of a freshly initialised twin: the backbone rebuilt from its registry entry, other modules reset."""
    backbone, prefix = split_model(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            fresh = build_backbone(backbone.name, **backbone.build_args)
        except Medtl3dError as exc:
            raise AnalysisError(
                f"rerand needs a backbone that can be rebuilt from the registry; {backbone.name!r} cannot: {exc}"
            ) from exc
        state = {prefix + k: v for k, v in fresh.state_dict().items()}
        if prefix:
            for name, child in model.named_children():
                if child is backbone:
                    continue
                twin = copy.deepcopy(child)
                for module in twin.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                state.update({f"{name}.{k}": v for k, v in twin.state_dict().items()})
    return state


def _load_subset(model: nn.Module, source: Mapping[str, torch.Tensor], keys: list[str], what: str) -> None:
    current = model.state_dict()
    for key in keys:
        if key not in source:
            raise AnalysisError(f"{what} has no tensor {key!r}")
        if tuple(source[key].shape) != tuple(current[key].shape):
            raise AnalysisError(
                f"{what}: {key!r} is {tuple(source[key].shape)}, the model's is {tuple(current[key].shape)}"
            )
    with torch.no_grad():
        for key in keys:
            current[key].copy_(source[key])


@register_analysis("weights", "reinit")
def reinit_robustness(initial_state: Mapping[str, torch.Tensor], final_state: Mapping[str, torch.Tensor],
                      model: nn.Module, evaluate: Callable[[nn.Module], float], modes: Iterable[str] = MODES,
                      groups: str = "unit", include_head: bool = False, seed: int = 0) -> list[dict]:
    """One row per (layer, mode): ``layer, units, mode, metric, trained, drop`` (``drop = trained - metric``).

    ``model`` gets ``final_state`` (the trained weights) for the run and its own weights back at the end;
    ``evaluate(model)`` returns the metric (higher = better), e.g. :func:`classification_metric`.
    """
    modes = list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise AnalysisError(f"unknown re-initialisation mode(s) {unknown or modes}; choose from {', '.join(MODES)}")
    sets = layer_sets(model, groups, include_head)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        keys = list(original)
        _load_subset(model, final_state, keys, "final state")
        sources = {"reinit": initial_state}
        if "rerand" in modes:
            sources["rerand"] = _fresh_state(model, seed)
        trained = float(evaluate(model))
        rows = []
        for name, units, layer_keys in tqdm(sets, desc="re-initialisation", leave=False):
            saved = {k: model.state_dict()[k].detach().clone() for k in layer_keys}
            for mode in modes:
                what = "initial state" if mode == "reinit" else f"fresh {mode} state"
                _load_subset(model, sources[mode], layer_keys, what)
                metric = float(evaluate(model))
                _load_subset(model, saved, layer_keys, "saved state")
                rows.append({"layer": name, "units": units, "mode": mode, "metric": metric, "trained": trained,
                             "drop": trained - metric})
        return rows
    finally:
        model.load_state_dict(original)
