"""inception_v3, deit_small, swin_tiny: exact sizes, library layouts and numerics, channel adaptation, hub errors."""

from __future__ import annotations

import re
import urllib.error

import pytest
import timm
import timm.models._builder
import torch
import torchvision

from medtl3d.backbones import build_backbone, create_backbone
from medtl3d.errors import HubUnavailableError

NAMES = ("inception_v3", "deit_small", "swin_tiny")

# backbone width, and the library model's parameter count with its 1000-class head: torchvision
# inception_v3(aux_logits=False, init_weights=False), timm deit_small_patch16_224 and swin_tiny_patch4_window7_224
PUBLISHED = {"inception_v3": (2048, 23_834_568), "deit_small": (384, 22_050_664), "swin_tiny": (768, 28_288_354)}


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _save(state: dict[str, torch.Tensor], path, wrapped: bool = False):
    """Save ``state`` as a plain state_dict, or as a DataParallel-style ``{"state_dict": {"module.k": v}}``."""
    if wrapped:
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(state, path)
    return path


def _load_both_ways(name: str, state: dict[str, torch.Tensor], tmp_path):
    """Load ``state`` plainly and wrapped; both must give the same backbone. Returns the plain one in eval mode."""
    plain = create_backbone(name, weights=_save(state, tmp_path / "plain.pth"))
    wrapped = create_backbone(name, weights=_save(state, tmp_path / "wrapped.pth", wrapped=True))
    wrapped_state = wrapped.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, wrapped_state[key]), key
    assert set(plain.pretrained_head) == set(wrapped.pretrained_head)
    return plain.eval()


def _randomize_norm_statistics(model: torch.nn.Module) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics (eval numerics then test them)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.1, generator=generator)
                m.running_mean.normal_(0.0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)


def _pooled(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.mean(dim=(2, 3))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_the_library_model(name):
    width, published = PUBLISHED[name]
    backbone = build_backbone(name)
    assert backbone.num_features == width
    assert _parameters(backbone) + width * 1000 + 1000 == published


def test_inception_loads_torchvision_files_and_reproduces_its_logits(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    _randomize_norm_statistics(reference)
    reference.eval()
    backbone = _load_both_ways("inception_v3", reference.state_dict(), tmp_path)
    assert set(backbone.pretrained_head) == {"fc.weight", "fc.bias"}  # AuxLogits.* were dropped, not loaded
    head = backbone.pretrained_head

    pooled_reference = {}
    reference.avgpool.register_forward_hook(lambda module, args, out: pooled_reference.update(x=out.flatten(1)))
    x = torch.randn(2, 3, 107, 107)
    # torchvision's pretrained builder turns transform_input on; both models read the flag at forward time
    for transform_input in (False, True):
        reference.transform_input = backbone.transform_input = transform_input
        with torch.no_grad():
            logits_reference = reference(x)
            features = _pooled(backbone(x))
        torch.testing.assert_close(features, pooled_reference["x"], atol=1e-5, rtol=1e-5)
        logits = features @ head["fc.weight"].T + head["fc.bias"]
        torch.testing.assert_close(logits, logits_reference, atol=1e-5, rtol=1e-5)


def test_deit_loads_timm_files_and_reproduces_its_patch_tokens(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    backbone = _load_both_ways("deit_small", reference.state_dict(), tmp_path)
    assert set(backbone.pretrained_head) == {"head.weight", "head.bias"}

    # at the pretrained size, and at 64x64 against timm's own interpolated position embedding
    dynamic = timm.create_model("deit_small_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    dynamic.load_state_dict(reference.state_dict())
    for model, batch, size in ((reference, 1, 224), (dynamic, 2, 64)):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            tokens = model.forward_features(x)[:, 1:]  # normed patch tokens, class token dropped
            feature_map = backbone(x)
        grid = size // 16
        assert feature_map.shape == (batch, 384, grid, grid)
        expected = tokens.reshape(batch, grid, grid, 384).permute(0, 3, 1, 2)
        torch.testing.assert_close(feature_map, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_pooled(feature_map), tokens.mean(1), atol=1e-5, rtol=1e-5)


def test_swin_loads_timm_and_original_files_and_reproduces_its_logits(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    state = reference.state_dict()
    backbone = _load_both_ways("swin_tiny", state, tmp_path)
    assert set(backbone.pretrained_head) == {"head.fc.weight", "head.fc.bias"}

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = reference.forward_features(x)
        logits_reference = reference.forward_head(tokens)
        feature_map = backbone(x)
    torch.testing.assert_close(feature_map, tokens.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)
    head = backbone.pretrained_head
    logits = _pooled(feature_map) @ head["head.fc.weight"].T + head["head.fc.bias"]
    torch.testing.assert_close(logits, logits_reference, atol=1e-5, rtol=1e-5)

    # below the pretrained size, against timm's own dynamic-size model (windows padded, not shrunk)
    dynamic = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, dynamic_img_size=True).eval()
    dynamic.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = dynamic.forward_features(x).permute(0, 3, 1, 2)
        torch.testing.assert_close(backbone(x), expected, atol=1e-5, rtol=1e-5)

    # Microsoft's original layout: patch merging at the end of a stage, classifier called head
    original = {
        re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        .replace("head.fc.", "head."): v
        for k, v in state.items()
    }
    assert "layers.0.downsample.reduction.weight" in original
    converted = backbone.convert_state_dict(original)
    assert converted.keys() == state.keys()
    for key, value in converted.items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", NAMES)
def test_one_channel_input_from_a_three_channel_file(tmp_path, name):
    torch.manual_seed(0)
    rgb = build_backbone(name).eval()
    grey = create_backbone(name, in_channels=1, weights=_save(rgb.state_dict(), tmp_path / "rgb.pth")).eval()
    report = grey.weights_report
    assert len(report.adapted) == 1
    key = report.adapted[0]
    torch.testing.assert_close(grey.state_dict()[key], rgb.state_dict()[key].sum(dim=1, keepdim=True))
    # a grey image copied into three channels gives the RGB model's response (at the first block cut: deeper,
    # randomly initialised activations grow large enough for float32 summation order to show)
    x = torch.randn(2, 1, 96, 96)
    cut = rgb.cut_points_at("block")[0].name
    with torch.no_grad():
        torch.testing.assert_close(grey(x, cut=cut), rgb(x.expand(-1, 3, -1, -1), cut=cut), atol=1e-5, rtol=1e-5)
        assert grey(x).shape[1] == rgb.num_features


def test_inception_transform_input_needs_rgb():
    with pytest.raises(ValueError, match="3 channels"):
        build_backbone("inception_v3", in_channels=1, transform_input=True)


@pytest.mark.parametrize("name,source", [
    ("inception_v3", "inception_v3_google-0cc3c7bd.pth"),
    ("deit_small", "deit_small_patch16_224.fb_in1k"),
    ("swin_tiny", "swin_tiny_patch4_window7_224.ms_in1k"),
])
def test_imagenet_without_hub_or_cache_raises_a_helpful_error(monkeypatch, tmp_path, name, source):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)  # the catalogue's own downloads
    for fetch in ("load_state_dict_from_hf", "download_cached_file", "load_state_dict_from_url"):
        monkeypatch.setattr(timm.models._builder, fetch, unreachable)

    with pytest.raises(HubUnavailableError) as caught:
        create_backbone(name, weights="imagenet")
    message = str(caught.value)
    assert source in message and "name resolution" in message
    assert "weights='/path/to/" in message
