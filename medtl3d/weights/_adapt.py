"""Tensor adaptations between a checkpoint and a backbone: input-channel change and 2D-to-3D inflation.

Input channels follow timm's ``adapt_input_conv`` rule (sum the RGB kernels for one channel, so a grey image
copied into three channels gives the same response; otherwise repeat and rescale by 3/C). Inflation follows I3D
(Carreira & Zisserman 2017): repeat each 2D kernel along depth and divide by the depth, so a depth-constant volume
gives the 2D response. That identity is exact only where depth padding repeats the border slice, which
:func:`replicate_depth_padding_` sets up (zero padding makes the first/last slices differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-conv kernel ``(O, C, *k)`` to ``in_channels`` input channels."""
    source = weight.shape[1]
    if source == in_channels:
        return weight
    dtype = weight.dtype
    weight = weight.float()
    if in_channels == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_channels // source)
        adapted = weight.repeat(1, repeats, *([1] * (weight.ndim - 2)))[:, :in_channels]
        adapted = adapted * (source / in_channels)
    return adapted.to(dtype)


def inflate_kernel(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """``(O, I, kH, kW)`` -> ``(O, I, depth, kH, kW)``: repeated along depth, divided by depth."""
    return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


def inflate_state_dict(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Inflate every 4D kernel of ``state`` whose 3D counterpart in ``target`` has one more (depth) axis.

    Linear weights keep their shape. Returns the new state and the inflated keys.
    """
    out, inflated = dict(state), []
    for key, value in state.items():
        goal = target.get(key)
        if goal is None or value.ndim != 4 or goal.ndim != 5:
            continue
        if tuple(goal.shape[:2]) + tuple(goal.shape[3:]) == tuple(value.shape[:2]) + tuple(value.shape[2:]):
            out[key] = inflate_kernel(value, goal.shape[2])
            inflated.append(key)
    return out, inflated


class DepthReplicateConv3d(nn.Conv3d):
    """``Conv3d`` whose depth padding repeats the border slice (height/width keep zero padding)."""

    depth_pad = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depth_pad:
            x = F.pad(x, (0, 0, 0, 0, self.depth_pad, self.depth_pad), mode="replicate")
        return super().forward(x)


def replicate_depth_padding_(model: nn.Module) -> nn.Module:
    """Swap every depth-padded ``Conv3d`` of ``model`` for a :class:`DepthReplicateConv3d` (same weights/keys)."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Conv3d or module.padding[0] == 0 or isinstance(module.padding, str):
            continue
        replacement = DepthReplicateConv3d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            (0,) + tuple(module.padding[1:]), module.dilation, module.groups, module.bias is not None,
        )
        replacement.depth_pad = module.padding[0]
        replacement.load_state_dict(module.state_dict())
        replacement.to(device=module.weight.device, dtype=module.weight.dtype)
        parent_path, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, replacement)
    return model
