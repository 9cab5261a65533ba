"""timm's hub loader tells "not reachable" apart from "corrupt download" and "no such tag", each in one line.

timm's fetchers are replaced, so no network is needed: each test makes the fetch fail the way the real one does (a
``URLError`` from urllib, torch.hub's hash-mismatch ``RuntimeError``, a truncated zip). The catalogue's own
downloads (torchvision files and others) are tested in ``test_weights_catalogue.py``.
"""

from __future__ import annotations

import urllib.error
import zipfile

import pytest
import timm

from medtl3d.errors import CorruptDownloadError, HubUnavailableError, UnknownWeightsTagError, WeightsError
from medtl3d.weights._hub import timm_weights

TIMM = "resnet18.a1_in1k"


@pytest.fixture(autouse=True)
def empty_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _fail_fetches(monkeypatch, error: Exception) -> None:
    def fetch(*args, **kwargs):
        raise error

    for name in ("load_state_dict_from_hf", "download_cached_file", "load_state_dict_from_url"):
        monkeypatch.setattr(timm.models._builder, name, fetch)


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("loader, source", [(timm_weights(TIMM), TIMM)])
def test_an_unreachable_hub_says_so_and_how_to_pass_a_file(monkeypatch, loader, source):
    _fail_fetches(monkeypatch, urllib.error.URLError("[Errno -3] Temporary failure in name resolution"))
    with pytest.raises(HubUnavailableError) as caught:
        loader()
    message = _one_line(caught.value)
    assert source in message and "name resolution" in message and "No model hub seems reachable" in message
    assert "corrupt" not in message


@pytest.mark.parametrize("error", [
    RuntimeError('invalid hash value (expected "f37072fd", got "0b3f7a2c")'),  # torch.hub's check_hash
    zipfile.BadZipFile("File is not a zip file"),  # a truncated .pth (torch.load reads a zip)
    RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"),
])
@pytest.mark.parametrize("loader, source", [(timm_weights(TIMM), TIMM)])
def test_a_corrupt_download_says_to_delete_the_cached_file(monkeypatch, loader, source, error):
    _fail_fetches(monkeypatch, error)
    with pytest.raises(CorruptDownloadError) as caught:
        loader()
    message = _one_line(caught.value)
    assert source in message and "is corrupt" in message and "Delete the cached file" in message
    assert "reachable" not in message
    assert isinstance(caught.value, WeightsError) and not isinstance(caught.value, HubUnavailableError)


@pytest.mark.parametrize("loader, named, known", [
    (timm_weights("resnet18.no_such_tag"), "'no_such_tag'", "resnet18.a1_in1k"),
    (timm_weights("no_such_net.a1_in1k"), "'no_such_net'", None),
])
def test_an_unknown_tag_is_named_before_anything_is_fetched(monkeypatch, loader, named, known):
    _fail_fetches(monkeypatch, AssertionError("no fetch may happen for an unknown tag"))
    with pytest.raises(UnknownWeightsTagError) as caught:
        loader()
    message = _one_line(caught.value)
    assert named in message and ("no weights" in message or "no pretrained tag" in message or "no model" in message)
    if known is not None:
        assert "known: " in message and known in message
    assert "reachable" not in message and "corrupt" not in message
