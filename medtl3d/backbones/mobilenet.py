"""MobileNetV2 in 2D and 3D (``mobilenet_v2``), torchvision layout; also reads timm's ``mobilenetv2_100`` layout.

Written here rather than taken from torchvision because torchvision is 2D only and cannot rebuild the inverted
residuals above an arbitrary one at reduced width (TransFusion). Keys are torchvision's: ``features.0`` (3x3/2 conv,
BN, ReLU6), ``features.1`` ... ``features.17`` (inverted residuals, ``.conv`` inside), ``features.18`` (1x1 conv to
1280, BN, ReLU6); the published head is ``classifier.1`` (``classifier.0`` is its dropout).

Units: ``stem`` (block cut), one unit per inverted residual (layer cuts ``features.1`` ... ``features.17``; the last
residual of each row of the paper's (t, c, n, s) table also ends the block cut ``stage1`` ... ``stage7``) and
``features.18`` (block cut ``features.18``).
"""

from __future__ import annotations

from functools import partial

import re
from itertools import accumulate

import torch
from torch import nn

from ._base import Backbone, Unit
from ._layers import as_tuple, batch_norm, conv, init_conv_bn_, unit_width
from ._registry import register_backbone

# Sandler et al. 2018, Table 2: expansion t, output channels c, repeats n, first stride s.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# timm mobilenetv2 names inside a block -> torchvision names inside ``features.N.conv``.
_TIMM_DEPTHWISE_SEPARABLE = {"conv_dw": "0.0", "bn1": "0.1", "conv_pw": "1", "bn2": "2"}
_TIMM_INVERTED_RESIDUAL = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "conv_pwl": "2", "bn3": "3"}
_TIMM_TOP_LEVEL = {"conv_stem.": "features.0.0.", "bn1.": "features.0.1.", "conv_head.": "features.18.0.",
                   "bn2.": "features.18.1.", "classifier.": "classifier.1."}
_TIMM_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)$")
_FIRST_FEATURE_OF_STAGE = tuple(accumulate((n for _, _, n, _ in _INVERTED_RESIDUAL_SETTING), initial=1))


def conv_bn_relu6(dims: int, in_ch: int, out_ch: int, kernel: int, stride: int | tuple[int, ...], groups: int = 1
                  ) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation`` (keys ``0`` conv, ``1`` BN) for any ``spatial_dims``."""
    return nn.Sequential(
        conv(dims, in_ch, out_ch, kernel, stride, groups=groups), batch_norm(dims, out_ch), nn.ReLU6(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1x1 expansion to ``hidden`` (absent when ``expand`` is false: then ``hidden`` must be ``in_ch``), 3x3
    depthwise, linear 1x1 projection; identity shortcut when stride is 1 and the channel count is kept."""

    def __init__(self, dims: int, in_ch: int, hidden: int, out_ch: int, stride: tuple[int, ...], expand: bool) -> None:
        super().__init__()
        self.use_res_connect = all(s == 1 for s in stride) and in_ch == out_ch
        layers = [conv_bn_relu6(dims, in_ch, hidden, 1, 1)] if expand else []
        layers += [conv_bn_relu6(dims, hidden, hidden, 3, stride, groups=hidden), conv(dims, hidden, out_ch, 1, 1, 0),
                   batch_norm(dims, out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(Backbone):
    """MobileNetV2 backbone (no head) in torchvision key layout, for any ``spatial_dims``.

    Units from index ``slim_from`` on (0 = stem, then one per inverted residual, then ``features.18``) are built
    with their output and expansion widths divided by ``width_factor`` (TransFusion). A slim cut inside a stage
    drops the shortcut of the first slimmed residual, whose input keeps the full width.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        stem_channels: int = 32,
        last_channels: int = 1280,
        slim_from: int | None = None,
        width_factor: float = 2.0,
    ) -> None:
        super().__init__(spatial_dims, in_channels)
        dims = spatial_dims

        width = partial(unit_width, slim_from=slim_from, width_factor=width_factor)

        stem_out = width(stem_channels, 0)
        layers = [conv_bn_relu6(dims, in_channels, stem_out, 3, as_tuple(2, dims))]
        units = [Unit("stem", ("features.0",), stem_out, as_tuple(2, dims), block="stem", layer=False)]
        channels, full_channels = stem_out, stem_channels
        for stage, (expansion, out, repeats, first_stride) in enumerate(_INVERTED_RESIDUAL_SETTING, start=1):
            for repeat in range(repeats):
                index = len(layers)
                stride = as_tuple(first_stride if repeat == 0 else 1, dims)
                out_w = width(out, index)
                hidden = channels if expansion == 1 else width(full_channels * expansion, index)
                layers.append(InvertedResidual(dims, channels, hidden, out_w, stride, expand=expansion != 1))
                block = f"stage{stage}" if repeat == repeats - 1 else None
                units.append(Unit(f"features.{index}", (f"features.{index}",), out_w, stride, block=block))
                channels, full_channels = out_w, out
        index = len(layers)
        last_w = width(last_channels, index)
        layers.append(conv_bn_relu6(dims, channels, last_w, 1, 1))
        units.append(Unit(f"features.{index}", (f"features.{index}",), last_w, as_tuple(1, dims),
                          block=f"features.{index}", layer=False))
        self.features = nn.Sequential(*layers)
        self._set_units(units)
        init_conv_bn_(self)

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a timm ``mobilenetv2_*`` state dict to torchvision keys; torchvision files pass through."""
        if "conv_stem.weight" not in state:
            return state
        converted: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            match = _TIMM_BLOCK_KEY.match(key)
            if match:
                stage, repeat, layer, rest = int(match[1]), int(match[2]), match[3], match[4]
                names = _TIMM_DEPTHWISE_SEPARABLE if stage == 0 else _TIMM_INVERTED_RESIDUAL
                key = f"features.{_FIRST_FEATURE_OF_STAGE[stage] + repeat}.conv.{names.get(layer, layer)}.{rest}"
            else:
                prefix = next((p for p in _TIMM_TOP_LEVEL if key.startswith(p)), None)
                if prefix is not None:
                    key = _TIMM_TOP_LEVEL[prefix] + key[len(prefix):]
            converted[key] = value
        return converted



@register_backbone(
    "mobilenet_v2", spatial_dims=(2, 3), default_input={2: (224, 224), 3: (64, 128, 128)},
    min_input={2: (32, 32), 3: (32, 32, 32)}, family="mobilenet",
    head_keys=("classifier",),
)
def mobilenet_v2(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> MobileNetV2:
    """MobileNetV2 (Sandler et al. 2018), torchvision layout; 3D twin for inflation."""
    return MobileNetV2(spatial_dims, in_channels, **kwargs)
