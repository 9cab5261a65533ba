"""Backbone registry: ``@register_backbone`` on a builder, ``create_backbone`` and ``list_backbones`` to use it.

Each entry records what a user (and the strategies) must know before building: which spatial dimensions the
architecture supports, its default and smallest valid input size and whether TransFusion can slim it. Named
pretrained weights live in the weights catalogue (:mod:`medtl3d.weights.catalogue`), keyed by architecture name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import UnknownBackboneError
from ._base import Backbone


@dataclass(frozen=True)
class BackboneEntry:
    """What the registry knows about one backbone name."""

    name: str
    builder: Callable[..., Backbone]
    spatial_dims: tuple[int, ...]
    default_input: dict[int, tuple[int, ...]]
    min_input: dict[int, tuple[int, ...]]
    in_channels: int = 3
    family: str = ""
    description: str = ""
    slimmable: bool = True
    head_keys: tuple[str, ...] = ()

    def too_small(self, spatial) -> tuple[int, ...] | None:
        """The registered minimum for ``len(spatial)``-D input when ``spatial`` falls short of it on some axis
        (None when it fits or no minimum is registered): one check for the efficiency report and, before anything
        trains, the search and the study."""
        minimum = self.min_input.get(len(spatial))
        return minimum if minimum is not None and any(s < m for s, m in zip(spatial, minimum)) else None


_REGISTRY: dict[str, BackboneEntry] = {}
_NAMESPACES: dict[str, Callable[[str], BackboneEntry]] = {}


def register_backbone(
    name: str,
    *,
    spatial_dims: tuple[int, ...],
    default_input: dict[int, tuple[int, ...]],
    min_input: dict[int, tuple[int, ...]],
    in_channels: int = 3,
    family: str = "",
    description: str = "",
    slimmable: bool = True,
    head_keys: tuple[str, ...] = (),
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Register a builder ``fn(spatial_dims, in_channels, **kwargs) -> Backbone`` under ``name``.

    ``head_keys`` are the state_dict prefixes of the published classifier (``fc``, ``classifier``...): weight files
    carry them, backbones do not.
    """

    def decorator(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = BackboneEntry(
            name=name,
            builder=fn,
            spatial_dims=tuple(spatial_dims),
            default_input=dict(default_input),
            min_input=dict(min_input),
            in_channels=in_channels,
            family=family,
            description=description or (fn.__doc__ or "").strip().splitlines()[0],
            slimmable=slimmable,
            head_keys=tuple(head_keys),
        )
        return fn

    return decorator


def register_namespace(prefix: str, resolver: Callable[[str], BackboneEntry]) -> None:
    """Let ``resolver(name)`` answer every name starting with ``prefix`` (``timm/``: any timm model)."""
    _NAMESPACES[prefix] = resolver


def list_backbones(spatial_dims: int | None = None) -> list[str]:
    """Registered backbone names (optionally only those that support ``spatial_dims``), sorted."""
    return sorted(n for n, e in _REGISTRY.items() if spatial_dims is None or spatial_dims in e.spatial_dims)


def get_entry(name: str) -> BackboneEntry:
    """Registry entry of ``name``; an unknown name raises an error listing the registered ones."""
    for prefix, resolver in _NAMESPACES.items():
        if name.startswith(prefix):
            return resolver(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; registered backbones: {', '.join(list_backbones())}"
        ) from None


def build_backbone(name: str, spatial_dims: int | None = None, in_channels: int | None = None,
                   batch_norm_eps: float | None = None, **kwargs) -> Backbone:
    """Build a randomly initialised backbone (no weight loading); ``kwargs`` go to the family builder.
    ``batch_norm_eps`` sets every BatchNorm's epsilon, for weights trained with another one (Keras: 1.001e-5);
    it stays in ``build_args``, so rebuilds (strategies, checkpoints) keep it."""
    entry = get_entry(name)
    dims = entry.spatial_dims[0] if spatial_dims is None else int(spatial_dims)
    if dims not in entry.spatial_dims:
        raise UnknownBackboneError(
            f"backbone {name!r} supports spatial_dims {entry.spatial_dims}, not {dims}"
        )
    channels = entry.in_channels if in_channels is None else int(in_channels)
    if channels < 1:
        raise UnknownBackboneError(f"in_channels must be >= 1, got {channels} for backbone {name!r}")
    backbone = entry.builder(spatial_dims=dims, in_channels=channels, **kwargs)
    backbone.name = name
    backbone.build_args = {"spatial_dims": dims, "in_channels": channels, **kwargs}
    if batch_norm_eps is not None:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = float(batch_norm_eps)
        backbone.build_args["batch_norm_eps"] = float(batch_norm_eps)
    return backbone
