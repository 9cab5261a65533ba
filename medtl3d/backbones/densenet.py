"""DenseNet-121 in 2D and 3D: densenet121 (ImageNet, torchvision layout) and densenet121_3d (MONAI's 3D default).

One dimension-agnostic implementation whose ``state_dict`` keys are those of torchvision's DenseNet. Written here
rather than taken from torchvision/MONAI because torchvision is 2D only and neither can rebuild the layers above an
arbitrary dense layer with a smaller growth rate (TransFusion). :meth:`DenseNet.convert_state_dict` also reads
torchvision's legacy file layout (``denselayer1.norm.1.weight``, no ``num_batches_tracked``) and MONAI's
(``denselayer1.layers.norm1.weight``, head ``class_layers.out``).

Units: ``stem`` (conv0, norm0, relu0, pool0), one unit per dense layer, whose output is the concatenation of its
input and its new features (the last one also applies norm5 and the final ReLU), and one unit per transition.
Block cut points: ``stem``, ``denseblockN`` (after its last dense layer) and ``transitionN``; layer cut points:
every dense layer and transition, named by module path (``features.denseblock2.denselayer5``).
"""

from __future__ import annotations

from functools import partial

import re
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from ._base import Backbone, Unit
from ._layers import as_tuple, avg_pool, batch_norm, conv, init_conv_bn_, max_pool, unit_width
from ._registry import register_backbone

_LEGACY_TORCHVISION_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_MONAI_LAYER_KEY = re.compile(r"(denselayer\d+)\.layers\.")
_MONAI_HEAD = "class_layers.out."


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv; returns only the ``growth`` new channels."""

    def __init__(self, dims: int, in_ch: int, bottleneck: int, growth: int) -> None:
        super().__init__()
        self.norm1 = batch_norm(dims, in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv(dims, in_ch, bottleneck, 1, 1, 0)
        self.norm2 = batch_norm(dims, bottleneck)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv(dims, bottleneck, growth, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv to ``out_ch`` channels, then 2x average pooling."""

    def __init__(self, dims: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = batch_norm(dims, in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv(dims, in_ch, out_ch, 1, 1, 0)
        self.pool = avg_pool(dims, 2, 2)


class DenseNet(Backbone):
    """DenseNet-BC backbone (no head) in torchvision key layout, for any ``spatial_dims``.

    ``block_layers`` gives the dense layers per block; each transition halves the channels (compression 0.5). Units
    from index ``slim_from`` on (0 = stem, then one per dense layer or transition) are built with the growth rate,
    bottleneck width and transition width divided by ``width_factor`` (TransFusion). Channels carried over from
    below the cut stay in the concatenation, so a dense block that starts right above a cut keeps its full-width
    input.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        block_layers: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        bn_size: int = 4,
        stem_channels: int = 64,
        slim_from: int | None = None,
        width_factor: float = 2.0,
    ) -> None:
        super().__init__(spatial_dims, in_channels)
        dims = spatial_dims

        width = partial(unit_width, slim_from=slim_from, width_factor=width_factor)

        stem_out = width(stem_channels, 0)
        self.features = nn.Sequential()
        self.features.add_module("conv0", conv(dims, in_channels, stem_out, 7, 2, 3))
        self.features.add_module("norm0", batch_norm(dims, stem_out))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", max_pool(dims, 3, 2, 1))
        stem_paths = tuple(f"features.{name}0" for name in ("conv", "norm", "relu", "pool"))
        units = [Unit("stem", stem_paths, stem_out, as_tuple(4, dims), block="stem", layer=False)]

        channels, full_channels = stem_out, stem_channels
        for block_index, num_layers in enumerate(block_layers, start=1):
            block = nn.ModuleDict()
            for layer_index in range(1, num_layers + 1):
                unit = len(units)
                growth = width(growth_rate, unit)
                bottleneck = width(bn_size * growth_rate, unit)
                block[f"denselayer{layer_index}"] = DenseLayer(dims, channels, bottleneck, growth)
                channels += growth
                full_channels += growth_rate
                path = f"features.denseblock{block_index}.denselayer{layer_index}"
                last = layer_index == num_layers
                units.append(
                    Unit(path, (path,), channels, as_tuple(1, dims), block=f"denseblock{block_index}" if last else None)
                )
            self.features.add_module(f"denseblock{block_index}", block)
            if block_index < len(block_layers):
                full_channels //= 2
                out = width(full_channels, len(units))
                self.features.add_module(f"transition{block_index}", Transition(dims, channels, out))
                path = f"features.transition{block_index}"
                units.append(Unit(path, (path,), out, as_tuple(2, dims), block=f"transition{block_index}"))
                channels = out
        self.features.add_module("norm5", batch_norm(dims, channels))
        self.features.add_module("relu5", nn.ReLU(inplace=True))
        units[-1] = replace(units[-1], modules=units[-1].modules + ("features.norm5", "features.relu5"))
        self._set_units(units)
        init_conv_bn_(self, mode="fan_in")

    def forward_unit(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Dense layers append their new channels to their input; every other module maps its input."""
        for path in self.units[index].modules:
            module = self.get_submodule(path)
            x = torch.cat([x, module(x)], dim=1) if isinstance(module, DenseLayer) else module(x)
        return x

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename torchvision-legacy and MONAI keys to the native layout."""
        converted: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            key = _LEGACY_TORCHVISION_KEY.sub(lambda m: m.group(1) + m.group(2), key)
            key = _MONAI_LAYER_KEY.sub(r"\1.", key)
            if key.startswith(_MONAI_HEAD):
                key = "classifier." + key[len(_MONAI_HEAD):]
            converted[key] = value
        return converted



@register_backbone(
    "densenet121", spatial_dims=(2, 3), default_input={2: (224, 224), 3: (64, 128, 128)},
    min_input={2: (32, 32), 3: (32, 32, 32)}, family="densenet",
    head_keys=("classifier",),
)
def densenet121(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> DenseNet:
    """DenseNet-121 (Huang et al. 2017), torchvision layout; 3D twin for inflation."""
    return DenseNet(spatial_dims, in_channels, (6, 12, 24, 16), **kwargs)


@register_backbone(
    "densenet121_3d", spatial_dims=(3,), default_input={3: (64, 128, 128)}, min_input={3: (32, 32, 32)},
    in_channels=1, family="densenet", head_keys=("classifier",),
)
def densenet121_3d(spatial_dims: int = 3, in_channels: int = 1, **kwargs) -> DenseNet:
    """3D DenseNet-121 for single-channel volumes; loads MONAI ``DenseNet121(spatial_dims=3)`` checkpoints."""
    return DenseNet(spatial_dims, in_channels, (6, 12, 24, 16), **kwargs)
