"""timm pretrained tags fetched through timm's own hub mechanism, and how a failed fetch is told.

timm caches downloads (the Hugging Face cache), so a machine that fetched once, or whose cache was filled by hand,
works offline (the catalogue downloads other files itself: :mod:`.catalogue`). A fetch that fails says which of
three things went wrong, in one line:

- the hub is **not reachable** (no network, DNS, proxy, timeout): :class:`HubUnavailableError`, saying how to pass a
  local file instead;
- the **download is corrupt** (hash mismatch, truncated or unreadable file in the cache):
  :class:`CorruptDownloadError`, saying to delete the cached file and fetch again;
- there is **no such tag** (a timm pretrained tag that does not exist):
  :class:`UnknownWeightsTagError`, naming the tags that do.
"""

from __future__ import annotations

import pickle
import zipfile
from typing import Callable

import timm
from timm.models import get_pretrained_cfg, is_model, list_pretrained, split_model_name_tag

from ..errors import CorruptDownloadError, HubUnavailableError, UnknownWeightsTagError, setting

# what torch.hub, torch.load and safetensors say about a file that arrived damaged
_CORRUPT_MESSAGES = ("invalid hash value", "pytorchstreamreader", "central directory", "unexpected eof",
                     "header too large", "invalid header", "incomplete metadata")


def _local_file() -> str:
    return setting("weights", "/path/to/file.pth")


def _offline_error(what: str, exc: Exception) -> HubUnavailableError:
    return HubUnavailableError(
        f"could not fetch {what}: {type(exc).__name__}: {exc}. No model hub seems reachable from this machine; "
        f"download the file elsewhere and pass its path as {_local_file()} (or fill the hub cache)."
    )


def _corrupt_error(what: str, exc: Exception) -> CorruptDownloadError:
    return CorruptDownloadError(
        f"the download of {what} is corrupt: {type(exc).__name__}: {' '.join(str(exc).split())}. Delete the cached "
        f"file (under $TORCH_HOME/hub/checkpoints or the Hugging Face cache) and fetch again, or pass a good copy as "
        f"{_local_file()}."
    )


def _is_corrupt(exc: BaseException) -> bool:
    """A file that was fetched but cannot be used: a hash mismatch, a truncated zip/pickle, a damaged safetensors."""
    if isinstance(exc, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)) or \
            type(exc).__name__ == "SafetensorError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _CORRUPT_MESSAGES)


def _fetch_error(what: str, exc: Exception) -> Exception:
    """The one-line error for a failed fetch: corrupt download, else not reachable (network errors and anything
    else the hub libraries raise while fetching)."""
    return _corrupt_error(what, exc) if _is_corrupt(exc) else _offline_error(what, exc)


def timm_weights(model_name: str) -> Callable[[], dict]:
    """Loader for a timm pretrained tag such as ``"deit_small_patch16_224.fb_in1k"``."""

    def load() -> dict:
        architecture, tag = split_model_name_tag(model_name)
        if not is_model(architecture):
            raise UnknownWeightsTagError(f"timm has no model {architecture!r} (weights {model_name!r})")
        try:
            known_tag = get_pretrained_cfg(model_name) is not None
        except RuntimeError:  # timm: "Invalid pretrained tag (...) for ..."
            known_tag = False
        if not known_tag:
            tags = ", ".join(list_pretrained(f"{architecture}.*")) or "none"
            raise UnknownWeightsTagError(f"timm has no pretrained tag {tag or '(default)'!r} for {architecture} "
                                         f"(known: {tags})")
        try:
            return timm.create_model(model_name, pretrained=True).state_dict()
        except Exception as exc:
            raise _fetch_error(f"timm {model_name}", exc) from exc

    load.source = f"timm:{model_name}"
    return load
