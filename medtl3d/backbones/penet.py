"""PENet (Huang et al. 2020, "PENet - a scalable deep-learning model for automated diagnosis of pulmonary embolism").

The classifier encoder of marshuang80/penet (``PENetClassifier(model_depth=50, cardinality=32)``): a 3D
ResNeXt-50-style network with GroupNorm (16 channels per group), LeakyReLU (slope 0.01), a squeeze-excitation gate
(reduction 16) on every bottleneck and a stem of stride (1, 2, 2) followed by a 3x3x3/2 max-pool. Encoder ``i`` has
``3, 4, 6, 3`` bottlenecks of width ``128 * 2**i`` (expansion 2); the first bottleneck of encoders 1-3 strides by 2 in
its grouped 3x3x3 convolution and its projection shortcut.

Written here because no maintained package offers PENet: the authors' code is a research repository (not
installable, Python-pickled checkpoints, no cut points). The module tree keeps their ``state_dict`` keys exactly
(``in_conv.0.weight``, ``encoders.2.penet_blocks.4.se_block.excite.0.weight`` ...), so their Kinetics-600 and
pulmonary-embolism checkpoints (``{"model_state": {"module." + key: ...}}``, head ``classifier.fc``) load unchanged;
older checkpoints that call the blocks ``xnet_blocks`` are renamed by :meth:`PENet.convert_state_dict`. PENet's own
forward repeats a 1-channel CT input over the 3 RGB channels; summing the RGB kernels of the first convolution (what
medtl3d's first-conv adaptation does for ``in_channels=1``) computes the same thing.

Like PENet, bottlenecks are skipped at random while training (stochastic depth, survival probability falling linearly
from 1 to ``final_survival_prob`` = 0.5 over the 16 blocks); ``final_survival_prob=1.0`` turns that off.

Units: ``stem`` (``in_conv``, ``max_pool``; block cut ``stem``) and one unit per bottleneck
(``encoders.0.penet_blocks.0`` ... ``encoders.3.penet_blocks.2``; the last one of encoder ``i`` also ends the block
cut ``encoders.i``).
"""

from __future__ import annotations

from functools import partial

import math

import torch
from torch import nn

from ._base import Backbone, Unit
from ._layers import conv, max_pool, unit_width
from ._registry import register_backbone

CHANNELS_PER_GROUP = 16
SE_REDUCTION = 16
EXPANSION = 2
ENCODER_BLOCKS = (3, 4, 6, 3)


def group_norm(channels: int) -> nn.GroupNorm:
    """PENet's GroupNorm: one group per 16 channels."""
    return nn.GroupNorm(channels // CHANNELS_PER_GROUP, channels)


class SqueezeExcitation(nn.Module):
    """Channel gate of Hu et al. 2018: global average pool, bottleneck MLP, sigmoid, rescale."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.excite = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.LeakyReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.excite(x.mean(dim=tuple(range(2, x.ndim))))
        return x * gate.view(*gate.shape, *([1] * (x.ndim - 2)))


class PENetBottleneck(nn.Module):
    """ResNeXt bottleneck with GroupNorm, LeakyReLU and squeeze-excitation before the residual sum.

    While training, the whole residual branch is skipped (the block returns its shortcut) with probability
    ``1 - survival_prob``.
    """

    def __init__(
        self, in_ch: int, mid: int, out: int, stride: int, cardinality: int, survival_prob: float = 1.0
    ) -> None:
        super().__init__()
        self.survival_prob = survival_prob
        self.down_sample = None
        if stride != 1 or in_ch != out:
            self.down_sample = nn.Sequential(conv(3, in_ch, out, 1, stride, 0), group_norm(out))
        self.conv1 = conv(3, in_ch, mid, 1, 1, 0)
        self.norm1 = group_norm(mid)
        self.relu1 = nn.LeakyReLU(inplace=True)
        self.conv2 = conv(3, mid, mid, 3, stride, 1, groups=cardinality)
        self.norm2 = group_norm(mid)
        self.relu2 = nn.LeakyReLU(inplace=True)
        self.conv3 = conv(3, mid, out, 1, 1, 0)
        self.norm3 = group_norm(out)
        self.se_block = SqueezeExcitation(out)
        self.relu3 = nn.LeakyReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.down_sample is None else self.down_sample(x)
        if self.training and torch.rand(()).item() > self.survival_prob:
            return shortcut
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.relu2(self.norm2(self.conv2(out)))
        out = self.se_block(self.norm3(self.conv3(out)))
        return self.relu3(out + shortcut)


class PENet(Backbone):
    """PENet classifier encoder (no head) in the marshuang80/penet key layout.

    Units from index ``slim_from`` on (0 = stem, then one per bottleneck) are built with their widths divided by
    ``width_factor`` (TransFusion), rounded so that GroupNorm keeps 16 channels per group and the grouped
    convolution keeps ``cardinality`` groups.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 3,
        cardinality: int = 32,
        final_survival_prob: float = 0.5,
        slim_from: int | None = None,
        width_factor: float = 2.0,
    ) -> None:
        if spatial_dims != 3:
            raise ValueError(f"PENet is 3D only, got spatial_dims={spatial_dims}")
        super().__init__(spatial_dims, in_channels)

        width = partial(unit_width, slim_from=slim_from, width_factor=width_factor)

        stem_out = width(64, 0, CHANNELS_PER_GROUP)
        self.in_conv = nn.Sequential(
            conv(3, in_channels, stem_out, 7, (1, 2, 2), 3), group_norm(stem_out), nn.LeakyReLU(inplace=True)
        )
        self.max_pool = max_pool(3, 3, 2, 1)
        units = [Unit("stem", ("in_conv", "max_pool"), stem_out, (2, 4, 4), block="stem", layer=False)]

        total_blocks = sum(ENCODER_BLOCKS)
        mid_multiple = math.lcm(cardinality, CHANNELS_PER_GROUP)
        in_ch, block_index = stem_out, 0
        self.encoders = nn.ModuleList()
        for encoder_index, num_blocks in enumerate(ENCODER_BLOCKS):
            channels = 128 * 2**encoder_index
            blocks = nn.Sequential()
            for index_in_encoder in range(num_blocks):
                unit_index = block_index + 1
                stride = 2 if encoder_index > 0 and index_in_encoder == 0 else 1
                mid = width(cardinality * (channels // cardinality), unit_index, mid_multiple)
                out = width(channels * EXPANSION, unit_index, CHANNELS_PER_GROUP)
                survival = 1.0 - block_index / total_blocks * (1.0 - final_survival_prob)
                blocks.add_module(
                    str(index_in_encoder),
                    PENetBottleneck(in_ch, mid, out, stride, cardinality, survival),
                )
                path = f"encoders.{encoder_index}.penet_blocks.{index_in_encoder}"
                last = index_in_encoder == num_blocks - 1
                units.append(Unit(path, (path,), out, (stride,) * 3,
                                  block=f"encoders.{encoder_index}" if last else None))
                in_ch, block_index = out, block_index + 1
            self.encoders.append(nn.ModuleDict({"penet_blocks": blocks}))
        self._set_units(units)
        self._init_weights()

    def _init_weights(self) -> None:
        """PENet's ``kaiming`` init: Kaiming-normal conv/linear weights, zero biases, unit GroupNorm except a zero
        gamma on each bottleneck's last norm (every residual branch starts silent)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, PENetBottleneck):
                nn.init.zeros_(m.norm3.weight)

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the ``xnet_blocks`` of older PENet checkpoints to ``penet_blocks``."""
        return {key.replace(".xnet_blocks.", ".penet_blocks."): value for key, value in state.items()}


@register_backbone(
    "penet", spatial_dims=(3,), default_input={3: (24, 192, 192)}, min_input={3: (16, 32, 32)}, in_channels=3,
    family="penet", head_keys=("classifier",),
)
def penet(spatial_dims: int = 3, in_channels: int = 3, **kwargs) -> PENet:
    """PENet classifier encoder (Huang et al. 2020), marshuang80/penet layout: loads their Kinetics/PE checkpoints."""
    return PENet(spatial_dims, in_channels, **kwargs)
