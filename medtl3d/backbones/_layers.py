"""Dimension-agnostic layer constructors on MONAI's layer factories, so 2D and 3D share one code path."""

from __future__ import annotations

from typing import Sequence

from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def as_tuple(value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """``3 -> (3, 3)`` in 2D; a sequence must already have one entry per spatial axis."""
    if isinstance(value, int):
        return (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"{value} does not have {spatial_dims} entries")
    return value


def conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    groups: int = 1,
    bias: bool = False,
) -> nn.Module:
    """``Conv{1,2,3}d``; ``padding=None`` means ``kernel // 2`` per axis."""
    kernel = as_tuple(kernel_size, spatial_dims)
    pad = tuple(k // 2 for k in kernel) if padding is None else as_tuple(padding, spatial_dims)
    return Conv[Conv.CONV, spatial_dims](
        in_channels, out_channels, kernel, stride=as_tuple(stride, spatial_dims), padding=pad, groups=groups, bias=bias
    )


def batch_norm(spatial_dims: int, channels: int, eps: float = 1e-5) -> nn.Module:
    return Norm[Norm.BATCH, spatial_dims](channels, eps=eps)


def max_pool(spatial_dims: int, kernel_size=3, stride=2, padding=1) -> nn.Module:
    return Pool[Pool.MAX, spatial_dims](
        kernel_size=as_tuple(kernel_size, spatial_dims),
        stride=as_tuple(stride, spatial_dims),
        padding=as_tuple(padding, spatial_dims),
    )


def avg_pool(spatial_dims: int, kernel_size=2, stride=2, padding=0) -> nn.Module:
    return Pool[Pool.AVG, spatial_dims](
        kernel_size=as_tuple(kernel_size, spatial_dims),
        stride=as_tuple(stride, spatial_dims),
        padding=as_tuple(padding, spatial_dims),
    )


def global_avg_pool(spatial_dims: int) -> nn.Module:
    return Pool[Pool.ADAPTIVEAVG, spatial_dims](1)


def slim(channels: int, factor: float, multiple: int = 1) -> int:
    """``channels / factor`` rounded to a positive multiple of ``multiple`` (TransFusion width reduction)."""
    value = max(multiple, int(round(channels / factor / multiple)) * multiple)
    return value


def unit_width(channels: int, unit: int, multiple: int = 1, *, slim_from: int | None, width_factor: float) -> int:
    """Width of a layer in unit ``unit``: unchanged below ``slim_from``, divided by ``width_factor`` from it on."""
    if slim_from is None or unit < slim_from:
        return channels
    return slim(channels, width_factor, multiple)


def init_conv_bn_(model: nn.Module, mode: str = "fan_out") -> None:
    """Kaiming-normal (ReLU gain) convolutions with zero biases, BatchNorms at weight 1 / bias 0."""
    for m in model.modules():
        if isinstance(m, CONVS):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
