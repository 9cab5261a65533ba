"""ResNet / ResNeXt family in 2D and 3D: resnet18/34/50, resnet3d_18/50, resnext3d_101.

One dimension-agnostic implementation whose ``state_dict`` keys are those of torchvision's ResNet, which MONAI's
ResNet (and so MedicalNet checkpoints) and Hara et al.'s 3D-ResNets/ResNeXts share. Written here rather than
taken from torchvision/MONAI because neither offers what the strategies need in one class: torchvision is 2D only,
MONAI has no cardinality (ResNeXt3D-101) and neither can slim the stages above an arbitrary block (TransFusion).

Units: ``stem`` (conv1, bn1, relu, maxpool; block cut ``stem``) and one unit per residual block
(``layer1.0`` ... ``layer4.2``; the last block of a stage also ends the block cut ``layerN``).
"""

from __future__ import annotations

from functools import partial

from typing import Sequence

import torch
from torch import nn

from ._base import Backbone, Unit
from ._layers import as_tuple, batch_norm, conv, init_conv_bn_, max_pool, unit_width
from ._registry import register_backbone


class ShortcutA(nn.Module):
    """Parameter-free shortcut (MedicalNet 'A'): strided subsampling, then zero channels appended (or, into a
    slimmed stage, the leading channels kept)."""

    def __init__(self, out_channels: int, stride: tuple[int, ...]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in self.stride)
        x = x[index]
        missing = self.out_channels - x.shape[1]
        if missing < 0:  # only in TransFusion-slimmed stages: keep the leading channels, still parameter-free
            return x[:, : self.out_channels]
        if missing > 0:
            x = torch.cat([x, x.new_zeros((x.shape[0], missing) + x.shape[2:])], dim=1)
        return x


def _shortcut(dims, in_ch, out_ch, stride, kind: str, bias: bool) -> nn.Module | None:
    if in_ch == out_ch and all(s == 1 for s in stride):
        return None
    if kind == "A":
        return ShortcutA(out_ch, stride)
    return nn.Sequential(conv(dims, in_ch, out_ch, 1, stride, 0, bias=bias), batch_norm(dims, out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projection) shortcut."""

    def __init__(self, dims, in_ch, mid, out, stride, groups=1, shortcut="B", bias_downsample=False) -> None:
        super().__init__()
        self.conv1 = conv(dims, in_ch, mid, 3, stride)
        self.bn1 = batch_norm(dims, mid)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(dims, mid, out, 3, 1, groups=groups)
        self.bn2 = batch_norm(dims, out)
        self.downsample = _shortcut(dims, in_ch, out, stride, shortcut, bias_downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, strided as in torchvision v1.5), 1x1 expand."""

    def __init__(self, dims, in_ch, mid, out, stride, groups=1, shortcut="B", bias_downsample=False) -> None:
        super().__init__()
        self.conv1 = conv(dims, in_ch, mid, 1, 1, 0)
        self.bn1 = batch_norm(dims, mid)
        self.conv2 = conv(dims, mid, mid, 3, stride, groups=groups)
        self.bn2 = batch_norm(dims, mid)
        self.conv3 = conv(dims, mid, out, 1, 1, 0)
        self.bn3 = batch_norm(dims, out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(dims, in_ch, out, stride, shortcut, bias_downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Backbone):
    """ResNet/ResNeXt backbone (no head) in torchvision key layout, for any ``spatial_dims``.

    ``stages`` lists ``(mid_channels, out_channels, num_blocks, stride)``. Units from index ``slim_from`` on
    (0 = stem, then one per block) are built with their widths divided by ``width_factor`` (TransFusion).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        block: type[nn.Module],
        stages: Sequence[tuple[int, int, int, int]],
        stem_channels: int = 64,
        stem_kernel: int | Sequence[int] = 7,
        stem_stride: int | Sequence[int] = 2,
        stem_pool: bool = True,
        groups: int = 1,
        shortcut: str = "B",
        bias_downsample: bool = False,
        slim_from: int | None = None,
        width_factor: float = 2.0,
    ) -> None:
        super().__init__(spatial_dims, in_channels)
        dims = spatial_dims
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

        width = partial(unit_width, slim_from=slim_from, width_factor=width_factor)

        stem_out = width(stem_channels, 0)
        stem_stride_t = as_tuple(stem_stride, dims)
        self.conv1 = conv(dims, in_channels, stem_out, stem_kernel, stem_stride_t)
        self.bn1 = batch_norm(dims, stem_out)
        self.relu = nn.ReLU(inplace=True)
        stem_modules = ["conv1", "bn1", "relu"]
        stem_total = stem_stride_t
        if stem_pool:
            self.maxpool = max_pool(dims, 3, 2, 1)
            stem_modules.append("maxpool")
            stem_total = tuple(s * 2 for s in stem_stride_t)
        units = [Unit("stem", tuple(stem_modules), stem_out, stem_total, block="stem", layer=False)]

        in_ch, unit_index = stem_out, 1
        for stage_index, (mid, out, blocks, stride) in enumerate(stages, start=1):
            layer = nn.Sequential()
            for block_index in range(blocks):
                block_stride = as_tuple(stride if block_index == 0 else 1, dims)
                mid_w = width(mid, unit_index, groups)
                out_w = width(out, unit_index)
                layer.add_module(
                    str(block_index),
                    block(dims, in_ch, mid_w, out_w, block_stride, groups, shortcut, bias_downsample),
                )
                last = block_index == blocks - 1
                units.append(
                    Unit(
                        f"layer{stage_index}.{block_index}",
                        (f"layer{stage_index}.{block_index}",),
                        out_w,
                        block_stride,
                        block=f"layer{stage_index}" if last else None,
                    )
                )
                in_ch, unit_index = out_w, unit_index + 1
            self.add_module(f"layer{stage_index}", layer)
        self._set_units(units)
        init_conv_bn_(self)



def _stages(mids, outs, blocks) -> list[tuple[int, int, int, int]]:
    return [(m, o, b, 1 if i == 0 else 2) for i, (m, o, b) in enumerate(zip(mids, outs, blocks))]


_BASIC_WIDTHS = ((64, 128, 256, 512), (64, 128, 256, 512))
_BOTTLENECK_WIDTHS = ((64, 128, 256, 512), (256, 512, 1024, 2048))
_INPUT_2D = {2: (224, 224), 3: (64, 128, 128)}
_MIN_2D = {2: (32, 32), 3: (32, 32, 32)}


@register_backbone(
    "resnet18", spatial_dims=(2, 3), default_input=_INPUT_2D, min_input=_MIN_2D, family="resnet",
    head_keys=("fc",),
)
def resnet18(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-18 (He et al. 2016), torchvision layout; 3D twin for inflation."""
    return ResNet(spatial_dims, in_channels, BasicBlock, _stages(*_BASIC_WIDTHS, (2, 2, 2, 2)), **kwargs)


@register_backbone(
    "resnet34", spatial_dims=(2, 3), default_input=_INPUT_2D, min_input=_MIN_2D, family="resnet",
    head_keys=("fc",),
)
def resnet34(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-34 (He et al. 2016), torchvision layout; 3D twin for inflation."""
    return ResNet(spatial_dims, in_channels, BasicBlock, _stages(*_BASIC_WIDTHS, (3, 4, 6, 3)), **kwargs)


@register_backbone(
    "resnet50", spatial_dims=(2, 3), default_input=_INPUT_2D, min_input=_MIN_2D, family="resnet",
    head_keys=("fc",),
)
def resnet50(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-50 (He et al. 2016), torchvision/timm layout; 3D twin for inflation."""
    return ResNet(spatial_dims, in_channels, Bottleneck, _stages(*_BOTTLENECK_WIDTHS, (3, 4, 6, 3)), **kwargs)


_INPUT_3D = {3: (64, 128, 128)}
_MIN_3D = {3: (32, 32, 32)}


@register_backbone(
    "resnet3d_18", spatial_dims=(3,), default_input=_INPUT_3D, min_input=_MIN_3D, in_channels=1,
    family="resnet", head_keys=("fc",),
)
def resnet3d_18(spatial_dims: int = 3, in_channels: int = 1, **kwargs) -> ResNet:
    """3D ResNet-18 in MONAI/MedicalNet layout (shortcut A, stem stride 2), loads MedicalNet checkpoints."""
    kwargs.setdefault("shortcut", "A")
    return ResNet(spatial_dims, in_channels, BasicBlock, _stages(*_BASIC_WIDTHS, (2, 2, 2, 2)), **kwargs)


@register_backbone(
    "resnet3d_50", spatial_dims=(3,), default_input=_INPUT_3D, min_input=_MIN_3D, in_channels=1,
    family="resnet", head_keys=("fc",),
)
def resnet3d_50(spatial_dims: int = 3, in_channels: int = 1, **kwargs) -> ResNet:
    """3D ResNet-50 in MONAI/MedicalNet layout (shortcut B without bias), loads MedicalNet checkpoints."""
    return ResNet(spatial_dims, in_channels, Bottleneck, _stages(*_BOTTLENECK_WIDTHS, (3, 4, 6, 3)), **kwargs)


@register_backbone(
    "resnext3d_101", spatial_dims=(3,), default_input={3: (16, 112, 112)}, min_input={3: (16, 32, 32)},
    family="resnet", head_keys=("fc",),
)
def resnext3d_101(spatial_dims: int = 3, in_channels: int = 3, **kwargs) -> ResNet:
    """3D ResNeXt-101 32x4d in Hara et al.'s layout (shortcut B, stem stride 1x2x2): loads their Kinetics files."""
    kwargs.setdefault("stem_stride", (1, 2, 2))
    kwargs.setdefault("groups", 32)
    stages = _stages((128, 256, 512, 1024), (256, 512, 1024, 2048), (3, 4, 23, 3))
    return ResNet(spatial_dims, in_channels, Bottleneck, stages, **kwargs)
