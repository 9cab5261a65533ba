"""``timm/<model>`` backbones against timm itself: cut points from ``feature_info``, truncation against timm's own
``prune_intermediate_layers``, forward equality with ``forward_intermediates`` / ``forward_features``, strategies,
weights, efficiency report, the cutoff search and the analyses; and the published-head pooling of DeiT."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import timm
import timm.models._builder
import torch

from medtl3d.analysis.activations import collect_activations
from medtl3d.analysis.probes import probe_cut_points
from medtl3d.analysis.reinit import classification_metric, reinit_robustness
from medtl3d.analysis.similarity import linear_cka
from medtl3d.backbones import build_backbone, create_backbone, get_entry, list_backbones
from medtl3d.efficiency import efficiency_report
from medtl3d.search import run_search
from medtl3d.errors import HubUnavailableError, StrategyNotApplicableError, UnknownBackboneError, WeightsError
from medtl3d.strategies import apply_strategy, full, transfusion, truncate
from medtl3d.weights import list_weights

CXR_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cxr_classification"
# family: (timm model, timm kwargs, input side, block cut names, number of layer cuts)
FAMILIES = {
    "convnext": ("convnext_atto", {}, 32, ["stages.0", "stages.1", "stages.2", "stages.3"], 0),
    "convnextv2": ("convnextv2_atto", {}, 32, ["stages.0", "stages.1", "stages.2", "stages.3"], 0),
    "efficientnet": ("efficientnet_b0", {}, 32,
                     ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "conv_head"], 15),
    "regnet": ("regnetx_002", {}, 32, ["stem", "s1", "s2", "s3", "s4"], 0),
    "resnet_d": ("resnet18d", {}, 32, ["act1", "layer1", "layer2", "layer3", "layer4"], 8),
    "vit": ("vit_tiny_patch16_224", {"img_size": 32}, 32, ["depth3", "depth6", "depth9", "depth12"], 12),
    "deit": ("deit_tiny_patch16_224", {"img_size": 32}, 32, ["depth3", "depth6", "depth9", "depth12"], 12),
    "dinov2": ("vit_small_patch14_dinov2", {"img_size": 28}, 28, ["depth3", "depth6", "depth9", "depth12"], 12),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, 64,
             ["layers.0", "layers.1", "layers.2", "layers.3"], 0),
    "maxvit": ("maxvit_nano_rw_256", {"img_size": 64}, 64, ["stem", "stages.0", "stages.1", "stages.2", "stages.3"], 0),
    "efficientformerv2": ("efficientformerv2_s0", {"img_size": 64}, 64, ["stages.0", "stages.1", "stages.2", "stages.3"], 0),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 32, ["bn1", "blocks.0", "blocks.1", "blocks.3", "blocks.5"], 12),
    "mobilenetv4": ("mobilenetv4_conv_small", {}, 32, ["bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.4"], 17),
    "densenet": ("densenet121", {}, 32, ["features.norm0", "features.denseblock1", "features.denseblock2",
                                         "features.denseblock3", "features.norm5"], 4),
    "inception": ("inception_v3", {}, 75, ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"], 9),
    "xception": ("legacy_xception", {}, 32, ["act2", "block1", "block2", "block11", "act4"], 13),
}
SLOW = {"inception", "maxvit", "swin", "densenet", "dinov2"}  # > 2 s each to build on one thread
CASES = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES]


@pytest.fixture(scope="module", params=CASES)
def family(request) -> str:
    """Module-scoped, so pytest runs each family's tests together and builds its models once."""
    return request.param


@pytest.fixture(scope="module")
def pair(family):
    """(timm reference in eval mode, our backbone holding the same weights)."""
    model, kwargs, _, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    reference = timm.create_model(model, pretrained=False, **kwargs).eval()
    backbone = build_backbone(f"timm/{model}", **kwargs).eval()
    reference_state = reference.state_dict()
    backbone.load_state_dict({k: reference_state[k] for k in backbone.state_dict()})
    return reference, backbone


def _input(family: str, batch: int = 2) -> torch.Tensor:
    side = FAMILIES[family][2]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


def _as_map(reference, features: torch.Tensor) -> torch.Tensor:
    """timm's ``forward_features`` as a channels-first map: tokens without their prefix folded onto the grid, NHWC permuted."""
    if features.ndim == 3:
        tokens = features[:, reference.num_prefix_tokens:]
        side = int(tokens.shape[1] ** 0.5)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
    return features.permute(0, 3, 1, 2) if getattr(reference, "output_fmt", "NCHW") == "NHWC" else features


def _feature_cuts(backbone, reference) -> list[tuple[int, str]]:
    """(feature_info index, our cut name) for every feature whose module is one of our cut points."""
    names = {c.name for c in backbone.cut_points}
    return [(i, f["module"]) for i, f in enumerate(reference.feature_info) if f["module"] in names]


def test_cut_points_follow_timm_feature_info(family, pair):
    reference, backbone = pair
    _, _, _, block_names, layer_count = FAMILIES[family]
    blocks, layers = backbone.cut_points_at("block"), backbone.cut_points_at("layer")
    assert [c.name for c in blocks] == block_names
    assert len(layers) == layer_count
    info = reference.feature_info
    isotropic = block_names[0] == "depth3"
    feature_cuts = layers if isotropic else blocks[: len(info)]
    assert [(c.channels, c.reduction) for c in feature_cuts] == [(f["num_chs"], (f["reduction"],) * 2) for f in info]
    if isotropic:
        assert [c.name for c in layers] == [f["module"] for f in info]
    # the units own every tensor of the backbone exactly once, and the backbone is timm's model without its head
    owners = [k for i in range(len(backbone.units)) for k in backbone.unit_state_keys(i)]
    assert sorted(owners) == sorted(backbone.state_dict())
    head_prefixes = tuple(p + "." for p in get_entry(backbone.name).head_keys)
    assert set(backbone.state_dict()) == {k for k in reference.state_dict() if not k.startswith(head_prefixes)}
    assert backbone.name not in list_backbones()


def test_forward_matches_forward_intermediates_and_forward_features(family, pair):
    reference, backbone = pair
    x = _input(family)
    cuts = _feature_cuts(backbone, reference)[:-1]  # the last feature unit also holds the final norm
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=[i for i, _ in cuts], norm=False,
                                                   intermediates_only=True)
        ours = backbone.forward_cuts(x, [name for _, name in cuts])
        for (_, name), value in zip(cuts, expected):
            torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=1e-5)  # timm's default: NCHW maps
        features = backbone(x)
        torch.testing.assert_close(features, _as_map(reference, reference.forward_features(x)), atol=1e-5, rtol=1e-5)
    assert features.shape[1] == backbone.num_features


def test_truncation_keeps_what_timm_prune_intermediate_layers_keeps(family, pair):
    reference, backbone = pair
    features = _feature_cuts(backbone, reference)
    index, cut = features[len(features) // 2 - 1]
    model = truncate(backbone, cut, num_classes=3).eval()
    with torch.device("meta"):
        pruned = timm.create_model(FAMILIES[family][0], pretrained=False, **FAMILIES[family][1])
    pruned.prune_intermediate_layers(indices=[index], prune_norm=True, prune_head=True)
    head_prefixes = tuple(p + "." for p in get_entry(backbone.name).head_keys)
    timm_body = sum(p.numel() for k, p in pruned.named_parameters() if not k.startswith(head_prefixes))
    assert sum(p.numel() for p in model.backbone.parameters()) == timm_body
    assert timm_body < sum(p.numel() for p in backbone.parameters())
    with torch.no_grad():
        assert model(_input(family)).shape == (2, 3)
    assert model.backbone.num_features == backbone.cut_point(cut).channels


def test_transfusion_is_refused_by_name(pair):
    _, backbone = pair
    cut = backbone.cut_points_at("block")[1].name
    with pytest.raises(StrategyNotApplicableError, match=f"'transfusion' does not apply to backbone '{backbone.name}'"):
        transfusion(backbone, cut, num_classes=2)


def test_other_strategies_build_and_train(family, pair):
    if family not in ("resnet_d", "deit", "efficientnet"):
        pytest.skip("the strategies are exercised on three families")
    _, backbone = pair
    cut = backbone.cut_points_at("block")[2].name
    for strategy in ("random", "full", "linear_probe", "truncate", "partial", "lwft", "stats"):
        torch.manual_seed(1)  # not the seed the pair was built with: re-initialised units must differ
        kwargs = {"cut": cut} if strategy in ("truncate", "partial", "lwft") else {}
        model = apply_strategy(backbone, strategy, 3, **kwargs).train()
        logits = model(_input(family))
        assert logits.shape == (2, 3)
        logits.sum().backward()
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert all(p.grad is None for p in frozen)
        assert bool(frozen) == (strategy in ("linear_probe", "lwft")), strategy
        if strategy == "partial":
            initial = model.initial_state
    # partial: pretrained up to the cut, the same architecture re-initialised above it
    unit = backbone.cut_point(cut).unit
    source = backbone.state_dict()
    kept = [k for i in range(unit + 1) for k in backbone.unit_state_keys(i)]
    assert all(torch.equal(initial[f"backbone.{k}"], source[k]) for k in kept)
    above = [k for k in backbone.unit_state_keys(unit + 1) if source[k].ndim > 1]
    assert above and not any(torch.equal(initial[f"backbone.{k}"], source[k]) for k in above)


def test_efficiency_report_on_a_timm_backbone():
    backbone = build_backbone("timm/resnet18d")
    report = efficiency_report(backbone, strategy="truncate", cuts="block", input_shape=(3, 32, 32), runs=1,
                               warmup=0)
    rows = {r.cut: r for r in report.rows if not r.is_full}
    assert list(rows) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    kept = truncate(backbone, "layer2", num_classes=2)
    assert rows["layer2"].params == sum(p.numel() for p in kept.parameters())
    assert 0 < rows["act1"].macs_g < rows["layer2"].macs_g < rows["layer4"].macs_g


@pytest.mark.slow
def test_hierarchical_search_on_a_timm_backbone(tmp_path):
    """The cutoff search runs unchanged on a timm model: its block cuts are Stage 1, the costs are the truncated
    models' own parameter counts, the report is written."""
    overrides = {"backbone": "timm/mobilenetv3_small_050", "weights": "null", "epochs": 1, "phantom_cases": 16,
                 "phantom_size": 32, "image_size": 32, "batch_size": 8, "amp": False, "tensorboard": False,
                 "device": "cpu", "n_folds": 2}
    result = run_search(CXR_BUNDLE, tmp_path, overrides=overrides, strategies=["truncate"], early_stop=False,
                        efficiency_runs=1, efficiency_warmup=0, evaluate_test=False, cpus_per_trial=1)
    backbone = build_backbone("timm/mobilenetv3_small_050", in_channels=1)
    stage1 = {r["label"] for r in result.rows if r["stage"] == 1}
    # blocks.5 is the last block cut: truncating there is the full backbone
    assert stage1 == {"full", "truncate@bn1", "truncate@blocks.0", "truncate@blocks.1", "truncate@blocks.3"}
    assert {r["stage"] for r in result.rows} == {1, 2} and result.picks["TTL-2"] in {r["label"] for r in result.rows}
    for row in (r for r in result.rows if r["strategy"] == "truncate"):
        kept = truncate(build_backbone("timm/mobilenetv3_small_050", in_channels=1), row["cut"], num_classes=1)
        assert row["params_m"] == pytest.approx(sum(p.numel() for p in kept.parameters()) / 1e6, abs=1e-6)
    assert result.row("full")["params_m"] == pytest.approx(
        sum(p.numel() for p in full(backbone, num_classes=1).parameters()) / 1e6, abs=1e-6)
    assert all((tmp_path / name).stat().st_size > 0 for name in ("search_report.csv", "search_report.md"))


@pytest.mark.parametrize("model, kwargs", [
    pytest.param("vit_tiny_patch16_224", {"img_size": 32}, marks=pytest.mark.slow), ("convnext_atto", {})])
def test_analyses_on_timm_backbones(model, kwargs):
    """Probes, CKA and re-initialisation robustness take a timm backbone (token or channels-last layout) as any."""
    torch.manual_seed(0)
    backbone = create_backbone(f"timm/{model}", in_channels=1, **kwargs)
    images, labels = torch.randn(24, 1, 32, 32), torch.arange(24) % 2
    images[labels == 1] += 1.0  # brighter class: separable from the first cut on
    train, test = [(images[:16], labels[:16])], [(images[16:], labels[16:])]
    rows = probe_cut_points(backbone, train, test, "block", probes=("knn",), options={"knn": {"k": 5}})
    blocks = backbone.cut_points_at("block")
    assert [(r["cut"], r["features"]) for r in rows] == [(c.name, c.channels) for c in blocks]
    features = collect_activations(backbone, train, [blocks[-1].name])[blocks[-1].name]
    assert linear_cka(features, features) == pytest.approx(1.0)
    model_ = full(backbone, num_classes=2).eval()
    initial = {k: v.clone() for k, v in model_.state_dict().items()}
    result = reinit_robustness(initial, model_.state_dict(), model_, classification_metric(test), modes=["reinit"])
    assert len(result) == len(backbone.units) and all(r["drop"] == pytest.approx(0.0) for r in result)


def test_unknown_timm_model_is_one_line_with_close_matches():
    with pytest.raises(UnknownBackboneError) as caught:
        build_backbone("timm/convnext_atoo")
    message = str(caught.value)
    assert "unknown timm model 'convnext_atoo'" in message and "timm/convnext_atto" in message
    assert "\n" not in message


def test_in_chans_and_timm_layout_files_load(tmp_path):
    reference = timm.create_model("resnet18d", pretrained=False).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18d.pth")
    backbone = create_backbone("timm/resnet18d", in_channels=1, weights=tmp_path / "resnet18d.pth").eval()
    assert backbone.conv1[0].in_channels == 1 and backbone.weights_report.adapted == ["conv1.0.weight"]
    assert set(backbone.pretrained_head) == {"fc.weight", "fc.bias"}
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():  # a grey image copied into three channels gives the RGB model's response
        torch.testing.assert_close(backbone(x), reference.forward_features(x.expand(-1, 3, -1, -1)),
                                   atol=1e-5, rtol=1e-5)


def test_pretrained_tags_are_weight_names_and_offline_names_tag_file_and_cache(monkeypatch, tmp_path):
    assert "timm/convnext_atto.d2_in1k" in list_weights(timm_tags=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    for fetch in ("load_state_dict_from_hf", "download_cached_file", "load_state_dict_from_url"):
        monkeypatch.setattr(timm.models._builder, fetch, unreachable)
    with pytest.raises(HubUnavailableError) as caught:
        create_backbone("timm/convnext_atto", weights="d2_in1k")
    message = str(caught.value)
    assert "convnext_atto.d2_in1k" in message and "name resolution" in message
    assert "weights='/path/to/file.pth'" in message and "\n" not in message


@pytest.mark.parametrize("model", ["resnet18d", "deit_tiny_patch16_224"])
def test_published_head_reproduces_timm_logits(tmp_path, model):
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if "deit" in model else {}
    reference = timm.create_model(model, pretrained=False, **kwargs).eval()
    torch.save(reference.state_dict(), tmp_path / "model.pth")
    backbone = create_backbone(f"timm/{model}", weights=tmp_path / "model.pth", **kwargs)
    published = full(backbone, num_classes=1000, pretrained_head=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(published(x), reference(x), atol=1e-5, rtol=1e-5)


def test_a_published_head_with_more_than_a_linear_layer_is_refused(tmp_path):
    reference = timm.create_model("convnext_atto", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "convnext.pth")
    backbone = create_backbone("timm/convnext_atto", weights=tmp_path / "convnext.pth")
    assert set(backbone.pretrained_head) == {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}
    with pytest.raises(WeightsError, match="no single published classifier"):
        full(backbone, num_classes=1000, pretrained_head=True)


def test_deit_small_published_head_reads_the_class_token(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("deit_small_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    torch.save(reference.state_dict(), tmp_path / "deit.pth")
    model = full(create_backbone("deit_small", weights=tmp_path / "deit.pth"), 1000, pretrained_head=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
        model.published_pooling = False  # the same classifier on mean-pooled patch tokens: not timm's logits
        assert not torch.allclose(model(x), reference(x), atol=1e-3)
