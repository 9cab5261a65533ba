"""Strategies: what each one keeps, re-initialises, freezes and slims, for every backbone in 2D and 3D."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

from medtl3d.backbones import build_backbone, get_entry, list_backbones
from medtl3d.errors import StrategyNotApplicableError, UnknownCutPointError
from medtl3d.strategies import STRATEGIES, apply_strategy, full, linear_probe, lwft, partial, random, stats, transfusion, truncate


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return build_backbone("resnet50").eval()


def _unit_keys(backbone, last_unit):
    return [k for i in range(last_unit + 1) for k in backbone.unit_state_keys(i)]


def test_truncate_resnet50_after_layer3_keeps_stem_layers1_to_3_and_a_1024x2_head(resnet50):
    model = truncate(resnet50, "layer3", num_classes=2)
    prefixes = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
    expected = {f"backbone.{k}" for k in resnet50.state_dict() if k.startswith(prefixes)} | {"head.weight", "head.bias"}
    assert set(model.state_dict()) == expected
    assert tuple(model.head.weight.shape) == (2, 1024)
    kept = sum(v.numel() for k, v in resnet50.named_parameters() if k.startswith(prefixes))
    assert sum(p.numel() for p in model.parameters()) == kept + 1024 * 2 + 2
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, resnet50.state_dict()[key]), key
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    assert "layer4" in dict(resnet50.named_children()), "the source backbone must stay untouched"


def test_transfusion_halves_widths_above_the_cut_and_keeps_the_rest_bit_identical(resnet50):
    model = transfusion(resnet50, "layer3", num_classes=2, width_factor=2)
    body, source = model.backbone.state_dict(), resnet50.state_dict()
    cut_unit = resnet50.cut_point("layer3").unit
    for key in _unit_keys(resnet50, cut_unit):
        assert torch.equal(body[key], source[key]), key
    assert body["layer4.0.conv2.weight"].shape[0] == source["layer4.0.conv2.weight"].shape[0] // 2
    assert body["layer4.2.conv3.weight"].shape[0] == 1024
    assert body["layer4.0.conv1.weight"].shape[1] == 1024, "the first slim block reads the pretrained width"
    assert tuple(model.head.weight.shape) == (2, 1024)
    full_params = sum(p.numel() for p in full(resnet50, 2).parameters())
    assert sum(p.numel() for p in model.parameters()) < full_params


def test_partial_keeps_bottom_and_reinitialises_top(resnet50):
    model = partial(resnet50, "layer2", num_classes=3)
    body, source = model.backbone.state_dict(), resnet50.state_dict()
    bottom = set(_unit_keys(resnet50, resnet50.cut_point("layer2").unit))
    for key in bottom:
        assert torch.equal(body[key], source[key])
    top_convs = [k for k in source if k.endswith("conv2.weight") and k not in bottom]
    assert top_convs and all(body[k].shape == source[k].shape and not torch.equal(body[k], source[k]) for k in top_convs)


def test_random_changes_every_conv(resnet50):
    model = random(resnet50, num_classes=2)
    source = resnet50.state_dict()
    convs = [k for k in source if "conv" in k and k.endswith("weight")]
    assert all(not torch.equal(model.backbone.state_dict()[k], source[k]) for k in convs)


def test_stats_matches_each_tensor_mean_and_std_and_changes_values(resnet50):
    source = {k: v.clone() for k, v in resnet50.state_dict().items()}
    with torch.no_grad():  # give BN non-default values, so the reset is visible
        for m in resnet50.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(0.5)
    model = stats(resnet50, num_classes=2, generator=torch.Generator().manual_seed(1))
    body = model.backbone.state_dict()
    checked = 0
    for key, before in source.items():
        if "conv" in key and key.endswith("weight") and before.numel() >= 4096:
            after = body[key]
            assert not torch.equal(after, before)
            n, mu, sd = before.numel(), before.mean(), before.std()
            assert abs(after.mean() - mu) < 5 * sd / n**0.5 + 1e-7, key
            assert abs(after.std() / sd - 1) < 0.1, key
            checked += 1
    assert checked > 40
    assert torch.all(body["layer1.0.bn1.weight"] == 1) and torch.all(body["layer1.0.bn1.bias"] == 0)


def test_stats_up_to_keeps_bottom_units(resnet50):
    model = stats(resnet50, num_classes=2, up_to="layer1")
    for key in _unit_keys(resnet50, resnet50.cut_point("layer1").unit):
        assert torch.equal(model.backbone.state_dict()[key], resnet50.state_dict()[key])
    assert not torch.equal(model.backbone.state_dict()["layer3.0.conv2.weight"], resnet50.state_dict()["layer3.0.conv2.weight"])


def test_lwft_freezes_bottom_units_and_uses_lr_ratio_10(resnet50):
    model = lwft(resnet50, "layer2", num_classes=2)
    cut_unit = resnet50.cut_point("layer2").unit
    groups = model.param_groups(lr=1e-3)
    assert [g["name"] for g in groups] == ["backbone_x0.1", "head"]
    assert groups[1]["lr"] / groups[0]["lr"] == pytest.approx(10.0)
    frozen = {id(p) for i in range(cut_unit + 1) for p in model.backbone.unit_parameters(i)}
    assert all(not p.requires_grad for i in range(cut_unit + 1) for p in model.backbone.unit_parameters(i))
    assert not frozen & {id(p) for g in groups for p in g["params"]}
    top = sum(p.numel() for g in groups[:1] for p in g["params"])
    expected_top = sum(p.numel() for i in range(cut_unit + 1, len(model.backbone.units)) for p in model.backbone.unit_parameters(i))
    assert top == expected_top
    # a training step changes neither the frozen weights nor their BatchNorm statistics
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD(groups, lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()
    after = model.backbone.state_dict()
    for key in _unit_keys(resnet50, cut_unit):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])
    assert not torch.equal(after["layer4.0.bn1.running_mean"], before["layer4.0.bn1.running_mean"])


def test_linear_probe_trains_only_the_head(resnet50):
    model = linear_probe(resnet50, num_classes=4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert [g["name"] for g in model.param_groups(0.1)] == ["head"]
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())


def test_initial_state_is_kept_and_survives_training(resnet50):
    model = truncate(resnet50, "layer1", num_classes=2)
    assert set(model.initial_state) == set(model.state_dict())
    optimizer = torch.optim.SGD(model.param_groups(0.5), lr=0.5)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.initial_state["head.weight"], model.state_dict()["head.weight"])


def test_bad_strategy_input_is_named(resnet50):
    with pytest.raises(StrategyNotApplicableError, match="unknown strategy 'finetune'"):
        apply_strategy(resnet50, "finetune", 2)
    with pytest.raises(StrategyNotApplicableError, match="needs a cut point"):
        apply_strategy(resnet50, "truncate", 2)
    with pytest.raises(StrategyNotApplicableError, match="takes no cut point"):
        apply_strategy(resnet50, "full", 2, cut="layer3")
    with pytest.raises(UnknownCutPointError, match="no cut point 'layer9'.*layer1, layer2"):
        apply_strategy(resnet50, "truncate", 2, cut="layer9")
    with pytest.raises(StrategyNotApplicableError, match="last cut point"):
        transfusion(resnet50, "layer4", 2)


def _cases():
    for name in list_backbones():
        for dims in get_entry(name).spatial_dims:
            for strategy in STRATEGIES:
                yield pytest.param(name, dims, strategy, id=f"{name}-{dims}d-{strategy}")


@lru_cache(maxsize=1)
def _seeded_backbone(name: str, dims: int):
    """The backbone as built after ``torch.manual_seed(0)``, built once for the consecutive strategy cases of one
    backbone (building is up to half a case's time; one kept at a time, as a 3D model holds up to 60M parameters)."""
    torch.manual_seed(0)
    return build_backbone(name, dims)


@pytest.mark.slow
@pytest.mark.parametrize("name,dims,strategy", list(_cases()))
def test_every_strategy_builds_and_trains_on_every_backbone(name, dims, strategy):
    entry = get_entry(name)
    backbone = copy.deepcopy(_seeded_backbone(name, dims))  # a fresh copy: strategies may change it in place
    torch.manual_seed(0)
    blocks = backbone.cut_points_at("block")
    cut = blocks[len(blocks) // 2].name
    kwargs = {"cut": cut} if strategy in ("truncate", "transfusion", "partial", "lwft") else {}
    if strategy == "transfusion" and not entry.slimmable:
        with pytest.raises(StrategyNotApplicableError, match="does not apply"):
            apply_strategy(backbone, strategy, 3, **kwargs)
        return
    model = apply_strategy(backbone, strategy, 3, **kwargs).train()
    x = torch.randn(2, entry.in_channels, *entry.min_input[dims])
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.head.weight.grad is not None
    trainable = [p for g in model.param_groups(1e-3) for p in g["params"]]
    assert all(p.requires_grad for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    if strategy == "linear_probe":
        assert len(trainable) == 2
    if strategy in ("full", "random", "stats", "truncate", "transfusion", "partial"):
        assert not frozen


@pytest.mark.parametrize("cut", ["stem", "layer1", "layer2", "layer3"])
def test_transfusion_into_a_parameter_free_shortcut_stage(cut):
    """MedicalNet's shortcut 'A' has no weights to narrow: a slimmed stage keeps the leading channels."""
    backbone = build_backbone("resnet3d_18")
    model = transfusion(backbone, cut, num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2)
