"""The ready-to-train model every strategy returns: backbone + global pooling + dropout + linear head.

It also records what the strategy decided (which units are frozen, each unit's learning-rate scale) and keeps a
copy of its initial state, which checkpoints store so the analyses can compare init vs final.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import Backbone
from ..backbones._layers import global_avg_pool
from ..errors import WeightsError


class FrozenUnits(nn.Module):
    """Freezing whole backbone units, for any model holding a ``backbone`` and a ``frozen_units`` set: frozen units
    get no gradients, and their norm layers stay in eval mode (running statistics kept) whatever ``train()`` says."""

    backbone: Backbone
    frozen_units: set[int]

    def freeze_units(self, indices) -> None:
        for index in indices:
            self.frozen_units.add(index)
            for p in self.backbone.unit_parameters(index):
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for index in self.frozen_units:
            for module in self.backbone.unit_modules(index):
                module.eval()
        return self


class TransferModel(FrozenUnits):
    """``backbone -> global average pool -> dropout -> linear`` for ``num_classes`` outputs, 2D or 3D."""

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0, strategy: str = "full",
                 cut: str | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone = backbone
        self.pool = global_avg_pool(backbone.spatial_dims)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.num_classes = num_classes
        self.strategy = strategy
        self.cut = cut
        self.frozen_units: set[int] = set()
        self.unit_lr_scale: dict[int, float] = {}
        self.initial_state: dict[str, torch.Tensor] = {}
        self.published_pooling = False

    # ----------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, C)``; with the published head, pooled as that head was trained (class
        token for DeiT)."""
        if self.published_pooling:
            return self.backbone.forward_pre_logits(x)
        return torch.flatten(self.pool(self.backbone(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))

    # ----------------------------------------------------------------- strategy bookkeeping
    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups: trainable units grouped by their LR scale, then the head at ``lr``."""
        by_scale: dict[float, list[nn.Parameter]] = {}
        for index in range(len(self.backbone.units)):
            if index in self.frozen_units:
                continue
            scale = self.unit_lr_scale.get(index, 1.0)
            by_scale.setdefault(scale, []).extend(p for p in self.backbone.unit_parameters(index) if p.requires_grad)
        groups = [
            {"params": params, "lr": lr * scale, "weight_decay": weight_decay, "name": f"backbone_x{scale:g}"}
            for scale, params in sorted(by_scale.items())
            if params
        ]
        groups.append({"params": list(self.head.parameters()), "lr": lr, "weight_decay": weight_decay,
                       "name": "head"})
        return groups

    def snapshot_initial_state(self) -> None:
        """Remember the current weights as the state fine-tuning starts from."""
        self.initial_state = {k: v.detach().clone().cpu() for k, v in self.state_dict().items()}

    def load_pretrained_head(self) -> None:
        """Use the published classifier that came with the backbone's weight file (same class count only)."""
        head = getattr(self.backbone, "pretrained_head", {}) or {}
        weights = [v for k, v in head.items() if k.endswith("weight")]
        biases = [v for k, v in head.items() if k.endswith("bias")]
        if len(weights) != 1 or len(biases) > 1:
            raise WeightsError(
                f"{self.backbone.name}: no single published classifier in the weight file (head keys: "
                f"{sorted(head) or 'none'})"
            )
        weight = weights[0].reshape(weights[0].shape[0], -1)
        if tuple(weight.shape) != tuple(self.head.weight.shape):
            raise WeightsError(
                f"{self.backbone.name}: published classifier is {tuple(weight.shape)}, the model head is "
                f"{tuple(self.head.weight.shape)} (num_classes={self.num_classes})"
            )
        with torch.no_grad():
            self.head.weight.copy_(weight)
            if biases:
                self.head.bias.copy_(biases[0])
            else:
                self.head.bias.zero_()
        self.published_pooling = True

    def describe(self) -> dict:
        """Strategy, cut and parameter counts (total / trainable / frozen)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {
            "backbone": self.backbone.name,
            "strategy": self.strategy,
            "cut": self.cut,
            "num_classes": self.num_classes,
            "params": total,
            "trainable_params": trainable,
            "frozen_params": total - trainable,
        }
