"""I3D: Inception-v1 inflated to 3D (Carreira & Zisserman 2017), a faithful port of DeepMind's Kinetics-400 network.

Written here because no maintained, installable package ships a 3D I3D: the usual PyTorch port (piergiaj/pytorch-i3d
and its copies) is a research script with its own key names and a learned BatchNorm scale that the DeepMind weights do
not have, and nothing offers cut points or slimming. This one follows the DeepMind graph exactly:

- TensorFlow ``SAME`` padding, computed from each input's size (asymmetric when the total is odd: the extra voxel
  goes after); max-pools pad with ``-inf``;
- every convolution is bias-free and followed by BatchNorm (eps 1e-3) with a learned shift but no scale, then ReLU;
- stem ``Conv3d_1a_7x7`` (stride 2), ``MaxPool3d_2a_3x3`` (1x3x3, stride 1x2x2), ``Conv3d_2b_1x1``, ``Conv3d_2c_3x3``,
  ``MaxPool3d_3a_3x3`` (1x3x3, stride 1x2x2); then Inception blocks ``Mixed_3b..3c``, ``MaxPool3d_4a_3x3`` (3x3x3/2),
  ``Mixed_4b..4f``, ``MaxPool3d_5a_2x2`` (2x2x2/2), ``Mixed_5b..5c`` (1024 channels, total reduction 8x32x32).

Module names mirror DeepMind's blocks (``Mixed_3b.Branch_1.Conv3d_0b_3x3.conv.weight``), so
:meth:`I3D.convert_state_dict` maps the flat ``.npz`` export (``params/<block>/.../Conv_0/kernel`` in DHWIO,
``.../BatchNorm_0/bias``, ``batch_stats/.../BatchNorm_0/{mean,var}``) mechanically.

The published head (2x7x7 average pool, stride 1, then a 1x1x1 convolution with bias, then the mean over time) is
kept as ``logits.weight`` (400, 1024) and ``logits.bias``. medtl3d's head (global average pool + linear) computes
exactly those logits whenever the last feature map is 2x7x7, i.e. for 16x224x224 clips (the reference input); for
other sizes it averages over the whole map where I3D averaged sliding 2x7x7 windows.

Slimmable: every branch width of every Mixed block is a multiple of 8, so each branch (and hence the concatenated
output) divides cleanly by the width factor above the cut.

Units: ``Conv3d_1a_7x7``, ``Conv3d_2b_1x1`` and ``Conv3d_2c_3x3`` (block cut ``stem``), then one unit per Mixed block;
the block cuts ``Mixed_3``, ``Mixed_4`` and ``Mixed_5`` end at ``Mixed_3c``, ``Mixed_4f`` and ``Mixed_5c``. Each
max-pool opens the unit after it, so a cut returns the block's own (un-pooled) output.
"""

from __future__ import annotations

from functools import partial

import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Backbone, Unit
from ._layers import as_tuple, conv, unit_width
from ._registry import register_backbone

BN_EPS = 1e-3

# Mixed block -> (Branch_0 1x1, Branch_1 1x1 -> 3x3, Branch_2 1x1 -> 3x3, Branch_3 pool -> 1x1) output widths.
MIXED_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# Max-pool that opens a Mixed block's unit: name, kernel, stride.
POOL_BEFORE = {
    "Mixed_3b": ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    "Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
}
STAGE_ENDS = {"Mixed_3c": "Mixed_3", "Mixed_4f": "Mixed_4", "Mixed_5c": "Mixed_5"}
# DeepMind .npz export: "params/<path>/Conv_0/kernel", "batch_stats/<path>/BatchNorm_0/mean", ...
NPZ_KEY = re.compile(r"(?:params|batch_stats)/(.+)/(Conv_0|BatchNorm_0)/(\w+)")


def tf_same_padding(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """TensorFlow ``SAME`` padding in ``F.pad`` order (last axis first); an odd total puts the extra voxel after."""
    pads: list[int] = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class ShiftOnlyBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm with a learned shift but no learned scale (Sonnet's default, which the DeepMind weights use)."""

    def __init__(self, channels: int, eps: float = BN_EPS) -> None:
        super().__init__(channels, eps=eps, affine=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Unit3D(nn.Module):
    """DeepMind's ``Unit3D``: SAME-padded bias-free convolution, shift-only BatchNorm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel=1, stride=1) -> None:
        super().__init__()
        self.kernel, self.stride = as_tuple(kernel, 3), as_tuple(stride, 3)
        self.conv = conv(3, in_ch, out_ch, self.kernel, self.stride, 0)
        self.bn = ShiftOnlyBatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, tf_same_padding(tuple(x.shape[2:]), self.kernel, self.stride))
        return F.relu(self.bn(self.conv(x)), inplace=True)


class MaxPool3dSame(nn.Module):
    """Max-pool with TensorFlow ``SAME`` padding (padded voxels are ``-inf``, so they never win)."""

    def __init__(self, kernel, stride) -> None:
        super().__init__()
        self.kernel, self.stride = as_tuple(kernel, 3), as_tuple(stride, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, tf_same_padding(tuple(x.shape[2:]), self.kernel, self.stride), value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


class Mixed(nn.Module):
    """Inception block: four parallel branches (1x1; 1x1-3x3; 1x1-3x3; 3x3 max-pool-1x1) concatenated on channels."""

    def __init__(self, in_ch: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.Branch_0 = nn.Sequential(OrderedDict(Conv3d_0a_1x1=Unit3D(in_ch, b0)))
        self.Branch_1 = nn.Sequential(
            OrderedDict(Conv3d_0a_1x1=Unit3D(in_ch, b1a), Conv3d_0b_3x3=Unit3D(b1a, b1b, 3))
        )
        self.Branch_2 = nn.Sequential(
            OrderedDict(Conv3d_0a_1x1=Unit3D(in_ch, b2a), Conv3d_0b_3x3=Unit3D(b2a, b2b, 3))
        )
        self.Branch_3 = nn.Sequential(
            OrderedDict(MaxPool3d_0a_3x3=MaxPool3dSame(3, 1), Conv3d_0b_1x1=Unit3D(in_ch, b3))
        )
        self.out_channels = b0 + b1b + b2b + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.Branch_0(x), self.Branch_1(x), self.Branch_2(x), self.Branch_3(x)], dim=1)


class I3D(Backbone):
    """I3D backbone (no head) with DeepMind's block names.

    Units from index ``slim_from`` on (0-2 = stem convolutions, then one per Mixed block) are built with every
    branch width divided by ``width_factor`` (TransFusion).
    """

    def __init__(
        self, spatial_dims: int = 3, in_channels: int = 3, slim_from: int | None = None, width_factor: float = 2.0
    ) -> None:
        if spatial_dims != 3:
            raise ValueError(f"I3D is 3D only, got spatial_dims={spatial_dims}")
        super().__init__(spatial_dims, in_channels)

        width = partial(unit_width, slim_from=slim_from, width_factor=width_factor)

        c1, c2b, c2c = width(64, 0), width(64, 1), width(192, 2)
        self.Conv3d_1a_7x7 = Unit3D(in_channels, c1, 7, 2)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(c1, c2b)
        self.Conv3d_2c_3x3 = Unit3D(c2b, c2c, 3)
        units = [
            Unit("Conv3d_1a_7x7", ("Conv3d_1a_7x7",), c1, (2, 2, 2)),
            Unit("Conv3d_2b_1x1", ("MaxPool3d_2a_3x3", "Conv3d_2b_1x1"), c2b, (1, 2, 2)),
            Unit("Conv3d_2c_3x3", ("Conv3d_2c_3x3",), c2c, (1, 1, 1), block="stem"),
        ]
        in_ch = c2c
        for name, widths in MIXED_WIDTHS.items():
            modules, stride = (name,), (1, 1, 1)
            if name in POOL_BEFORE:
                pool_name, kernel, stride = POOL_BEFORE[name]
                self.add_module(pool_name, MaxPool3dSame(kernel, stride))
                modules = (pool_name, name)
            block = Mixed(in_ch, tuple(width(w, len(units)) for w in widths))
            self.add_module(name, block)
            units.append(Unit(name, modules, block.out_channels, stride, block=STAGE_ENDS.get(name)))
            in_ch = block.out_channels
        self._set_units(units)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convolutions (BatchNorm shifts start at zero)."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map DeepMind's flat ``.npz`` keys onto this module tree; native keys pass through unchanged.

        ``params/<path>/Conv_0/kernel`` (DHWIO) -> ``<path>.conv.weight`` (OIDHW); ``params/<path>/BatchNorm_0/bias``
        -> ``<path>.bn.bias``; ``batch_stats/<path>/BatchNorm_0/{mean,var}`` -> ``<path>.bn.running_{mean,var}``
        (the loader supplies the absent ``num_batches_tracked``); ``params/Logits/Conv3d_0c_1x1/Conv_0/{kernel,bias}`` -> the head
        ``logits.weight`` (classes, 1024) and ``logits.bias``. Keys that match none of these are left for the
        strict loader to report.
        """
        converted: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            match = NPZ_KEY.fullmatch(key)
            if match is None:
                converted[key] = value
                continue
            path, layer, leaf = match.groups()
            prefix = path.replace("/", ".")
            if path == "Logits/Conv3d_0c_1x1":  # the 1x1x1 logits convolution becomes a linear head
                converted[f"logits.{'weight' if leaf == 'kernel' else leaf}"] = (
                    value.flatten(0, -2).t() if leaf == "kernel" else value
                )
            elif (layer, leaf) == ("Conv_0", "kernel"):
                converted[f"{prefix}.conv.weight"] = value.permute(4, 3, 0, 1, 2)
            elif (layer, leaf) == ("BatchNorm_0", "bias"):
                converted[f"{prefix}.bn.bias"] = value
            elif layer == "BatchNorm_0" and leaf in ("mean", "var"):
                converted[f"{prefix}.bn.running_{leaf}"] = value.reshape(-1)
            else:
                converted[key] = value
        return converted


@register_backbone(
    "i3d", spatial_dims=(3,), default_input={3: (16, 224, 224)}, min_input={3: (8, 32, 32)}, in_channels=3,
    family="i3d", head_keys=("logits",),
)
def i3d(spatial_dims: int = 3, in_channels: int = 3, **kwargs) -> I3D:
    """I3D Inception-v1 (Carreira & Zisserman 2017), DeepMind block names: loads their Kinetics-400 .npz weights."""
    return I3D(spatial_dims, in_channels, **kwargs)
