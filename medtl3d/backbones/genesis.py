"""The encoder of Models Genesis' 3D U-Net (Zhou et al., MICCAI 2019 / Medical Image Analysis 2021).

Written here because no maintained library ships it; module names follow the published code (MrGiovanni/
ModelsGenesis ``pytorch/unet3d.py``) so ``Genesis_Chest_CT.pt`` loads: four ``DownTransition``s ``down_tr64`` ..
``down_tr512``, each two ``LUConv`` (3x3x3 conv with bias, batch norm, ReLU) in ``ops``; the first three end with a
2x2x2 max-pool. Widths 32-64, 64-128, 128-256, 256-512. The decoder (``up_tr*``, ``out_tr``) is not part of the
backbone. Models Genesis' ``ContBatchNorm3d`` normalises with batch statistics even in evaluation; here the norm is
a plain ``BatchNorm3d`` with the same tensors (running statistics at evaluation, as every other backbone).

Units ``down_tr64`` .. ``down_tr512`` are block and layer cut points; 3D only. The decoder's tensors in a
published file are kept aside as the backbone's ``pretrained_head``.
"""

from __future__ import annotations

from torch import nn

from ._base import Backbone, Unit
from ._layers import as_tuple, batch_norm, conv, init_conv_bn_, max_pool, unit_width
from ._registry import register_backbone


class LUConv(nn.Module):
    """3x3x3 convolution with bias, batch norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = conv(3, in_ch, out_ch, 3, bias=True)
        self.bn1 = batch_norm(3, out_ch)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activation(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """Two LUConvs (``ops``), then a 2x2x2 max-pool unless it is the deepest."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, pool: bool) -> None:
        super().__init__()
        self.ops = nn.Sequential(LUConv(in_ch, mid_ch), LUConv(mid_ch, out_ch))
        self.maxpool = max_pool(3, 2, 2, 0) if pool else nn.Identity()

    def forward(self, x):
        return self.maxpool(self.ops(x))


class GenesisEncoder(Backbone):
    """Models Genesis' 3D U-Net encoder; units from ``slim_from`` on are ``width_factor`` narrower (TransFusion)."""

    DEPTHS = ((32, 64), (64, 128), (128, 256), (256, 512))

    def __init__(self, spatial_dims: int, in_channels: int, slim_from: int | None = None,
                 width_factor: float = 2.0) -> None:
        super().__init__(spatial_dims, in_channels)
        units, channels = [], in_channels
        for index, widths in enumerate(self.DEPTHS):
            mid, out = (unit_width(w, index, slim_from=slim_from, width_factor=width_factor) for w in widths)
            name = f"down_tr{widths[1]}"
            pool = index < len(self.DEPTHS) - 1
            self.add_module(name, DownTransition(channels, mid, out, pool))
            units.append(Unit(name, (name,), out, as_tuple(2 if pool else 1, 3), block=name))
            channels = out
        self._set_units(units)
        init_conv_bn_(self)


@register_backbone("genesis_unet3d", spatial_dims=(3,), default_input={3: (32, 64, 64)},
                   min_input={3: (8, 8, 8)}, in_channels=1, family="genesis", head_keys=("up_tr256", "up_tr128", "up_tr64", "out_tr"))
def genesis_unet3d(spatial_dims: int = 3, in_channels: int = 1, **kwargs) -> GenesisEncoder:
    """Models Genesis 3D U-Net encoder (Zhou et al. 2019), published module names; loads Genesis_Chest_CT.pt."""
    return GenesisEncoder(spatial_dims, in_channels, **kwargs)
