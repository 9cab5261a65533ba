"""The models the bundle configs build (``network_def``): a classifier or a U-Net with the bundle's config ids.

Weights that cannot be fetched or loaded stop the bundle under config id ``weights``. Checkpoints name
:func:`build_classifier` as their builder (``model_config["builder"] == "classifier"``), so it sits here, below the
engine that rebuilds models from checkpoints; :mod:`medtl3d.workflows` re-exports both builders.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from ..config_ids import ConfigIdError
from ..errors import HubUnavailableError, WeightsError
from ..strategies import CUT_STRATEGIES, create_model
from .unet import create_unet


@contextmanager
def _weights_id(weights: str | None) -> Iterator[None]:
    """Weights that cannot be fetched or loaded stop the bundle under config id ``weights`` (MONAI would otherwise
    report a failed ``network_def`` component)."""
    try:
        yield
    except (WeightsError, HubUnavailableError) as err:
        raise ConfigIdError("weights", f"{weights}: {err}") from err


def build_classifier(backbone: str, strategy: str = "full", num_classes: int = 1, cut: str | None = None,
                     weights: str | None = None, spatial_dims: int | None = None, in_channels: int | None = None,
                     width_factor: float = 2.0, lr_ratio: float = 10.0, dropout: float = 0.0,
                     freeze_up_to: str | None = None, backbone_kwargs: dict | None = None) -> nn.Module:
    """``create_model`` with the bundle's ids; ``freeze_up_to`` freezes units up to that cut for any strategy.
    The model's ``model_config`` rebuilds it (without weights) from a checkpoint, with the backbone's build
    options (``backbone_kwargs``: e.g. the BatchNorm epsilon of Keras-trained weights)."""
    kwargs: dict[str, Any] = {"dropout": dropout}
    if strategy == "transfusion":
        kwargs["width_factor"] = width_factor
    if strategy == "lwft":
        kwargs["lr_ratio"] = lr_ratio
    with _weights_id(weights):
        model = create_model(backbone, strategy, num_classes, cut=cut if strategy in CUT_STRATEGIES else None,
                             weights=weights, spatial_dims=spatial_dims, in_channels=in_channels,
                             backbone_kwargs=backbone_kwargs,
                             **({"up_to": cut} if strategy == "stats" and cut else {}), **kwargs)
    if freeze_up_to:
        model.freeze_units(range(model.backbone.cut_point(freeze_up_to).unit + 1))
        model.snapshot_initial_state()
    model.model_config = {
        "builder": "classifier", "backbone": backbone, "strategy": strategy,
        "num_classes": num_classes, "cut": cut, "spatial_dims": model.backbone.spatial_dims,
        "in_channels": model.backbone.in_channels, "width_factor": width_factor, "lr_ratio": lr_ratio,
        "dropout": dropout, "freeze_up_to": freeze_up_to,
    }
    eps = model.backbone.build_args.get("batch_norm_eps")  # the other build options follow from the ids above
    if eps is not None:
        model.model_config["backbone_kwargs"] = {"batch_norm_eps": eps}
    return model


def build_segmenter(backbone: str, out_channels: int, cut: str | None = None, weights: str | None = None,
                    spatial_dims: int | None = None, in_channels: int | None = None,
                    freeze_up_to: str | None = None, **unet_options: Any) -> nn.Module:
    """A :class:`~medtl3d.models.TruncatedUNet` whose encoder is ``backbone`` cut at ``cut``."""
    with _weights_id(weights):
        return create_unet(backbone, out_channels, cut=cut, weights=weights, spatial_dims=spatial_dims,
                           in_channels=in_channels, freeze_encoder_units=freeze_up_to, **unet_options)
