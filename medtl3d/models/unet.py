"""U-Net whose encoder is a pretrained medtl3d backbone truncated at any cut point (2D and 3D, one code path).

The encoder is the backbone cut at ``cut`` (TruncatedTL's encoder); its skip connections are the block cut points at
or before ``cut``, one per distinct reduction (the deepest one at each scale), all read in one pass with
``Backbone.forward_cuts``. The decoder is planned from the cut points' per-axis ``reduction`` tuples alone: from each
feature to the next shallower one (and finally to full resolution) the ratio of reductions is split into upsampling
steps of at most 2 per axis, so encoders whose first feature is already at /2 or /4 (MobileNetV2 vs ResNet/DenseNet),
anisotropic encoders (PENet's 2x4x4 stem, Hara ResNeXt's 1x2x2) and mid-stage cuts (``layer3.2``) need no special
case. Each step is MONAI's ``UpSample`` (deconv or interpolation) + concatenation with the skip + BasicUNet's
``TwoConv``; a 1x1 convolution gives the logits ``(B, out_channels, *input spatial)``.

Why not MONAI's ``FlexibleUNet`` directly (read in ``monai/networks/nets/flexible_unet.py``, MONAI 1.6.1): its
encoders are classes registered in ``FLEXUNET_BACKBONE``, each declaring fixed feature taps
(``num_outputs``/``num_channels_per_output``) per name, and ``FlexibleUNet`` builds the encoder itself from that name
and ``pretrained: bool`` - an already built backbone (our weight files, 1-channel adaptation, truncation) cannot be
passed in, and arbitrary cut points of arbitrary backbones would each need a registered class. Its ``UNetDecoder``
is a chain of ``UpCat`` blocks with a hard-coded isotropic scale factor of 2, requiring every tap to be exactly 2x
the previous one from /2 on and at most five taps, which rules out anisotropic strides and encoders without a /2
feature. We reuse its building blocks (``UpSample``, ``TwoConv``, ``Convolution``) rather than the network.

Like :class:`~medtl3d.strategies.TransferModel`, the model keeps its ``initial_state``, groups its parameters for
the optimizer, can freeze encoder units, and records a ``model_config`` from which :func:`create_unet` rebuilds it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets.basic_unet import TwoConv
from torch import nn

from ..backbones import Backbone, CutPoint, create_backbone
from ..errors import DataError, StrategyNotApplicableError
from ..strategies._model import FrozenUnits

BUILDER = "unet"  # the registry name of create_unet (medtl3d.engine._builders)


def select_skip_cuts(backbone: Backbone, cut: str | CutPoint) -> list[CutPoint]:
    """The ``auto`` skips: per distinct reduction shallower than ``cut``, its deepest block cut point (deep first)."""
    bottom = backbone.cut_point(cut)
    by_reduction: dict[tuple[int, ...], CutPoint] = {}
    for point in backbone.cut_points_at("block"):
        if point.unit <= bottom.unit and point.reduction != bottom.reduction:
            by_reduction[point.reduction] = point  # forward order: the last one seen is the deepest
    return sorted(by_reduction.values(), key=lambda p: p.unit, reverse=True)


def plan_decoder(bottom: CutPoint, skips: Sequence[CutPoint]) -> list[tuple[tuple[int, ...], str | None]]:
    """Upsampling steps ``(per-axis scale, skip cut name or None)`` from ``bottom`` back to full resolution.

    ``skips`` go deep to shallow; every reduction must divide the one before it along each axis.
    """
    ones = (1,) * len(bottom.reduction)
    targets = [(s.reduction, s.name) for s in skips]
    if not targets or targets[-1][0] != ones:
        targets.append((ones, None))
    stages: list[tuple[tuple[int, ...], str | None]] = []
    current, current_name = bottom.reduction, bottom.name
    for reduction, name in targets:
        if reduction == current or any(c % r for c, r in zip(current, reduction)):
            raise StrategyNotApplicableError(
                f"skip {name or 'full resolution'!r} (reduction {_fmt(reduction)}) cannot follow {current_name!r} "
                f"(reduction {_fmt(current)}): skip reductions must be distinct and divide the deeper ones per axis"
            )
        ratio = [c // r for c, r in zip(current, reduction)]
        steps: list[tuple[int, ...]] = []
        while any(r > 1 for r in ratio):
            step = tuple(2 if r % 2 == 0 else r for r in ratio)
            ratio = [r // s for r, s in zip(ratio, step)]
            steps.append(step)
        stages += [(step, name if i == len(steps) - 1 else None) for i, step in enumerate(steps)]
        current, current_name = reduction, name
    return stages


def _fmt(reduction: Sequence[int]) -> str:
    return str(reduction[0]) if len(set(reduction)) == 1 else "x".join(map(str, reduction))


class UpStage(nn.Module):
    """Upsample by ``scale`` (per axis), concatenate the skip feature (if any), two conv-norm-act layers."""

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int,
                 scale: Sequence[int], norm, act, dropout: float, upsample: str) -> None:
        super().__init__()
        self.up = UpSample(spatial_dims, in_channels, out_channels, scale_factor=tuple(scale), mode=upsample,
                           interp_mode="linear", align_corners=False)
        self.convs = TwoConv(spatial_dims, out_channels + skip_channels, out_channels, act, norm,
                             bias=not norm, dropout=dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([skip, x], dim=1)
        return self.convs(x)


class TruncatedUNet(FrozenUnits):
    """U-Net: ``backbone`` truncated at ``cut`` as encoder, a MONAI-block decoder back to input resolution.

    Args:
        backbone: a (pretrained) medtl3d backbone; it is copied, the original stays untouched.
        out_channels: number of output logits channels (classes incl. background for softmax losses).
        cut: cut point of the deepest encoder feature (default: the backbone's last cut point).
        decoder_channels: widths of the upsampling stages, deep to shallow. ``None`` derives them (16 at full
            resolution, doubling per stage towards the bottom, capped at 256: FlexibleUNet's (256, 128, 64, 32, 16)
            for a /32 encoder). A longer sequence is aligned to the output end (its last entries are used).
        skip_cuts: ``"auto"`` (see :func:`select_skip_cuts`) or explicit cut point names at or before ``cut``.
        norm, act, dropout: MONAI layer specs of the decoder convolutions.
        upsample: ``"deconv"`` (transposed convolution) or ``"nontrainable"`` (1x1 conv + (bi/tri)linear).
        freeze_encoder_units: ``None``, a cut point name (freeze every unit up to it) or unit indices; frozen units
            get no gradients and keep their norm statistics.

    The encoder is registered as ``backbone`` (state keys ``backbone.*``, as in TransferModel) so per-unit analyses
    apply unchanged.
    """

    def __init__(
        self,
        backbone: Backbone,
        out_channels: int,
        cut: str | None = None,
        decoder_channels: Sequence[int] | None = None,
        skip_cuts: str | Sequence[str] = "auto",
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        dropout: float = 0.0,
        upsample: str = "deconv",
        freeze_encoder_units: str | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise StrategyNotApplicableError(f"out_channels must be >= 1, got {out_channels}")
        if upsample not in ("deconv", "nontrainable"):
            raise StrategyNotApplicableError(f"upsample must be 'deconv' or 'nontrainable', got {upsample!r}")
        bottom = backbone.cut_point(cut) if cut is not None else backbone.cut_points[-1]
        skips = self._resolve_skips(backbone, bottom, skip_cuts)
        stages = plan_decoder(bottom, skips)
        widths = self._resolve_widths(decoder_channels, stages, backbone.name, bottom.name)

        self.backbone = copy.deepcopy(backbone).truncate_(bottom.name)
        self.cut = bottom.name
        self.strategy = "full" if bottom.unit == len(backbone.units) - 1 else "truncate"
        self.skip_cuts = [s.name for s in skips]
        self.stage_scales = [scale for scale, _ in stages]
        self.stage_skips = [skip for _, skip in stages]
        self.decoder_channels = widths
        self.out_channels = out_channels
        self.spatial_dims = backbone.spatial_dims
        self.in_channels = backbone.in_channels
        self.reduction = bottom.reduction
        self._expected_reduction = {p.name: p.reduction for p in [bottom, *skips]}

        channels = {p.name: p.channels for p in skips}
        blocks, previous = [], bottom.channels
        for (scale, skip), width in zip(stages, widths):
            blocks.append(UpStage(self.spatial_dims, previous, channels.get(skip, 0), width, scale, norm, act,
                                  dropout, upsample))
            previous = width
        self.decoder = nn.ModuleList(blocks)
        self.head = Convolution(self.spatial_dims, previous, out_channels, kernel_size=1, conv_only=True, bias=True)

        self.frozen_units: set[int] = set()
        self.freeze_units(self._resolve_frozen(freeze_encoder_units))
        extra = {k: v for k, v in backbone.build_args.items() if k not in ("spatial_dims", "in_channels")}
        self.model_config = {
            "builder": BUILDER,
            "backbone": backbone.name,
            "out_channels": out_channels,
            "cut": self.cut,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "decoder_channels": list(widths),
            "skip_cuts": list(self.skip_cuts),
            "norm": norm,
            "act": act,
            "dropout": dropout,
            "upsample": upsample,
            "freeze_encoder_units": freeze_encoder_units if isinstance(freeze_encoder_units, (str, type(None)))
            else list(freeze_encoder_units),
            **({"backbone_kwargs": extra} if extra else {}),
        }
        self.snapshot_initial_state()

    # ----------------------------------------------------------------- construction helpers
    @staticmethod
    def _resolve_skips(backbone: Backbone, bottom: CutPoint, skip_cuts) -> list[CutPoint]:
        if isinstance(skip_cuts, str):
            if skip_cuts != "auto":
                raise StrategyNotApplicableError(f"skip_cuts must be 'auto' or a list of cut point names, got {skip_cuts!r}")
            return select_skip_cuts(backbone, bottom)
        skips = [backbone.cut_point(name) for name in skip_cuts]
        late = [s.name for s in skips if s.unit > bottom.unit]
        if late:
            raise StrategyNotApplicableError(
                f"skip cut(s) {late} of {backbone.name} lie after the encoder cut {bottom.name!r}; skips must be at or "
                "before it"
            )
        return sorted(skips, key=lambda p: p.unit, reverse=True)

    @staticmethod
    def _resolve_widths(decoder_channels, stages, backbone_name: str, cut: str) -> list[int]:
        n = len(stages)
        if decoder_channels is None:
            return [min(16 * 2 ** j, 256) for j in reversed(range(n))]
        widths = [int(c) for c in decoder_channels]
        if len(widths) < n or any(c < 1 for c in widths):
            raise StrategyNotApplicableError(
                f"decoder_channels={widths} does not fit {backbone_name} cut at {cut!r}: its decoder has {n} "
                f"upsampling stages (scales {[_fmt(s) for s, _ in stages]}), so give at least {n} positive widths"
            )
        return widths[len(widths) - n:]

    def _resolve_frozen(self, freeze) -> list[int]:
        if freeze is None:
            return []
        if isinstance(freeze, str):
            return list(range(self.backbone.cut_point(freeze).unit + 1))
        indices = [int(i) for i in freeze]
        bad = [i for i in indices if not 0 <= i < len(self.backbone.units)]
        if bad:
            raise StrategyNotApplicableError(
                f"freeze_encoder_units {bad} out of range: the encoder ({self.backbone.name} cut at {self.cut!r}) has "
                f"units 0..{len(self.backbone.units) - 1}"
            )
        return indices

    # ----------------------------------------------------------------- forward
    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`DataError` for a batch the encoder/decoder cannot map back to its own size."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise DataError(
                f"{self.backbone.name} U-Net expects input (B, {self.in_channels}, {self.spatial_dims} spatial axes), "
                f"got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(s % r for s, r in zip(spatial, self.reduction)):
            raise DataError(
                f"input spatial shape {spatial} is not a multiple of {_fmt(self.reduction)} along every axis, which "
                f"{self.backbone.name} cut at {self.cut!r} requires (total reduction {_fmt(self.reduction)}); pad or "
                f"resize it, e.g. monai.transforms.DivisiblePad(k={self.reduction})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checking = not torch.jit.is_tracing()  # a trace is specialised to one shape; its checks would only warn
        if checking:
            self.check_input(x)
        features = self.backbone.forward_cuts(x, [*self.skip_cuts, self.cut])
        spatial = tuple(x.shape[2:])
        for name, feature in features.items() if checking else ():
            expected = tuple(s // r for s, r in zip(spatial, self._expected_reduction[name]))
            if tuple(feature.shape[2:]) != expected:
                raise StrategyNotApplicableError(
                    f"{self.backbone.name} feature {name!r} is {tuple(feature.shape[2:])} for input {spatial}, "
                    f"not input / reduction = {expected}: this backbone does not keep sizes aligned (e.g. unpadded "
                    "convolutions) and cannot feed a U-Net decoder at this input size"
                )
        y = features[self.cut]
        for stage, skip in zip(self.decoder, self.stage_skips):
            y = stage(y, None if skip is None else features[skip])
        return self.head(y)

    # ----------------------------------------------------------------- training bookkeeping
    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups ``encoder`` (trainable units only) and ``decoder`` (decoder + head), both at ``lr``."""
        encoder = [p for i in range(len(self.backbone.units)) if i not in self.frozen_units
                   for p in self.backbone.unit_parameters(i) if p.requires_grad]
        decoder = [*self.decoder.parameters(), *self.head.parameters()]
        groups = [{"params": encoder, "lr": lr, "weight_decay": weight_decay, "name": "encoder"}] if encoder else []
        return groups + [{"params": decoder, "lr": lr, "weight_decay": weight_decay, "name": "decoder"}]

    def snapshot_initial_state(self) -> None:
        """Remember the current weights as the state fine-tuning starts from."""
        self.initial_state = {k: v.detach().clone().cpu() for k, v in self.state_dict().items()}

    def describe(self) -> dict:
        """Backbone, cut, skips, decoder widths and parameter counts (total / trainable / frozen / per part)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {
            "backbone": self.backbone.name,
            "task": "segmentation",
            "strategy": self.strategy,
            "cut": self.cut,
            "skip_cuts": list(self.skip_cuts),
            "decoder_channels": list(self.decoder_channels),
            "stage_scales": [_fmt(s) for s in self.stage_scales],
            "out_channels": self.out_channels,
            "weights": getattr(self.backbone, "weights_source", None),
            "frozen_units": sorted(self.frozen_units),
            "params": total,
            "trainable_params": trainable,
            "frozen_params": total - trainable,
            "encoder_params": sum(p.numel() for p in self.backbone.parameters()),
            "decoder_params": total - sum(p.numel() for p in self.backbone.parameters()),
        }


def create_unet(
    backbone: str,
    out_channels: int,
    cut: str | None = None,
    weights: str | Path | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    backbone_kwargs: dict | None = None,
    **kwargs,
) -> TruncatedUNet:
    """Names to a ready U-Net: ``create_backbone`` (with ``weights``) + :class:`TruncatedUNet` (``kwargs``).

    ``model.model_config`` holds these arguments except ``weights`` (a checkpoint carries the tensors), so
    ``create_unet(**{k: v for k, v in cfg.items() if k != "builder"})`` rebuilds the architecture.
    """
    body = create_backbone(backbone, spatial_dims=spatial_dims, in_channels=in_channels, weights=weights,
                           **(backbone_kwargs or {}))
    return TruncatedUNet(body, out_channels, cut=cut, **kwargs)
