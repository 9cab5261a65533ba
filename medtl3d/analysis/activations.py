"""Capture activations at cut points and flatten them into ``(datapoints, features)`` matrices.

Every representation analysis compares matrices whose rows are datapoints. A conv activation ``(N, C, *spatial)``
(2D or 3D alike) becomes one under an explicit *flattening policy*:

- ``"pooled"``: global average over space, ``(N, C)``: one datapoint per image;
- ``"spatial"``: every spatial position is a datapoint, ``(N * prod(spatial), C)`` (the convolutional SVCCA of
  Raghu et al. 2017); ``spatial_size`` first average-pools the map to that grid, ``channels`` keeps a fixed random
  subset of channels;
- ``"flatten"``: the whole map as one vector, ``(N, C * prod(spatial))`` (the CKA of Kornblith et al. 2019);
  ``spatial_size`` and ``channels`` shrink it first.

The channel subset is drawn once from ``seed`` and the channel count, so every batch (and every model with that
width) keeps the same channels.

Activations come from a Backbone's cut points (``Backbone.forward_cuts``: one pass that stops after the deepest cut;
a TransferModel is read through its backbone) or, for any other ``nn.Module``, from forward hooks on named
submodules. :func:`iter_activations` / :func:`iter_paired_activations` stream per-batch flattened tensors so that
accumulators (``MinibatchCKA``) never hold the whole dataset; :func:`collect_activations` concatenates them for the
small case.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..engine.runtime import on_terminal
from ..errors import AnalysisError
from .predictions import batch_images, batch_targets

logger = logging.getLogger(__name__)

POLICIES = ("pooled", "spatial", "flatten")


# ---------------------------------------------------------------------------------------------------- flattening
def _channel_subset(num_channels: int, channels: int, seed: int) -> torch.Tensor:
    """A sorted, reproducible subset of ``channels`` channel indices out of ``num_channels``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_channels, generator=generator)[:channels].sort().values


def resize_spatial(a: torch.Tensor, spatial_size: int | Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of ``(N, C, *spatial)`` to ``spatial_size`` (an int is used for every axis)."""
    dims = a.ndim - 2
    if dims not in (1, 2, 3):
        raise AnalysisError(f"spatial resizing needs a (N, C, *spatial) map with 1-3 spatial axes, got {tuple(a.shape)}")
    size = (spatial_size,) * dims if isinstance(spatial_size, int) else tuple(spatial_size)
    if len(size) != dims or any(s < 1 for s in size):
        raise AnalysisError(f"spatial_size {spatial_size!r} does not fit a map with {dims} spatial axes")
    if tuple(a.shape[2:]) == size:
        return a
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[dims - 1]
    return pool(a, size)


def flatten_activations(a, policy: str = "pooled", spatial_size: int | Sequence[int] | None = None,
                        channels: int | None = None, seed: int = 0) -> torch.Tensor:
    """``(datapoints, features)`` from an activation: ``(N, F)`` is kept, ``(N, C, *spatial)`` follows ``policy``."""
    if policy not in POLICIES:
        raise AnalysisError(f"unknown flattening policy {policy!r}; choose one of {', '.join(POLICIES)}")
    a = torch.as_tensor(a)
    if a.ndim < 2:
        raise AnalysisError(f"activations need a datapoint axis and a feature axis, got shape {tuple(a.shape)}")
    if a.ndim == 2:
        return a
    if channels is not None:
        if not 1 <= channels <= a.shape[1]:
            raise AnalysisError(f"channels={channels} is outside 1..{a.shape[1]} (the activation's channel count)")
        if channels < a.shape[1]:
            a = a.index_select(1, _channel_subset(a.shape[1], channels, seed).to(a.device))
    if policy == "pooled":
        if spatial_size is not None:
            raise AnalysisError("spatial_size applies to the 'spatial' and 'flatten' policies, not to 'pooled'")
        return a.flatten(2).mean(dim=2)
    if spatial_size is not None:
        a = resize_spatial(a, spatial_size)
    if policy == "flatten":
        return a.flatten(1)
    return a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1])


# ---------------------------------------------------------------------------------------------------- extraction
def _dedupe(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _backbone_of(model: nn.Module):
    """The medtl3d Backbone behind ``model`` (itself, or a TransferModel's ``backbone``), else None."""
    if hasattr(model, "forward_cuts") and hasattr(model, "cut_points"):
        return model
    inner = getattr(model, "backbone", None)
    if inner is not None and hasattr(inner, "forward_cuts") and hasattr(inner, "cut_points"):
        return inner
    return None


def resolve_cuts(model: nn.Module, cuts: str | Sequence[str]) -> list[str]:
    """Validated cut names: a list of names, or a level (``block``, ``layer``, ``all``) of a Backbone's cut points.

    For a Backbone (or TransferModel) the names are its cut points; for any other module, submodule paths. An
    unknown name raises :class:`AnalysisError` listing the valid ones.
    """
    backbone = _backbone_of(model)
    if isinstance(cuts, str):
        if backbone is not None and cuts in ("block", "layer", "all"):
            return _dedupe(c.name for c in backbone.cut_points_at(cuts))
        cuts = [cuts]
    cuts = _dedupe(cuts)
    if not cuts:
        raise AnalysisError("no cut points given")
    if backbone is not None:
        valid = _dedupe(c.name for c in backbone.cut_points)
        unknown = [c for c in cuts if c not in valid]
        if unknown:
            raise AnalysisError(
                f"{getattr(backbone, 'name', type(backbone).__name__)} has no cut point {', '.join(map(repr, unknown))}; "
                f"valid cut points: {', '.join(valid)}"
            )
        return cuts
    modules = dict(model.named_modules())
    unknown = [c for c in cuts if c not in modules]
    if unknown:
        names = [n for n in modules if n]
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise AnalysisError(f"{type(model).__name__} has no submodule {', '.join(map(repr, unknown))}; "
                            f"valid names: {shown}")
    return cuts


def _extractor(model: nn.Module, cuts: list[str]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """``x -> {cut: raw activation}``: Backbone.forward_cuts, or forward hooks on submodules of any other module."""
    backbone = _backbone_of(model)
    if backbone is not None:
        return lambda x: backbone.forward_cuts(x, cuts)
    modules = dict(model.named_modules())

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        handles = [
            modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
            for name in cuts
        ]
        try:
            model(x)
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in cuts if not isinstance(captured.get(name), torch.Tensor)]
        if missing:
            raise AnalysisError(f"submodules {', '.join(missing)} did not return a tensor during the forward pass")
        return {name: captured[name] for name in cuts}

    return run


@contextmanager
def _eval_mode(models: Sequence[nn.Module]):
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _batches(data, batch_size: int) -> Iterable:
    """Batches from a DataLoader / iterable of batches, a map-style Dataset, or one ``(N, ...)`` tensor."""
    if isinstance(data, torch.Tensor):
        return data.split(batch_size)
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def _device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _progress(iterable: Iterable, desc: str, enabled: bool) -> Iterable:
    """A tqdm bar over ``iterable`` when ``enabled`` and stderr is a terminal (never into a log file)."""
    if not (enabled and on_terminal()):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: fall back to no bar
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


def _iterate(models: Sequence[nn.Module], data, cuts: Sequence[Sequence[str]], policy: str, spatial_size,
             channels, seed: int, batch_size: int, device, with_labels: bool,
             progress: bool) -> Iterator[tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]]:
    flatten_activations(torch.zeros(1, 1), policy)  # validate the policy before any forward pass
    extractors = [_extractor(m, list(c)) for m, c in zip(models, cuts)]
    devices = [_device(m, device) for m in models]
    seen = 0
    with _eval_mode(models):
        for batch in _progress(_batches(data, batch_size), "activations", progress):
            x = batch_images(batch)
            labels = batch_targets(batch).reshape(-1) if with_labels else None
            out = []
            with torch.no_grad():  # only around the forward: the caller's code between batches keeps its grad mode
                for extract, dev in zip(extractors, devices):
                    raw = extract(x.to(dev))
                    out.append({name: flatten_activations(a, policy, spatial_size, channels, seed)
                                for name, a in raw.items()})
            seen += x.shape[0]
            yield out, labels
    if seen == 0:
        raise AnalysisError("the data yielded no batches: nothing to capture activations from")
    logger.debug("captured activations of %d datapoints", seen)


def iter_activations(model: nn.Module, data, cuts: str | Sequence[str], policy: str = "pooled", *,
                     spatial_size: int | Sequence[int] | None = None, channels: int | None = None, seed: int = 0,
                     batch_size: int = 32, device=None, progress: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Stream ``{cut: (rows, features)}`` per batch of ``data`` (model in eval mode, no gradients).

    ``data`` is a DataLoader or any iterable of batches (a tensor, an ``(image, label)`` pair or a dict with
    ``image``), a map-style Dataset (batched by ``batch_size``, in order) or one ``(N, C, *spatial)`` tensor.
    """
    names = resolve_cuts(model, cuts)
    for (acts,), _ in _iterate([model], data, [names], policy, spatial_size, channels, seed, batch_size, device,
                               False, progress):
        yield acts


def iter_paired_activations(model_a: nn.Module, model_b: nn.Module, data, cuts_a: str | Sequence[str],
                            cuts_b: str | Sequence[str] | None = None, policy: str = "pooled", *,
                            spatial_size: int | Sequence[int] | None = None, channels: int | None = None,
                            seed: int = 0, batch_size: int = 32, device=None,
                            progress: bool = False) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Stream ``({cut_a: acts}, {cut_b: acts})`` of two models on the same batches (``cuts_b`` defaults to
    ``cuts_a``), so their rows always describe the same datapoints."""
    names_a = resolve_cuts(model_a, cuts_a)
    names_b = resolve_cuts(model_b, cuts_a if cuts_b is None else cuts_b)
    for (acts_a, acts_b), _ in _iterate([model_a, model_b], data, [names_a, names_b], policy, spatial_size, channels,
                                        seed, batch_size, device, False, progress):
        yield acts_a, acts_b


def collect_activations(model: nn.Module, data, cuts: str | Sequence[str], policy: str = "pooled", *,
                        spatial_size: int | Sequence[int] | None = None, channels: int | None = None, seed: int = 0,
                        batch_size: int = 32, device=None, progress: bool = False,
                        return_labels: bool = False):
    """All flattened activations on the CPU: ``{cut: (rows, features)}`` (and the ``(N,)`` labels when
    ``return_labels``). Holds everything in memory: for large data stream with :func:`iter_activations`."""
    names = resolve_cuts(model, cuts)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    labels: list[torch.Tensor] = []
    for (acts,), y in _iterate([model], data, [names], policy, spatial_size, channels, seed, batch_size, device,
                               return_labels, progress):
        for name in names:  # plain tensors: MONAI MetaTensors carry per-sample metadata that breaks row indexing
            parts[name].append(acts[name].cpu().as_subclass(torch.Tensor))
        if return_labels:
            labels.append(y.cpu().as_subclass(torch.Tensor))
    collected = {name: torch.cat(chunks) for name, chunks in parts.items()}
    return (collected, torch.cat(labels)) if return_labels else collected
