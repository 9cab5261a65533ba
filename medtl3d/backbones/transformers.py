"""Vision transformers in timm's key layout: DeiT-S (``deit_small``) and Swin-T (``swin_tiny``).

Each backbone adopts the submodules of the timm model itself (same initialisation, same ``state_dict`` keys), so
timm's ImageNet weights and timm-trained checkpoints load unchanged. Both are built with timm's
``dynamic_img_size=True``: DeiT interpolates its position embedding to the input's patch grid, Swin keeps the
pretrained 7x7 windows (and so the relative-position tables) and pads feature maps to whole windows. At 224x224
both compute exactly what the published models compute.

Neither is slimmable. TransFusion halves the channels of the convolutional stages above a cut, each of which can
take any input width; a transformer block adds its output to a residual stream of one fixed width (one per Swin
stage), so a narrower block above a cut would need a projection at the junction that the published architectures do
not have.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter

from ._base import Backbone, Unit
from ._registry import register_backbone


def _require_2d(name: str, spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise ValueError(f"{name} is 2D only, got spatial_dims={spatial_dims}")


class VisionTransformer(Backbone):
    """ViT/DeiT backbone (no head) in timm key layout: embedding unit, one unit per block, final norm in the last.

    Units: ``patch_embed`` (patch embedding, class token, position embedding; block cut ``patch_embed``) and
    ``blocks.0`` ... (layer cuts). Block cuts ``depthN`` after every quarter of the depth (3, 6, 9, 12 blocks for
    DeiT-S): ViT blocks are uniform, so equal groups give the hierarchical search as many Stage-1 candidates as the
    CNNs' stem + four stages. The embedding records the patch grid of the current input (``token_grid``) so that
    :meth:`to_feature_map` can fold the patch tokens back into a map; units must run in order from the embedding.
    ``drop_path_rate`` (stochastic depth, for fine-tuning) defaults to timm's value.
    """

    def __init__(self, spatial_dims: int, in_channels: int, variant: str, drop_path_rate: float = 0.0) -> None:
        super().__init__(spatial_dims, in_channels)
        _require_2d(variant, spatial_dims)
        vit = timm.create_model(
            variant, pretrained=False, in_chans=in_channels, num_classes=0, dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
        )
        if vit.num_prefix_tokens != 1 or vit.no_embed_class:
            raise ValueError(f"{variant}: only ViTs with one class token inside the position embedding are supported")
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.token_grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)

        width, depth = vit.embed_dim, len(vit.blocks)
        units = [
            Unit("patch_embed", ("patch_embed", "cls_token", "pos_embed"), width, tuple(vit.patch_embed.patch_size),
                 block="patch_embed", layer=False)
        ]
        for index in range(depth):
            last = index == depth - 1
            units.append(
                Unit(
                    f"blocks.{index}",
                    (f"blocks.{index}",) + (("norm",) if last else ()),
                    width,
                    (1, 1),
                    block=f"depth{index + 1}" if (index + 1) % (depth // 4) == 0 else None,
                )
            )
        self._set_units(units)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> ``(B, 1 + H*W, C)`` tokens: class token first, position embedding resized to the grid."""
        x = self.patch_embed(x)
        batch, height, width, channels = x.shape
        self.token_grid = (height, width)
        pos_embed = resample_abs_pos_embed(
            self.pos_embed, new_size=(height, width), old_size=self.patch_embed.grid_size, num_prefix_tokens=1
        )
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, channels)], dim=1)
        return x + pos_embed

    def forward_unit(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return self.embed(x)
        return super().forward_unit(index, x)

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The normed class token, which DeiT's published classifier reads (not the mean of the patch tokens)."""
        for index in range(len(self.units)):
            x = self.forward_unit(index, x)
        return x[:, 0]

    def to_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Drop the class token and fold the patch tokens onto their grid: ``(B, 1 + H*W, C) -> (B, C, H, W)``."""
        height, width = self.token_grid
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


class SwinTransformer(Backbone):
    """Swin backbone (no head) in timm key layout, NHWC inside, channels-first maps outside.

    Units: ``patch_embed`` (block cut ``patch_embed``) and one unit per Swin block ``layers.i.blocks.j`` (layer
    cuts); a stage's patch merging ``layers.i.downsample`` belongs to its first block's unit and the final ``norm``
    to the last unit. Block cuts ``layers.0`` ... ``layers.3`` at the stage ends. The windows are those of the
    224x224 model: at other sizes maps are padded to whole 7x7 windows (and the last stage, one window at 224, never
    shifts), and 32x32 is the smallest input whose last stage still has its own 1x1 map (reduction 32).
    ``drop_path_rate`` (stochastic depth, for fine-tuning) defaults to timm's value.
    """

    def __init__(self, spatial_dims: int, in_channels: int, variant: str, drop_path_rate: float = 0.1) -> None:
        super().__init__(spatial_dims, in_channels)
        _require_2d(variant, spatial_dims)
        swin = timm.create_model(
            variant, pretrained=False, in_chans=in_channels, num_classes=0, dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
        )
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers
        self.norm = swin.norm

        units = [
            Unit("patch_embed", ("patch_embed",), swin.embed_dim, tuple(swin.patch_embed.patch_size),
                 block="patch_embed", layer=False)
        ]
        for stage_index, stage in enumerate(self.layers):
            for block_index, block in enumerate(stage.blocks):
                name = f"layers.{stage_index}.blocks.{block_index}"
                first = block_index == 0
                last = block_index == len(stage.blocks) - 1
                modules = ((f"layers.{stage_index}.downsample",) if first else ()) + (name,)
                if last and stage_index == len(self.layers) - 1:
                    modules += ("norm",)
                stride = 2 if first and stage_index > 0 else 1
                units.append(
                    Unit(name, modules, block.dim, (stride, stride), block=f"layers.{stage_index}" if last else None)
                )
        self._set_units(units)

    def to_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, C, H, W)``."""
        return x.permute(0, 3, 1, 2)

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm's converter: Microsoft's original files (patch merging at the end of a stage, ``head.*``) load too."""
        return swin_checkpoint_filter(state, self)


@register_backbone(
    "deit_small", spatial_dims=(2,), default_input={2: (224, 224)}, min_input={2: (16, 16)}, family="vit",
    slimmable=False, head_keys=("head",),
)
def deit_small(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> VisionTransformer:
    """DeiT-S/16 (Touvron et al. 2021) in timm ``deit_small_patch16_224`` layout; sides multiples of 16."""
    return VisionTransformer(spatial_dims, in_channels, "deit_small_patch16_224", **kwargs)


@register_backbone(
    "swin_tiny", spatial_dims=(2,), default_input={2: (224, 224)}, min_input={2: (32, 32)}, family="swin",
    slimmable=False,
    head_keys=("head",),
)
def swin_tiny(spatial_dims: int = 2, in_channels: int = 3, **kwargs) -> SwinTransformer:
    """Swin-T (Liu et al. 2021) in timm ``swin_tiny_patch4_window7_224`` layout; from 32x32, sides multiples of 4."""
    return SwinTransformer(spatial_dims, in_channels, "swin_tiny_patch4_window7_224", **kwargs)
