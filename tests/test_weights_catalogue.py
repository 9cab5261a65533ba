"""The weights catalogue: entries, where files are found, hashes, offline messages, ``normalize: auto``, the CLI.

No network: downloads are replaced by a failing ``torch.hub.download_url_to_file`` and the cache folder is a
temporary ``$MEDTL3D_WEIGHTS``. Normalisation values are computed by hand from the publishers' conventions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from monai.data import MetaTensor

from medtl3d.backbones import build_backbone, create_backbone
from medtl3d.cli import main as medtl3d_main
from medtl3d.data.presets import effective_options, preset
from medtl3d.errors import CorruptDownloadError, DataError, HubUnavailableError, UnknownWeightsTagError, WeightsError
from medtl3d.strategies import create_model
from medtl3d.weights import (Preprocessing, cache_folder, entry_file, get_weights, is_cached, list_weights,
                             weights_for)
from medtl3d.weights.catalogue import HASH_BOOK
from medtl3d.workflows import ConfigIdError, check_ids

MOBILENET = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """An empty catalogue cache folder, and no network."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("MEDTL3D_WEIGHTS", str(folder))

    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    return folder


def _save_medicalnet_like(path: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    state = {f"module.{k}": v for k, v in build_backbone("resnet3d_18").state_dict().items()}
    torch.save({"state_dict": state}, path)


def test_catalogue_lists_the_issue_entries_and_timm_tags():
    names = set(list_weights())
    assert {"densenet121.imagenet", "mobilenet_v2.imagenet", "resnet50.imagenet", "i3d.kinetics400",
            "resnext3d_101.kinetics", "penet.pe", "resnet50.radimagenet", "densenet121.radimagenet",
            "inception_v3.radimagenet", "densenet121.xrv_all", "resnet50.xrv_all", "resnet3d_18.medicalnet",
            "resnet3d_50.medicalnet", "dinov2_vits14.lvd142m", "rad_dino.cxr", "genesis_unet3d.chest_ct"} <= names
    every = list_weights(timm_tags=True)
    assert "timm/vit_small_patch14_dinov2.lvd142m" in every and len(every) > len(names) + 1000
    timm_entry = get_weights("timm/convnext_atto.d2_in1k")
    assert timm_entry.architecture == "timm/convnext_atto" and timm_entry.num_classes == 1000
    assert timm_entry.preprocessing.input_size == (224, 224) and timm_entry.licence == "apache-2.0"


def test_torchvision_entries_come_from_torchvision_enums():
    import torchvision.models as tvm

    entry = get_weights("densenet121.imagenet")
    assert entry.url == tvm.DenseNet121_Weights.IMAGENET1K_V1.url and entry.file == "densenet121-a639ec97.pth"
    assert entry.hash_prefix == "a639ec97" and entry.num_classes == 1000 and entry.class_names[1] == "goldfish"
    assert entry.preprocessing.mean == (0.485, 0.456, 0.406) and entry.preprocessing.input_size == (224, 224)
    assert get_weights("resnet50.imagenet_v2").hash_prefix == "11ad3fa6"


def test_names_resolve_full_short_and_unknown():
    assert weights_for("resnet50", "imagenet").name == "resnet50.imagenet"
    assert weights_for("resnet50", "resnet50.radimagenet").name == "resnet50.radimagenet"
    assert weights_for("timm/convnext_atto", "d2_in1k").name == "timm/convnext_atto.d2_in1k"
    assert weights_for("cbr_tiny", "imagenet") is None
    with pytest.raises(UnknownWeightsTagError, match="resnet50.imagenet, resnet50.imagenet_v2"):
        get_weights("resnet50.nope")
    with pytest.raises(WeightsError, match="'resnet50.imagenet' are for architecture 'resnet50', not 'densenet121'"):
        create_backbone("densenet121", weights="resnet50.imagenet")


@pytest.mark.parametrize("prep, channels, mean, std", [
    (Preprocessing((224, 224)), 3, [0.0] * 3, [1.0] * 3),
    (get_weights("resnet50.imagenet").preprocessing, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    # one channel into RGB weights: the channel means (timm's 1-channel values 0.449 / 0.226)
    (get_weights("resnet50.imagenet").preprocessing, 1, [0.449], [0.226]),
    # TorchXRayVision: [0, 1] -> [-1024, 1024] is (x - 0.5) * 2048
    (get_weights("densenet121.xrv_all").preprocessing, 1, [0.5], [1 / 2048]),
    # I3D: [-1, 1] is (x - 0.5) * 2
    (get_weights("i3d.kinetics400").preprocessing, 3, [0.5] * 3, [0.5] * 3),
    # Hara Kinetics: 0-255 frames minus the Kinetics mean, no std: (255 x - m) = (x - m / 255) / (1 / 255)
    (get_weights("resnext3d_101.kinetics").preprocessing, 1, [(110.63666788 + 103.16065604 + 96.29023126) / 765],
     [1 / 255]),
])
def test_effective_normalization_by_hand(prep, channels, mean, std):
    got = prep.normalization(channels)
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(got["std"], std, rtol=1e-6)


def test_medicalnet_normalization_is_a_per_volume_zscore_over_nonzero_voxels():
    assert get_weights("resnet3d_18.medicalnet").preprocessing.normalization(1) == {"zscore": "nonzero"}
    volume = MetaTensor(torch.zeros(1, 8, 8, 8))
    volume[0, 2:6, 2:6, 2:6] = torch.arange(64, dtype=torch.float32).reshape(4, 4, 4) + 500.0
    out = preset("ct", train=False, weights="resnet3d_18.medicalnet", size=8, orientation=None,
                 window=(0, 1000))({"image": volume})["image"]
    inside = out[out != 0]
    assert inside.numel() == 64 and abs(float(inside.mean())) < 1e-5
    assert abs(float(inside.std(unbiased=False)) - 1) < 1e-4


def test_auto_maps_a_cxr_onto_torchxrayvision_range():
    image = MetaTensor(torch.tensor([[[0.0, 255.0], [51.0, 204.0]]]))  # (C, x, y)
    out = preset("cxr", train=False, size=2, intensity=(0, 255), weights="densenet121.xrv_all")({"image": image})
    # xrv.datasets.normalize(img, 255): (2 * img / 255 - 1) * 1024; the preset also puts rows first (transpose)
    expected = (2 * image[0].T / 255 - 1) * 1024
    torch.testing.assert_close(out["image"][0], expected.float(), atol=1e-3, rtol=0)


def test_explicit_normalize_wins_and_auto_without_weights_does_nothing():
    image = MetaTensor(torch.rand(3, 4, 4))
    plain = preset("pathology", train=False, size=4, intensity=(0, 1))({"image": image})["image"]
    torch.testing.assert_close(plain, image.permute(0, 2, 1))
    explicit = preset("pathology", train=False, size=4, intensity=(0, 1), normalize=(0.5, 0.25),
                      weights="resnet50.imagenet")({"image": image})["image"]
    torch.testing.assert_close(explicit, (image.permute(0, 2, 1) - 0.5) / 0.25)


def test_auto_with_an_unknown_file_or_short_name_is_one_clear_line(tmp_path):
    stray = tmp_path / "mine.pth"
    torch.save({}, stray)
    for weights in (str(stray), "imagenet"):
        with pytest.raises(DataError, match="normalize='auto' cannot tell how weights") as caught:
            preset("cxr", train=False, weights=weights)
        assert "\n" not in str(caught.value)


def test_effective_options_record_what_auto_resolved_to():
    options = effective_options("pathology", {"size": 224, "weights": "resnet50.imagenet"})
    assert options["normalize"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                    "weights": "resnet50.imagenet"}
    image = MetaTensor(torch.rand(3, 8, 8))
    recorded = preset("pathology", train=False, **{**options, "size": 8, "weights": None})
    auto = preset("pathology", train=False, size=8, weights="resnet50.imagenet")
    torch.testing.assert_close(recorded({"image": image})["image"], auto({"image": image})["image"])
    assert effective_options("cxr", {"normalize": "imagenet"})["normalize"] == "imagenet"


def test_cache_folder_file_is_found_and_its_hash_prefix_checked(cache):
    assert cache_folder() == cache and not (cache / MOBILENET).exists()
    (cache / MOBILENET).write_bytes(b"not the published file")
    assert is_cached(get_weights("mobilenet_v2.imagenet"))
    with pytest.raises(CorruptDownloadError, match=r"not the published b0353104\.\.\. of weights 'mobilenet_v2"):
        create_backbone("mobilenet_v2", weights="imagenet")


def test_offline_and_missing_names_entry_file_url_and_folder(cache):
    with pytest.raises(HubUnavailableError) as caught:
        create_backbone("resnet18", weights="imagenet")
    message = str(caught.value)
    assert "'resnet18.imagenet'" in message and "name resolution" in message and "\n" not in message
    assert "get resnet18-f37072fd.pth from https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"put it in {cache}" in message
    with pytest.raises(HubUnavailableError, match="not downloaded automatically: get resnext-101-kinetics.pth from "
                                                  "https://github.com/kenshohara/3D-ResNets-PyTorch"):
        create_backbone("resnext3d_101", weights="kinetics")


def test_hash_recorded_at_first_use_and_a_changed_file_refused(cache):
    entry = get_weights("densenet121.radimagenet")  # RadImageNet fixes no hash
    path = cache / entry.file
    path.write_bytes(b"first")
    assert entry_file(entry) == path
    assert json.loads((cache / HASH_BOOK).read_text()) == {entry.name: hashlib.sha256(b"first").hexdigest()}
    assert entry_file(entry) == path  # the same file again: fine
    path.write_bytes(b"second")
    with pytest.raises(CorruptDownloadError, match="were first used with") as caught:
        entry_file(entry)
    assert "\n" not in str(caught.value)


def test_an_explicit_file_named_like_an_entry_is_that_entry(cache, tmp_path):
    path = tmp_path / "resnet_18_23dataset.pth"
    _save_medicalnet_like(path)
    backbone = create_backbone("resnet3d_18", weights=str(path))
    assert backbone.weights_source == "resnet3d_18.medicalnet" and backbone.weights_record["file"] == str(path)
    assert backbone.weights_record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="for architecture 'resnet3d_18', not 'resnet3d_50'"):
        create_backbone("resnet3d_50", weights=str(path))


def test_bundle_weights_id_is_checked_against_the_catalogue():
    assert check_ids(backbone="densenet121", weights="densenet121.imagenet")
    assert check_ids(backbone="resnext3d_101", weights="kinetics")
    with pytest.raises(ConfigIdError, match="resnet50.imagenet are weights for resnet50, not densenet121"):
        check_ids(backbone="densenet121", weights="resnet50.imagenet")
    with pytest.raises(ConfigIdError, match="'kinetics' is neither a file nor a catalogue name for densenet121"):
        check_ids(backbone="densenet121", weights="kinetics")


def test_transfer_strategies_without_weights_warn_loudly():
    with pytest.warns(UserWarning, match="'truncate' on resnet18 WITHOUT pretrained weights.*resnet18.imagenet"):
        create_model("resnet18", "truncate", num_classes=2, cut="layer1")


def test_loading_and_auto_normalisation_are_logged(tmp_path, caplog):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with caplog.at_level(logging.INFO, logger="medtl3d"):
        create_backbone("resnet18", in_channels=1, weights=tmp_path / "r18.pth")
        preset("cxr", train=False, size=8, weights="resnet18.imagenet")
    loaded = [r.getMessage() for r in caplog.records if r.name == "medtl3d.weights"]
    assert len(loaded) == 1 and f"resnet18 weights {tmp_path / 'r18.pth'} (sha256 " in loaded[0]
    assert "120 tensors loaded, 0 missing; conv1.weight: 3 -> 1 input channels (kernels summed)" in loaded[0]
    assert loaded[0].count("published head (fc.bias, fc.weight) kept aside") == 1
    normalised = [r.getMessage() for r in caplog.records if r.name == "medtl3d.data"]
    # one grey channel: the ImageNet channel means, (0.485 + 0.456 + 0.406) / 3 and (0.229 + 0.224 + 0.225) / 3
    assert any("normalize='auto' from weights 'resnet18.imagenet'" in m and "'mean': [0.449]" in m
               and "'std': [0.226]" in m for m in normalised)


def test_weights_cli_list_and_info(cache, capsys):
    assert medtl3d_main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "| name | architecture | source | licence | cached |" in out
    row = next(line for line in out.splitlines() if line.startswith("| densenet121.xrv_all |"))
    assert "Apache-2.0" in row and row.endswith("| no |")
    assert str(cache) in out
    assert medtl3d_main(["weights", "list", "--architecture", "resnet3d_50"]) == 0
    assert capsys.readouterr().out.count("\n| resnet3d_50.") == 1
    assert medtl3d_main(["weights", "info", "penet.pe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "penet" and info["input_size"] == [24, 192, 192] and info["mean"] == [0.15897]
    assert medtl3d_main(["weights", "info", "penet.nope"]) == 2
    assert "no weights 'penet.nope'" in capsys.readouterr().err
