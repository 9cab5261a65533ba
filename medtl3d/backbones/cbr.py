"""Raghu et al. 2019 (Transfusion) CBR family in 2D and 3D: cbr_larget, cbr_largew, cbr_small, cbr_tiny.

Small stacks of conv-BN-ReLU ("CBR") blocks, each followed by a 3x3 stride-2 max-pool, as specified in the paper's
appendix; the head (global average pool, dropout 0.1, linear) is not part of the backbone. No maintained library
ships them, so they are written here, dimension-agnostic and slimmable. Keys follow the public TTL code
(sun-umn/TTL ``utils/CBR.py``): ``CBR1.conv`` (with bias), ``CBR1.bn``, ``pool1``, ..., head ``fc``.

Unlike TTL's unpadded convolutions, convolutions and pools here are 'same'-padded, so every CBR block halves the
spatial size exactly (the cut points' declared reduction holds for any input size).

+-----------+--------+--------------------------+---------------+
| name      | kernel | widths                   | last max-pool |
+===========+========+==========================+===============+
| LargeT    | 7      | 32, 64, 128, 256, 512    | no            |
| LargeW    | 7      | 64, 128, 256, 512        | yes           |
| Small     | 7      | 32, 64, 128, 256         | yes           |
| Tiny      | 5      | 64, 128, 256, 512        | yes           |
+-----------+--------+--------------------------+---------------+

Units: one per CBR block (with its pool), ``cbr1`` ... ``cbrN``; each is both a layer and a block cut point
(same name: they are the same cut).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._base import Backbone, Unit
from ._layers import as_tuple, batch_norm, conv, init_conv_bn_, max_pool, unit_width
from ._registry import register_backbone


class CBR(nn.Module):
    """Convolution (stride 1, 'same' padding, with bias as in TTL), batch norm, ReLU."""

    def __init__(self, dims: int, in_ch: int, out_ch: int, kernel: int) -> None:
        super().__init__()
        self.conv = conv(dims, in_ch, out_ch, kernel, 1, bias=True)
        self.bn = batch_norm(dims, out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class CBRNet(Backbone):
    """A CBR stack (no head): block ``i`` has ``widths[i]`` channels and, except possibly the last, a max-pool.

    Units from index ``slim_from`` on (one per CBR block) are built with their width divided by ``width_factor``
    (TransFusion).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        widths: Sequence[int],
        kernel_size: int,
        pool_last: bool = True,
        slim_from: int | None = None,
        width_factor: float = 2.0,
    ) -> None:
        super().__init__(spatial_dims, in_channels)
        dims = spatial_dims
        units: list[Unit] = []
        channels = in_channels
        for index, full_width in enumerate(widths):
            number = index + 1
            out = unit_width(full_width, index, slim_from=slim_from, width_factor=width_factor)
            self.add_module(f"CBR{number}", CBR(dims, channels, out, kernel_size))
            modules = (f"CBR{number}",)
            stride = as_tuple(1, dims)
            if pool_last or number < len(widths):
                self.add_module(f"pool{number}", max_pool(dims, 3, 2, 1))
                modules += (f"pool{number}",)
                stride = as_tuple(2, dims)
            units.append(Unit(f"cbr{number}", modules, out, stride, block=f"cbr{number}"))
            channels = out
        self._set_units(units)
        init_conv_bn_(self)



_INPUT = {2: (224, 224), 3: (64, 128, 128)}
_MIN = {2: (32, 32), 3: (32, 32, 32)}


@register_backbone("cbr_larget", spatial_dims=(2, 3), default_input=_INPUT, min_input=_MIN, family="cbr",
                   head_keys=("fc",))
def cbr_larget(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> CBRNet:
    """CBR-LargeT(all): five 7x7 CBR blocks, 32 to 512 channels, no pool after the last (Raghu et al. 2019)."""
    return CBRNet(spatial_dims, in_channels, (32, 64, 128, 256, 512), 7, pool_last=False, **kwargs)


@register_backbone("cbr_largew", spatial_dims=(2, 3), default_input=_INPUT, min_input=_MIN, family="cbr",
                   head_keys=("fc",))
def cbr_largew(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> CBRNet:
    """CBR-LargeW(ide): four 7x7 CBR blocks, 64 to 512 channels (Raghu et al. 2019)."""
    return CBRNet(spatial_dims, in_channels, (64, 128, 256, 512), 7, **kwargs)


@register_backbone("cbr_small", spatial_dims=(2, 3), default_input=_INPUT, min_input=_MIN, family="cbr",
                   head_keys=("fc",))
def cbr_small(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> CBRNet:
    """CBR-Small: four 7x7 CBR blocks, 32 to 256 channels (Raghu et al. 2019)."""
    return CBRNet(spatial_dims, in_channels, (32, 64, 128, 256), 7, **kwargs)


@register_backbone("cbr_tiny", spatial_dims=(2, 3), default_input=_INPUT, min_input=_MIN, family="cbr",
                   head_keys=("fc",))
def cbr_tiny(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> CBRNet:
    """CBR-Tiny: four 5x5 CBR blocks, 64 to 512 channels (Raghu et al. 2019)."""
    return CBRNet(spatial_dims, in_channels, (64, 128, 256, 512), 5, **kwargs)
