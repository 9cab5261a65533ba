"""Transfer-learning strategies as small operations on a backbone's ordered units.

=================  =========================================================================================
``random``         same architecture, random init (RI)
``full``           all pretrained units, new head, fine-tune everything (FTL / WT)
``linear_probe``   all pretrained units frozen, only a new head trains
``truncate``       keep units up to the cut, drop the rest, new head (TruncatedTL)
``transfusion``    pretrained up to the cut; units above rebuilt with widths / ``width_factor``, random (TF)
``partial``        pretrained up to the cut; units above same width, random (weight transfusion)
``lwft``           units up to the cut frozen; above at LR/``lr_ratio``; head at LR (layer-wise fine-tuning)
``stats``          conv/linear tensors re-sampled iid from N(mean, std) of each pretrained tensor, norms reset;
                   ``up_to`` keeps units up to that cut pretrained (Mean-Var / ST, and WT-ST hybrids)
=================  =========================================================================================

Each takes a (pretrained) :class:`~medtl3d.backbones.Backbone`, leaves it untouched, and returns a
:class:`TransferModel` whose ``param_groups(lr)`` feed the optimizer and whose ``initial_state`` is the state
fine-tuning starts from.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..backbones import Backbone, build_backbone, create_backbone, get_entry
from ..errors import NoPretrainedWeightsWarning, StrategyNotApplicableError
from ..weights import get_weights, list_weights, weights_or_none
from ._model import TransferModel

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_RESAMPLED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _fresh(backbone: Backbone, **overrides) -> Backbone:
    """A randomly initialised backbone built like ``backbone`` (same registry name and build arguments)."""
    fresh = build_backbone(backbone.name, **{**backbone.build_args, **overrides})
    return fresh.to(next(backbone.parameters()).device)


def _copy_units(source: Backbone, target: Backbone, last_unit: int) -> None:
    """Copy the tensors of units ``0..last_unit`` from ``source`` into ``target`` (bit-identical), and the record
    of the weights they came from (what the run's provenance reports)."""
    keys = [k for i in range(last_unit + 1) for k in source.unit_state_keys(i)]
    src = source.state_dict()
    target.load_state_dict({k: src[k] for k in keys}, strict=False)
    target.weights_source = getattr(source, "weights_source", None)
    target.weights_record = getattr(source, "weights_record", None)


def _finish(model: TransferModel) -> TransferModel:
    model.snapshot_initial_state()
    return model


def _requires_cut(strategy: str, cut) -> None:
    if cut is None:
        raise StrategyNotApplicableError(f"strategy {strategy!r} needs a cut point (cut=...)")


def random(backbone: Backbone, num_classes: int, dropout: float = 0.0) -> TransferModel:
    """RI: the same architecture with random weights."""
    return _finish(TransferModel(_fresh(backbone), num_classes, dropout, "random"))


def full(backbone: Backbone, num_classes: int, dropout: float = 0.0, pretrained_head: bool = False) -> TransferModel:
    """FTL / WT: every pretrained unit, a new head (or the published one), everything trains."""
    model = TransferModel(copy.deepcopy(backbone), num_classes, dropout, "full")
    if pretrained_head:
        model.load_pretrained_head()
    return _finish(model)


def linear_probe(backbone: Backbone, num_classes: int, dropout: float = 0.0) -> TransferModel:
    """Frozen pretrained backbone (norm statistics included); only the new head trains."""
    model = TransferModel(copy.deepcopy(backbone), num_classes, dropout, "linear_probe")
    model.freeze_units(range(len(model.backbone.units)))
    return _finish(model)


def truncate(backbone: Backbone, cut: str, num_classes: int, dropout: float = 0.0) -> TransferModel:
    """TruncatedTL: keep the units up to ``cut``, discard the rest, pool + new head."""
    _requires_cut("truncate", cut)
    trunk = copy.deepcopy(backbone).truncate_(cut)
    return _finish(TransferModel(trunk, num_classes, dropout, "truncate", backbone.cut_point(cut).name))


def transfusion(backbone: Backbone, cut: str, num_classes: int, width_factor: float = 2.0,
                dropout: float = 0.0) -> TransferModel:
    """TransFusion: pretrained up to ``cut``; above it every width divided by ``width_factor``, random init."""
    _requires_cut("transfusion", cut)
    entry = get_entry(backbone.name)
    if not entry.slimmable:
        raise StrategyNotApplicableError(
            f"strategy 'transfusion' does not apply to backbone {backbone.name!r}: its family cannot be rebuilt "
            "with slimmer units above a cut (see its module docstring); use 'partial' or 'truncate' instead"
        )
    if not width_factor > 1.0:
        raise StrategyNotApplicableError(f"transfusion needs width_factor > 1, got {width_factor}")
    point = backbone.cut_point(cut)
    if point.unit == len(backbone.units) - 1:
        raise StrategyNotApplicableError(
            f"transfusion at {point.name!r} leaves nothing to slim: it is the last cut point of {backbone.name}"
        )
    slim = _fresh(backbone, slim_from=point.unit + 1, width_factor=float(width_factor))
    _copy_units(backbone, slim, point.unit)
    return _finish(TransferModel(slim, num_classes, dropout, "transfusion", point.name))


def partial(backbone: Backbone, cut: str, num_classes: int, dropout: float = 0.0) -> TransferModel:
    """Weight transfusion: pretrained up to ``cut``, the same architecture randomly initialised above it."""
    _requires_cut("partial", cut)
    point = backbone.cut_point(cut)
    fresh = _fresh(backbone)
    _copy_units(backbone, fresh, point.unit)
    return _finish(TransferModel(fresh, num_classes, dropout, "partial", point.name))


def lwft(backbone: Backbone, cut: str, num_classes: int, dropout: float = 0.0, lr_ratio: float = 10.0) -> TransferModel:
    """Layer-wise fine-tuning: units up to ``cut`` frozen, units above at LR/``lr_ratio``, the head at LR."""
    _requires_cut("lwft", cut)
    point = backbone.cut_point(cut)
    if lr_ratio <= 0:
        raise StrategyNotApplicableError(f"lwft needs lr_ratio > 0, got {lr_ratio}")
    model = TransferModel(copy.deepcopy(backbone), num_classes, dropout, "lwft", point.name)
    model.freeze_units(range(point.unit + 1))
    model.unit_lr_scale = {i: 1.0 / lr_ratio for i in range(point.unit + 1, len(backbone.units))}
    return _finish(model)


def stats(backbone: Backbone, num_classes: int, up_to: str | None = None, dropout: float = 0.0,
          generator: torch.Generator | None = None) -> TransferModel:
    """Mean-Var / statistics transfer (Raghu et al. 2019; Matsoukas et al. 2022's ST).

    Every conv/linear weight and bias (and bare token tensors such as ``pos_embed``) of the units above ``up_to``
    (all units when None) is re-sampled iid from N(mean, std) of that pretrained tensor; norm layers there are
    reset to their initial values.
    """
    model = TransferModel(copy.deepcopy(backbone), num_classes, dropout, "stats", up_to)
    body = model.backbone
    first = 0 if up_to is None else body.cut_point(up_to).unit + 1
    with torch.no_grad():
        for index in range(first, len(body.units)):
            tensors: list[torch.Tensor] = []
            for path in body.units[index].modules:
                owned = body._owned(path)
                if isinstance(owned, torch.Tensor):
                    tensors.append(owned)
                    continue
                for module in owned.modules():
                    if isinstance(module, _RESAMPLED):
                        tensors.extend(t for t in (module.weight, module.bias) if t is not None)
                    elif isinstance(module, _NORMS):
                        module.reset_parameters()
            for tensor in tensors:
                _resample_(tensor, generator)
    return _finish(model)


def _resample_(tensor: torch.Tensor, generator: torch.Generator | None) -> None:
    """Replace ``tensor`` in place by iid draws from N(its mean, its std)."""
    mean = tensor.float().mean()
    std = tensor.float().std() if tensor.numel() > 1 else torch.zeros(())
    draws = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std + mean
    tensor.copy_(draws.to(tensor.dtype))


STRATEGIES: dict[str, Callable[..., TransferModel]] = {
    "random": random,
    "full": full,
    "linear_probe": linear_probe,
    "truncate": truncate,
    "transfusion": transfusion,
    "partial": partial,
    "lwft": lwft,
    "stats": stats,
}
CUT_STRATEGIES = ("truncate", "transfusion", "partial", "lwft")


def apply_strategy(backbone: Backbone, strategy: str, num_classes: int, cut: str | None = None, **kwargs) -> TransferModel:
    """Dispatch by name (what configs and the CLI use); bad names and misplaced arguments are clear errors."""
    if strategy not in STRATEGIES:
        raise StrategyNotApplicableError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy in CUT_STRATEGIES:
        return STRATEGIES[strategy](backbone, cut=cut, num_classes=num_classes, **kwargs)
    if cut is not None:
        raise StrategyNotApplicableError(
            f"strategy {strategy!r} takes no cut point (got cut={cut!r}); cut strategies: {', '.join(CUT_STRATEGIES)}"
            + ("; for stats use up_to=..." if strategy == "stats" else "")
        )
    return STRATEGIES[strategy](backbone, num_classes=num_classes, **kwargs)


def create_model(
    backbone: str,
    strategy: str = "full",
    num_classes: int = 2,
    cut: str | None = None,
    weights: str | Path | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    backbone_kwargs: dict | None = None,
    **strategy_kwargs,
) -> TransferModel:
    """One call from names to a ready model: ``create_backbone`` (with ``backbone_kwargs``) + ``apply_strategy``.

    ``random`` ignores ``weights`` by definition; every other strategy starts from them. The cut strategies
    (truncate, transfusion, lwft, partial) warn loudly without weights: there is nothing to transfer.
    """
    weights = weights_or_none(weights)
    source = None if strategy == "random" else weights
    if weights is None and strategy in CUT_STRATEGIES:
        named = [n for n in list_weights() if get_weights(n).architecture == backbone]
        warnings.warn(f"strategy {strategy!r} on {backbone} WITHOUT pretrained weights: the kept units start random, "
                      "so nothing is transferred; pass weights (" + (f"e.g. {named[0]}, " if named else "")
                      + "see `medtl3d weights list`, or a file)", NoPretrainedWeightsWarning, stacklevel=2)
    body = create_backbone(backbone, spatial_dims=spatial_dims, in_channels=in_channels, weights=source,
                           **(backbone_kwargs or {}))
    return apply_strategy(body, strategy, num_classes, cut=cut, **strategy_kwargs)


__all__ = ["CUT_STRATEGIES", "STRATEGIES", "TransferModel", "apply_strategy", "create_model", *STRATEGIES]
