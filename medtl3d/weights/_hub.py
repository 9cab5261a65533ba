"""Named weights (``imagenet``...) fetched through torchvision's and timm's own hub mechanisms.

Both cache downloads (``$TORCH_HOME/hub/checkpoints``, the Hugging Face cache), so a machine that fetched once, or
whose cache was filled by hand, works offline. When nothing is cached and no hub is reachable the user gets a
:class:`HubUnavailableError` that says how to pass a local file instead.
"""

from __future__ import annotations

from typing import Callable

from ..errors import HubUnavailableError, setting


def _offline_error(what: str, exc: Exception) -> HubUnavailableError:
    return HubUnavailableError(
        f"could not fetch {what}: {type(exc).__name__}: {exc}. No model hub seems reachable from this machine; "
        f"download the file elsewhere and pass its path as {setting('weights', '/path/to/file.pth')} (or fill the hub "
        "cache)."
    )


def torchvision_weights(enum_path: str) -> Callable[[], dict]:
    """Loader for a torchvision weights enum member such as ``"ResNet50_Weights.IMAGENET1K_V1"``."""

    def load() -> dict:
        import torchvision.models as tvm

        enum_name, member = enum_path.split(".")
        weights = getattr(getattr(tvm, enum_name), member)
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # urllib/ssl/socket errors: all mean "not reachable"
            raise _offline_error(f"torchvision {enum_path} from {weights.url}", exc) from exc

    load.source = f"torchvision:{enum_path}"
    return load


def timm_weights(model_name: str) -> Callable[[], dict]:
    """Loader for a timm pretrained tag such as ``"deit_small_patch16_224.fb_in1k"``."""

    def load() -> dict:
        import timm

        try:
            return timm.create_model(model_name, pretrained=True).state_dict()
        except Exception as exc:
            raise _offline_error(f"timm {model_name}", exc) from exc

    load.source = f"timm:{model_name}"
    return load
