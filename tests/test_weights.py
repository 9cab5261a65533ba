"""Weight loading: published layouts, safe reading, clear errors, channel adaptation and 2D-to-3D inflation."""

from __future__ import annotations

import json
import socket
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medtl3d.backbones import build_backbone, create_backbone
from medtl3d.errors import HubUnavailableError, UnsafeCheckpointError, WeightsError
from medtl3d.strategies import create_model, full
from medtl3d.weights import replicate_depth_padding_

SHARED = Path(__file__).resolve().parents[2] / "shared"
LAYOUTS = SHARED / "fixtures" / "checkpoint_layouts" / "published_3d_layouts.json"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (reference fixtures) is not present")


def _tensors_of_layout(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        k: torch.tensor(0) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=gen) * 0.01
        for k, shape in keys.items()
    }


@needs_shared
def test_resnext3d_101_loads_hara_kinetics_layout(tmp_path):
    layout = json.loads(LAYOUTS.read_text())["resnext3d_101_kinetics400"]
    state = _tensors_of_layout(layout["keys"])
    assert all(k.startswith("module.") for k in state)
    path = tmp_path / "resnext-101-kinetics.pth"
    torch.save({"epoch": 200, "arch": "resnext-101", "state_dict": state, "optimizer": {}}, path)
    backbone = create_backbone("resnext3d_101", weights=path)
    assert set(backbone.pretrained_head) == {"fc.weight", "fc.bias"}
    assert torch.equal(backbone.state_dict()["layer3.22.conv2.weight"], state["module.layer3.22.conv2.weight"])
    model = full(backbone, num_classes=400, pretrained_head=True)
    assert sum(p.numel() for p in model.parameters()) == layout["num_params"] == 48_340_816
    assert torch.equal(model.head.weight, state["module.fc.weight"])


def test_resnet50_parameter_count_matches_torchvision():
    model = create_model("resnet50", "random", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


def test_torchvision_resnet50_file_loads_and_gives_torchvision_logits(tmp_path):
    import torchvision

    reference = torchvision.models.resnet50().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = create_model("resnet50", "full", num_classes=1000, weights=path, pretrained_head=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_medicalnet_layout_from_monai_loads_into_resnet3d(tmp_path):
    from monai.networks.nets import resnet18, resnet50

    for ours, theirs in (
        ("resnet3d_18", resnet18(spatial_dims=3, n_input_channels=1, shortcut_type="A", conv1_t_stride=2, feed_forward=False)),
        ("resnet3d_50", resnet50(spatial_dims=3, n_input_channels=1, shortcut_type="B", bias_downsample=False,
                                 conv1_t_stride=2, feed_forward=False)),
    ):
        theirs.eval()
        path = tmp_path / f"{ours}.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, path)
        backbone = create_backbone(ours, weights=path).eval()
        x = torch.randn(1, 1, 32, 32, 32)
        with torch.no_grad():
            assert torch.allclose(backbone(x).mean(dim=(2, 3, 4)), theirs(x), atol=1e-5), ours


def test_weights_of_another_architecture_are_refused_with_the_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(build_backbone("resnet18").state_dict(), path)
    with pytest.raises(WeightsError) as info:
        create_backbone("resnet50", weights=path)
    message = str(info.value)
    assert "resnet18.pth" in message and "'resnet50'" in message
    assert "missing in the file" in message and "layer1.0.conv3.weight" in message
    assert "shape mismatch" in message and "layer1.0.conv1.weight: file (64, 64, 3, 3) vs model (64, 64, 1, 1)" in message


def test_a_checkpoint_that_needs_unpickling_is_refused(tmp_path):
    path = tmp_path / "pickled_model.pth"
    torch.save(build_backbone("resnet18"), path)  # a whole pickled module, like TTL's checkpoints
    with pytest.raises(UnsafeCheckpointError, match="arbitrary unpickling"):
        create_backbone("resnet18", weights=path)


def test_missing_file_and_unknown_weight_name_are_named(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth"):
        create_backbone("resnet18", weights=tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match=r"nor a catalogue name \(for resnet18: resnet18.imagenet;"):
        create_backbone("resnet18", weights="radimagenet")


def test_hub_name_offline_gives_a_clear_error(monkeypatch, tmp_path):
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(HubUnavailableError, match="weights='/path/to/resnet50-0676ba61.pth'"):
        create_backbone("resnet50", weights="imagenet")


def test_first_conv_is_adapted_to_one_channel(tmp_path):
    source = build_backbone("resnet18").eval()
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    grey = create_backbone("resnet18", in_channels=1, weights=path).eval()
    assert grey.weights_report.adapted == ["conv1.weight"]
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(grey(image), source(image.repeat(1, 3, 1, 1)), atol=1e-5)


def test_inflated_resnet50_gives_the_2d_logits_on_a_depth_constant_volume(tmp_path):
    torch.manual_seed(0)
    model_2d = create_model("resnet50", "random", num_classes=5).eval()
    state = {k.removeprefix("backbone."): v for k, v in model_2d.state_dict().items() if k.startswith("backbone.")}
    state.update({"fc.weight": model_2d.head.weight, "fc.bias": model_2d.head.bias})
    path = tmp_path / "resnet50_2d.pth"
    torch.save(state, path)

    backbone_3d = create_backbone("resnet50", spatial_dims=3, weights=path)
    assert "conv1.weight" in backbone_3d.weights_report.inflated
    assert backbone_3d.state_dict()["conv1.weight"].shape == (64, 3, 7, 7, 7)
    replicate_depth_padding_(backbone_3d)
    model_3d = full(backbone_3d, num_classes=5, pretrained_head=True).eval()

    image = torch.randn(2, 3, 64, 64)
    volume = image.unsqueeze(2).repeat(1, 1, 16, 1, 1)
    with torch.no_grad():
        logits_2d, logits_3d = model_2d(image), model_3d(volume)
    assert torch.allclose(logits_3d, logits_2d, atol=1e-4), (logits_3d - logits_2d).abs().max()


def test_one_channel_3d_twin_of_an_rgb_2d_network(tmp_path):
    """RGB 2D weights into a grey 3D twin: the first conv is summed over RGB, then inflated (in that order)."""
    torch.manual_seed(0)
    source = build_backbone("resnet18").eval()
    path = tmp_path / "rgb_2d.pth"
    torch.save(source.state_dict(), path)
    grey_3d = create_backbone("resnet18", spatial_dims=3, in_channels=1, weights=path)
    assert grey_3d.weights_report.adapted == ["conv1.weight"] and "conv1.weight" in grey_3d.weights_report.inflated
    replicate_depth_padding_(grey_3d)
    image = torch.randn(2, 1, 64, 64)
    volume = image.unsqueeze(2).repeat(1, 1, 8, 1, 1)
    with torch.no_grad():
        features_2d = source(image.repeat(1, 3, 1, 1)).mean(dim=(2, 3))
        features_3d = grey_3d.eval()(volume).mean(dim=(2, 3, 4))
    assert torch.allclose(features_3d, features_2d, atol=1e-4)
