"""The backbone zoo: 2D and 3D networks exposed as ordered units with named cut points.

``create_backbone(name, spatial_dims, in_channels, weights)`` builds one and loads weights; importing this package
registers every family module, and ``timm/<model name>`` builds any timm 2D model (:mod:`.timm_adapter`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..weights import load_backbone_state, resolve_weights, weights_or_none
from . import (  # noqa: F401  (each registers its family)
    cbr, densenet, genesis, i3d, inception, mobilenet, penet, resnet, transformers,
)
from ._base import LEVELS, Backbone, CutPoint, Unit
from ._registry import BackboneEntry, build_backbone, get_entry, list_backbones, register_backbone, register_namespace
from .timm_adapter import PREFIX as TIMM_PREFIX, TimmBackbone, timm_entry

register_namespace(TIMM_PREFIX, timm_entry)
logger = logging.getLogger("medtl3d.weights")


def create_backbone(
    name: str,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    weights: str | Path | None = None,
    **kwargs,
) -> Backbone:
    """Build backbone ``name`` and load ``weights`` (None, a catalogue name such as ``densenet121.imagenet`` or
    ``imagenet``, or a file). An entry trained with another BatchNorm epsilon (Keras) builds the backbone with it.

    The published classifier of a weight file is kept on ``backbone.pretrained_head`` (empty when none), so a
    full model can reuse it; the load report is on ``backbone.weights_report`` and what was loaded (entry, file,
    SHA-256, tensors loaded and adapted), logged in one line, on ``backbone.weights_record``.
    """
    weights = weights_or_none(weights)
    state, record = resolve_weights(name, weights) if weights is not None else (None, None)  # bad names fail fast
    if record and record.get("batch_norm_eps") is not None:  # the weights' training framework's BatchNorm
        kwargs.setdefault("batch_norm_eps", record["batch_norm_eps"])
    backbone = build_backbone(name, spatial_dims, in_channels, **kwargs)
    backbone.weights_source = None
    backbone.weights_record = None
    backbone.pretrained_head = {}
    if state is not None:
        entry = get_entry(name)
        source = record.get("entry") or record.get("file") or record.get("source")
        report = load_backbone_state(backbone, state, source, head_keys=entry.head_keys)
        backbone.weights_source = source
        backbone.pretrained_head = report.head_state
        backbone.weights_report = report
        backbone.weights_record = {**record, **report.describe()}
        eps = backbone.build_args.get("batch_norm_eps")
        logger.info("%s weights %s%s: %s%s", name, source,
                    f" (sha256 {record['sha256'][:12]}...)" if record.get("sha256") else "", report.summary(),
                    f"; BatchNorm eps {eps:g}" if eps is not None else "")
    return backbone


__all__ = [
    "LEVELS",
    "Backbone",
    "BackboneEntry",
    "TimmBackbone",
    "CutPoint",
    "Unit",
    "build_backbone",
    "create_backbone",
    "get_entry",
    "list_backbones",
    "register_backbone",
    "register_namespace",
]
