"""Invariants every registered backbone must satisfy, 2D and 3D: the cut-point abstraction is honest."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from medtl3d.backbones import build_backbone, get_entry, list_backbones

REQUIRED = {
    "resnet18", "resnet34", "resnet50", "densenet121", "mobilenet_v2", "inception_v3", "deit_small", "swin_tiny",
    "cbr_larget", "cbr_largew", "cbr_small", "cbr_tiny",
    "resnext3d_101", "resnet3d_18", "resnet3d_50", "penet", "i3d", "densenet121_3d",
}

# 3D builds take most of this module's time: they belong to the slow tier (pytest -m slow)
CASES = [pytest.param(name, dims, marks=[pytest.mark.slow] if dims == 3 else [])
         for name in list_backbones() for dims in get_entry(name).spatial_dims]


def test_required_backbones_registered():
    missing = REQUIRED - set(list_backbones())
    assert not missing, f"backbones not registered: {sorted(missing)}"


def _input(name: str, dims: int, batch: int = 2) -> torch.Tensor:
    entry = get_entry(name)
    return torch.randn(batch, entry.in_channels, *entry.min_input[dims])


@pytest.mark.parametrize("name,dims", CASES)
def test_units_own_every_tensor_exactly_once(name, dims):
    backbone = build_backbone(name, dims)
    owners: dict[str, list[int]] = {}
    for index in range(len(backbone.units)):
        for key in backbone.unit_state_keys(index):
            owners.setdefault(key, []).append(index)
    state = backbone.state_dict()
    assert set(owners) == set(state), f"keys without unit: {sorted(set(state) - set(owners))[:5]}"
    shared = {k: v for k, v in owners.items() if len(v) > 1}
    assert not shared, f"keys owned by several units: {list(shared)[:5]}"


@pytest.mark.parametrize("name,dims", CASES)
def test_cut_points_match_declared_channels_and_reduction(name, dims):
    backbone = build_backbone(name, dims).eval()
    levels = {c.level for c in backbone.cut_points}
    assert levels == {"block", "layer"}
    cuts = backbone.cut_points
    x = _input(name, dims)
    with torch.no_grad():
        features = backbone.forward_cuts(x, [c.name for c in cuts])
        final = backbone(x)
    # growing the input by `step` voxels grows each cut's map by exactly step / reduction, whatever the padding
    step = [2 * r for r in backbone.reduction]
    shapes_only = copy.deepcopy(backbone).to("meta")  # shapes without arithmetic
    grown = shapes_only.forward_cuts(
        torch.empty(2, x.shape[1], *[e + s for e, s in zip(x.shape[2:], step)], device="meta"), [c.name for c in cuts]
    )
    for cut in cuts:
        f = features[cut.name]
        assert f.shape[0] == 2 and f.shape[1] == cut.channels, (cut, tuple(f.shape))
        assert f.ndim == 2 + dims
        growth = [b - a for a, b in zip(f.shape[2:], grown[cut.name].shape[2:])]
        assert growth == [s // r for s, r in zip(step, cut.reduction)], (cut.name, growth, cut.reduction)
    assert torch.equal(final, features[cuts[-1].name])
    assert final.shape[1] == backbone.num_features


@pytest.mark.parametrize("name,dims", CASES)
def test_truncate_drops_everything_above_the_cut(name, dims):
    backbone = build_backbone(name, dims).eval()
    blocks = backbone.cut_points_at("block")
    cut = blocks[len(blocks) // 2]
    kept_keys = {k for i in range(cut.unit + 1) for k in backbone.unit_state_keys(i)}
    x = _input(name, dims)
    with torch.no_grad():
        expected = backbone(x, cut=cut.name)
    backbone.truncate_(cut.name)
    assert set(backbone.state_dict()) == kept_keys
    assert backbone.cut_points[-1].name == cut.name
    with torch.no_grad():
        assert torch.equal(backbone(x), expected)


@pytest.mark.parametrize("name,dims", [c for c in CASES if get_entry(c.values[0]).slimmable])
def test_slim_build_halves_widths_above_the_cut(name, dims):
    full = build_backbone(name, dims)
    blocks = full.cut_points_at("block")
    cut = blocks[len(blocks) // 2]
    slim = build_backbone(name, dims, slim_from=cut.unit + 1, width_factor=2.0)
    assert [u.name for u in slim.units] == [u.name for u in full.units]
    for index, (a, b) in enumerate(zip(full.units, slim.units)):
        if index <= cut.unit:
            assert a.channels == b.channels
            sa, sb = full.state_dict(), slim.state_dict()
            for key in full.unit_state_keys(index):
                assert sa[key].shape == sb[key].shape, key
        else:  # narrower; dense blocks keep concatenating the full-width input, so only the end is exactly half
            assert b.channels < a.channels, (a, b)
    assert math.isclose(slim.num_features, full.num_features / 2, abs_tol=full.num_features * 0.1 + 1)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in full.parameters())
    out = slim(_input(name, dims))
    assert out.shape[1] == slim.num_features
