"""Inception-v3 (Szegedy et al. 2016) in torchvision's key layout, without the auxiliary classifier.

Built from torchvision's own blocks (``BasicConv2d``, ``InceptionA`` ... ``InceptionE``), so torchvision's ImageNet
file and fine-tuned torchvision models load unchanged; their ``AuxLogits.*`` tensors are dropped on load.

Units: the five stem convolutions (each max pool rides with the convolution before it), then one unit per Mixed
block. Layer cuts after every Mixed block; block cuts ``stem`` (after ``maxpool2``, 35x35 at 299x299 input) and
``mixed5`` / ``mixed6`` / ``mixed7`` at the ends of the 35x35, 17x17 and 8x8 stages.

Input scaling: Google trained these weights on images scaled to [-1, 1]. torchvision's pretrained builder therefore
sets ``transform_input=True``, which re-maps ImageNet mean/std-normalised RGB to that range inside ``forward``.
Here ``transform_input`` defaults to False, because medical inputs are rarely ImageNet-normalised RGB and the
per-RGB-channel re-map means nothing for an adapted 1-channel stem: scale intensities to [-1, 1] instead, or pass
``transform_input=True`` (3 channels only) to reproduce torchvision exactly on ImageNet-normalised input.

The unpadded stem convolutions and the unpadded strided reductions make maps smaller than ``input / reduction``:
an ``n``-pixel side gives ``(n - 27) // 8 + 1`` after the stem, so 75x75 is the smallest input that every block
accepts (Mixed_7a needs 3x3).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from ._base import Backbone, Unit
from ._layers import slim
from ._registry import register_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (unit name, out channels, conv kwargs, max pool after it, unit stride, block cut ending here)
STEM = (
    ("Conv2d_1a_3x3", 32, {"kernel_size": 3, "stride": 2}, None, 2, None),
    ("Conv2d_2a_3x3", 32, {"kernel_size": 3}, None, 1, None),
    ("Conv2d_2b_3x3", 64, {"kernel_size": 3, "padding": 1}, "maxpool1", 2, None),
    ("Conv2d_3b_1x1", 80, {"kernel_size": 1}, None, 1, None),
    ("Conv2d_4a_3x3", 192, {"kernel_size": 3}, "maxpool2", 2, "stem"),
)

# (unit name, torchvision block, its input width, block kwargs, unit stride, block cut ending here)
MIXED = (
    ("Mixed_5b", InceptionA, 192, {"pool_features": 32}, 1, None),
    ("Mixed_5c", InceptionA, 256, {"pool_features": 64}, 1, None),
    ("Mixed_5d", InceptionA, 288, {"pool_features": 64}, 1, "mixed5"),
    ("Mixed_6a", InceptionB, 288, {}, 2, None),
    ("Mixed_6b", InceptionC, 768, {"channels_7x7": 128}, 1, None),
    ("Mixed_6c", InceptionC, 768, {"channels_7x7": 160}, 1, None),
    ("Mixed_6d", InceptionC, 768, {"channels_7x7": 160}, 1, None),
    ("Mixed_6e", InceptionC, 768, {"channels_7x7": 192}, 1, "mixed6"),
    ("Mixed_7a", InceptionD, 768, {}, 2, None),
    ("Mixed_7b", InceptionE, 1280, {}, 1, None),
    ("Mixed_7c", InceptionE, 2048, {}, 1, "mixed7"),
)


def imagenet_to_inception_range(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``transform_input``: ImageNet mean/std-normalised RGB -> the [-1, 1] scaling of the weights."""
    statistics = enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))
    return torch.cat([x[:, c : c + 1] * (std / 0.5) + (mean - 0.5) / 0.5 for c, (mean, std) in statistics], 1)


def average_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Average ``(B, C, H, W)`` down to ``channels`` channels over groups of neighbouring channels (no parameters)."""
    batch, _, height, width = x.shape
    pooled = F.adaptive_avg_pool1d(x.flatten(2).transpose(1, 2), channels)
    return pooled.transpose(1, 2).reshape(batch, channels, height, width)


class NarrowedPassthrough:
    """Makes InceptionB/D the first slim block: their max-pool branch passes the block input through, which there
    still has the full pretrained width, so it is averaged down to ``passthrough_channels`` (the slim width)."""

    passthrough_channels: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *convolved, pooled = self._forward(x)
        return torch.cat([*convolved, average_channels(pooled, self.passthrough_channels)], 1)


class NarrowedInceptionB(NarrowedPassthrough, InceptionB):
    """InceptionB (Mixed_6a) as the first slim block."""


class NarrowedInceptionD(NarrowedPassthrough, InceptionD):
    """InceptionD (Mixed_7a) as the first slim block."""


NARROWED = {InceptionB: NarrowedInceptionB, InceptionD: NarrowedInceptionD}


def mixed_out_channels(block: type[nn.Module], kwargs: dict, width: Callable[[int], int], passthrough: int) -> int:
    """Output width of a torchvision Inception block whose convolutions output ``width(c)`` instead of ``c``."""
    if block is InceptionA:
        return width(64) + width(64) + width(96) + width(kwargs["pool_features"])
    if block is InceptionB:
        return width(384) + width(96) + passthrough
    if block is InceptionC:
        return 4 * width(192)
    if block is InceptionD:
        return width(320) + width(192) + passthrough
    if block is InceptionE:
        return width(320) + 4 * width(384) + width(192)
    raise TypeError(f"not a torchvision Inception block: {block}")


def slim_conv_factory(nominal_in: int, actual_in: int, width: Callable[[int], int]) -> Callable[..., BasicConv2d]:
    """``conv_block`` for a torchvision Inception block built for ``nominal_in`` input channels.

    Convolutions that read the block input (torchvision passes them ``nominal_in``; its internal widths never equal
    a block's input width) take ``actual_in``; every other width goes through ``width``.
    """

    def conv_block(in_channels: int, out_channels: int, **kwargs) -> BasicConv2d:
        in_channels = actual_in if in_channels == nominal_in else width(in_channels)
        return BasicConv2d(in_channels, width(out_channels), **kwargs)

    return conv_block


class InceptionV3(Backbone):
    """Inception-v3 backbone (no head, no auxiliary classifier) in torchvision key layout, 2D only.

    Units from index ``slim_from`` on (0 = ``Conv2d_1a_3x3``, 5 = ``Mixed_5b``) are built with every convolution's
    output width divided by ``width_factor`` (TransFusion). Their convolutions that read the unit input take its
    actual width, so the first slim unit reads the unchanged pretrained width; when that unit is a reduction block
    (Mixed_6a, Mixed_7a) its max-pooled pass-through branch is averaged down to the slim width.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        transform_input: bool = False,
        slim_from: int | None = None,
        width_factor: float = 2.0,
    ) -> None:
        super().__init__(spatial_dims, in_channels)
        if spatial_dims != 2:
            raise ValueError(f"inception_v3 is 2D only, got spatial_dims={spatial_dims}")
        if transform_input and in_channels != 3:
            raise ValueError(f"transform_input re-maps ImageNet-normalised RGB and needs 3 channels, got {in_channels}")
        self.transform_input = transform_input

        def width_at(index: int) -> Callable[[int], int]:
            if slim_from is None or index < slim_from:
                return lambda channels: channels
            return lambda channels: slim(channels, width_factor)

        units, channels = [], in_channels
        for index, (name, out, conv_kwargs, pool, stride, block_cut) in enumerate(STEM):
            out = width_at(index)(out)
            self.add_module(name, BasicConv2d(channels, out, **conv_kwargs))
            modules = (name,)
            if pool is not None:
                self.add_module(pool, nn.MaxPool2d(kernel_size=3, stride=2))
                modules += (pool,)
            units.append(Unit(name, modules, out, (stride, stride), block=block_cut, layer=False))
            channels = out

        for index, (name, block, nominal_in, kwargs, stride, block_cut) in enumerate(MIXED, start=len(STEM)):
            width = width_at(index)
            conv_block = slim_conv_factory(nominal_in, channels, width)
            if index == slim_from and block in NARROWED:
                passthrough = width(nominal_in)
                module = NARROWED[block](nominal_in, conv_block=conv_block, **kwargs)
                module.passthrough_channels = passthrough
            else:
                passthrough = channels
                module = block(nominal_in, conv_block=conv_block, **kwargs)
            self.add_module(name, module)
            channels = mixed_out_channels(block, kwargs, width, passthrough)
            units.append(Unit(name, (name,), channels, (stride, stride), block=block_cut))
        self._set_units(units)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's Inception3 initialisation: truncated normal (std 0.1) kernels, unit BatchNorms."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.1, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_unit(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0 and self.transform_input:
            x = imagenet_to_inception_range(x)
        return super().forward_unit(index, x)

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop the auxiliary classifier (``AuxLogits.*``) that torchvision's ImageNet file carries."""
        return {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}


@register_backbone(
    "inception_v3", spatial_dims=(2,), default_input={2: (299, 299)}, min_input={2: (75, 75)}, family="inception",
    head_keys=("fc",),
)
def inception_v3(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> InceptionV3:
    """Inception-v3 (Szegedy et al. 2016), torchvision layout without the auxiliary classifier."""
    return InceptionV3(spatial_dims, in_channels, **kwargs)
