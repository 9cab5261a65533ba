"""The one abstraction every backbone shares: an ordered list of units with named cut points.

A backbone keeps the module tree, and so the ``state_dict`` keys, of the published layout it mirrors
(torchvision, Hara et al., MONAI, PENet, ...), so that released checkpoints load without renaming. On top of that
tree it declares ``units``: the ordered steps of its forward pass, each owning some submodules. A cut point sits
after a unit; ``block`` cut points are stage boundaries (the hierarchical search's Stage-1 candidates), ``layer``
cut points sit after every residual/dense/inverted-residual/transformer block (Stage 2).

Every strategy (truncate, transfusion, freeze, re-sample) is a small operation on this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import UnknownCutPointError

LEVELS = ("block", "layer")


@dataclass(frozen=True)
class Unit:
    """One step of a backbone's forward pass.

    ``modules`` are the submodule paths this unit owns, in call order; by default the unit applies them one after
    the other (families with another data flow override :meth:`Backbone.forward_unit`). ``channels`` and
    ``stride`` describe the unit's output. ``block`` names the block cut point that ends at this unit, if any;
    ``layer`` says whether the unit's end is also a layer cut point (named after the unit).
    """

    name: str
    modules: tuple[str, ...]
    channels: int
    stride: tuple[int, ...]
    block: str | None = None
    layer: bool = True


@dataclass(frozen=True)
class CutPoint:
    """A place after which a backbone can be cut: name, level, output channels and total reduction."""

    name: str
    level: str
    unit: int
    channels: int
    reduction: tuple[int, ...]
    module: str

    @property
    def reduction_str(self) -> str:
        """``32`` when the reduction is the same along every axis, else ``1x16x16`` style."""
        if len(set(self.reduction)) == 1:
            return str(self.reduction[0])
        return "x".join(str(r) for r in self.reduction)


class Backbone(nn.Module):
    """Base class of every medtl3d backbone (2D or 3D, CNN or transformer).

    Subclasses build their module tree in the published layout and then call :meth:`_set_units`. ``forward(x,
    cut=None)`` runs up to a cut point (the last one by default) and returns a channels-first feature map
    ``(B, C, *spatial)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.units: list[Unit] = []
        self.name = type(self).__name__
        self.build_args: dict = {}

    # ----------------------------------------------------------------- declaration
    def _set_units(self, units: Sequence[Unit]) -> None:
        for unit in units:
            if len(unit.stride) != self.spatial_dims:
                raise ValueError(f"unit {unit.name}: stride {unit.stride} is not {self.spatial_dims}-dimensional")
        self.units = list(units)

    # ----------------------------------------------------------------- cut points
    @property
    def cut_points(self) -> list[CutPoint]:
        """All cut points in forward order (at a stage end, the layer cut comes before the block cut)."""
        cuts: list[CutPoint] = []
        reduction = [1] * self.spatial_dims
        for index, unit in enumerate(self.units):
            reduction = [r * s for r, s in zip(reduction, unit.stride)]
            module = unit.modules[-1] if unit.modules else unit.name
            if unit.layer:
                cuts.append(CutPoint(unit.name, "layer", index, unit.channels, tuple(reduction), module))
            if unit.block is not None:
                cuts.append(CutPoint(unit.block, "block", index, unit.channels, tuple(reduction), module))
        return cuts

    def cut_points_at(self, level: str | None = None) -> list[CutPoint]:
        """Cut points of one level (``block`` or ``layer``), or all of them."""
        if level is None or level == "all":
            return self.cut_points
        if level not in LEVELS:
            raise UnknownCutPointError(f"unknown cut-point level {level!r}; expected one of {LEVELS} or 'all'")
        return [c for c in self.cut_points if c.level == level]

    def cut_point(self, cut: str | CutPoint) -> CutPoint:
        """Look a cut point up by name; an unknown name raises an error listing the valid ones."""
        if isinstance(cut, CutPoint):
            cut = cut.name
        for candidate in self.cut_points:
            if candidate.name == cut:
                return candidate
        blocks = [c.name for c in self.cut_points if c.level == "block"]
        layers = [c.name for c in self.cut_points if c.level == "layer"]
        raise UnknownCutPointError(
            f"{self.name} has no cut point {cut!r}. Block cut points: {', '.join(blocks)}. "
            f"Layer cut points: {', '.join(layers)}."
        )

    @property
    def num_features(self) -> int:
        """Channels of the backbone's output (its last unit)."""
        return self.units[-1].channels

    @property
    def reduction(self) -> tuple[int, ...]:
        """Total stride of the backbone's output, per spatial axis."""
        return self.cut_points[-1].reduction

    # ----------------------------------------------------------------- forward
    def forward_unit(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Run unit ``index``; the default applies its modules in order."""
        for path in self.units[index].modules:
            x = self.get_submodule(path)(x)
        return x

    def to_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Turn a unit's output into a channels-first map (token models override this)."""
        return x

    def forward(self, x: torch.Tensor, cut: str | CutPoint | None = None) -> torch.Tensor:
        last = len(self.units) - 1 if cut is None else self.cut_point(cut).unit
        for index in range(last + 1):
            x = self.forward_unit(index, x)
        return self.to_feature_map(x)

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` features as a published classifier read them in training: the global average of the output map
        (class-token models override this)."""
        return torch.flatten(self(x), 2).mean(dim=2)

    def forward_cuts(self, x: torch.Tensor, cuts: Sequence[str | CutPoint]) -> dict[str, torch.Tensor]:
        """Feature maps at several cut points from one pass (stops after the deepest one)."""
        wanted = [self.cut_point(c) for c in cuts]
        by_unit: dict[int, list[str]] = {}
        for c in wanted:
            by_unit.setdefault(c.unit, []).append(c.name)
        out: dict[str, torch.Tensor] = {}
        for index in range(max(c.unit for c in wanted) + 1):
            x = self.forward_unit(index, x)
            for name in by_unit.get(index, []):
                out[name] = self.to_feature_map(x)
        return {c.name: out[c.name] for c in wanted}

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a foreign checkpoint layout onto this backbone's keys (families with legacy layouts override)."""
        return state

    # ----------------------------------------------------------------- ownership
    def unit_modules(self, index: int) -> list[nn.Module]:
        """Submodules owned by unit ``index`` (bare tensors it owns are left out)."""
        return [m for m in map(self._owned, self.units[index].modules) if isinstance(m, nn.Module)]

    def _owned(self, path: str) -> nn.Module | torch.Tensor:
        """A unit path names a submodule or, for tokens such as ``cls_token``, a bare parameter/buffer."""
        parent_path, _, child = path.rpartition(".")
        parent = self.get_submodule(parent_path) if parent_path else self
        if child in parent._parameters:
            return parent._parameters[child]
        if child in parent._buffers:
            return parent._buffers[child]
        return self.get_submodule(path)

    def unit_state_keys(self, index: int) -> list[str]:
        """``state_dict`` keys (parameters and buffers) owned by unit ``index``."""
        keys: list[str] = []
        for path in self.units[index].modules:
            owned = self._owned(path)
            if isinstance(owned, torch.Tensor):
                keys.append(path)
            else:
                keys.extend(f"{path}.{k}" for k in owned.state_dict().keys())
        return keys

    def unit_parameters(self, index: int) -> Iterator[nn.Parameter]:
        for path in self.units[index].modules:
            owned = self._owned(path)
            if isinstance(owned, nn.Parameter):
                yield owned
            elif isinstance(owned, nn.Module):
                yield from owned.parameters()

    def unit_of_key(self) -> dict[str, int]:
        """Map every ``state_dict`` key to the index of the unit that owns it."""
        return {key: index for index in range(len(self.units)) for key in self.unit_state_keys(index)}

    # ----------------------------------------------------------------- surgery
    def truncate_(self, cut: str | CutPoint) -> "Backbone":
        """Drop every unit after ``cut`` (in place) and the modules they own; returns ``self``."""
        point = self.cut_point(cut)
        kept = {p for u in self.units[: point.unit + 1] for p in u.modules}
        for unit in self.units[point.unit + 1 :]:
            for path in unit.modules:
                if path in kept:
                    continue
                parent_path, _, child = path.rpartition(".")
                parent = self.get_submodule(parent_path) if parent_path else self
                for table in (parent._modules, parent._parameters, parent._buffers):
                    table.pop(child, None)
        self.units = self.units[: point.unit + 1]
        self._remove_empty_containers()
        return self

    def _remove_empty_containers(self) -> None:
        """Delete container modules left without children (e.g. a fully dropped ``layer4``)."""
        changed = True
        while changed:
            changed = False
            for name, module in list(self.named_modules()):
                if not name or not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                    continue
                if len(module._modules) == 0:
                    parent_path, _, child = name.rpartition(".")
                    parent = self.get_submodule(parent_path) if parent_path else self
                    del parent._modules[child]
                    changed = True
                    break

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, units={len(self.units)}"
