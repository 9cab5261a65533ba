"""PENet and I3D: published checkpoint layouts load, and the I3D port reproduces DeepMind's Kinetics-400 logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtl3d.backbones import build_backbone, create_backbone
from medtl3d.backbones.i3d import MaxPool3dSame, ShiftOnlyBatchNorm3d, tf_same_padding
from medtl3d.backbones.penet import PENetBottleneck
from medtl3d.errors import WeightsError
from medtl3d.weights import read_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
LAYOUTS = SHARED / "fixtures" / "checkpoint_layouts" / "published_3d_layouts.json"
I3D_WEIGHTS = SHARED / "weights" / "i3d_kinetics400_params.npz"
I3D_REFERENCE = SHARED / "fixtures" / "i3d_kinetics400_reference_logits.npz"

needs_layouts = pytest.mark.skipif(not LAYOUTS.is_file(), reason=f"published layouts not available ({LAYOUTS})")
needs_i3d = pytest.mark.skipif(
    not (I3D_WEIGHTS.is_file() and I3D_REFERENCE.is_file()),
    reason=f"DeepMind I3D weights / reference logits not available under {SHARED}",
)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layout(name: str) -> dict[str, list[int]]:
    return json.loads(LAYOUTS.read_text())[name]["keys"]


def _random_state(layout: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) for key, shape in layout.items()}


# ----------------------------------------------------------------------------------------------------------- PENet
@pytest.mark.parametrize("num_classes,expected", [(600, 29_626_056), (1, 28_398_705)])
def test_penet_parameter_count_matches_published_classifier(num_classes, expected):
    backbone = build_backbone("penet")
    assert backbone.num_features == 2048
    assert _params(backbone) + _params(nn.Linear(backbone.num_features, num_classes)) == expected


def test_penet_structure_follows_the_paper():
    backbone = build_backbone("penet")
    stem = backbone.in_conv[0]
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7, 7), (1, 2, 2), (3, 3, 3))
    for norm in (m for m in backbone.modules() if isinstance(m, nn.GroupNorm)):
        assert norm.num_channels == 16 * norm.num_groups
    blocks = [m for m in backbone.modules() if isinstance(m, PENetBottleneck)]
    assert len(blocks) == 16
    assert all(b.conv2.groups == 32 for b in blocks)
    assert [b.conv2.stride[0] for b in blocks] == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
    assert [round(b.survival_prob, 4) for b in blocks[:2]] == [1.0, round(1 - 0.5 / 16, 4)]
    assert blocks[-1].se_block.excite[0].out_features == 2048 // 16
    assert [c.name for c in backbone.cut_points_at("block")] == ["stem"] + [f"encoders.{i}" for i in range(4)]


def test_penet_stochastic_depth_skips_the_residual_branch_only_while_training():
    block = PENetBottleneck(32, 32, 64, 2, cardinality=32, survival_prob=0.0)
    x = torch.randn(1, 32, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(block.train()(x), block.down_sample(x))
        assert not torch.equal(block.eval()(x), block.down_sample(x))


def test_penet_slim_build_keeps_group_and_cardinality_constraints():
    backbone = build_backbone("penet", slim_from=5, width_factor=3.0, final_survival_prob=1.0)
    for norm in (m for m in backbone.modules() if isinstance(m, nn.GroupNorm)):
        assert norm.num_channels == 16 * norm.num_groups
    out = backbone(torch.randn(1, 3, 16, 32, 32))
    assert out.shape == (1, backbone.num_features, 1, 1, 1)
    assert backbone.num_features < 2048


@needs_layouts
@pytest.mark.parametrize("legacy_names", [False, True], ids=["penet_blocks", "xnet_blocks"])
def test_penet_loads_published_checkpoint_layout(tmp_path, legacy_names):
    state = _random_state(_layout("penet_classifier_kinetics600"))
    saved = {k.replace(".penet_blocks.", ".xnet_blocks.") if legacy_names else k: v for k, v in state.items()}
    path = tmp_path / "penet_kinetics600.pth.tar"
    torch.save({"epoch": 1, "model_state": {"module." + k: v for k, v in saved.items()}}, path)

    backbone = create_backbone("penet", weights=path)
    assert set(backbone.pretrained_head) == {"classifier.fc.weight", "classifier.fc.bias"}
    assert torch.equal(backbone.pretrained_head["classifier.fc.weight"], state["classifier.fc.weight"])
    loaded = backbone.state_dict()
    assert set(loaded) == set(state) - set(backbone.pretrained_head)
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


@needs_layouts
def test_penet_one_channel_ct_sums_the_rgb_stem_kernels(tmp_path):
    state = _random_state(_layout("penet_classifier_1cls"))
    path = tmp_path / "penet_pe.pth"
    torch.save({"model_state": {"module." + k: v for k, v in state.items()}}, path)
    backbone = create_backbone("penet", in_channels=1, weights=path)
    assert backbone.weights_report.adapted == ["in_conv.0.weight"]
    assert torch.allclose(backbone.in_conv[0].weight, state["in_conv.0.weight"].sum(1, keepdim=True))
    assert backbone.pretrained_head["classifier.fc.weight"].shape == (1, 2048)


@needs_layouts
def test_penet_refuses_another_architecture_listing_the_keys(tmp_path):
    state = _random_state(_layout("resnext3d_101_kinetics400"))  # keys already carry Hara's "module." prefix
    path = tmp_path / "resnext3d_101.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsError) as error:
        create_backbone("penet", weights=path)
    message = str(error.value)
    assert "missing in the file (223):" in message and "\n    encoders.0.penet_blocks.0.conv1.weight" in message
    assert "unexpected in the file" in message and "\n    conv1.weight" in message


# ----------------------------------------------------------------------------------------------------------- I3D
def test_tf_same_padding_is_asymmetric_like_tensorflow():
    # 224 -> 112 with a 7-wide, stride-2 window needs 5 voxels: 2 before, 3 after (F.pad order: last axis first)
    assert tf_same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [2, 3, 2, 3, 2, 3]
    assert tf_same_padding((8, 28, 28), (3, 3, 3), (2, 2, 2)) == [0, 1, 0, 1, 0, 1]
    assert tf_same_padding((4, 7, 7), (3, 3, 3), (1, 1, 1)) == [1, 1, 1, 1, 1, 1]


def test_i3d_max_pool_never_picks_padding():
    x = -1.0 - torch.rand(1, 2, 3, 5, 5)
    pooled = MaxPool3dSame((3, 3, 3), (2, 2, 2))(x)
    assert pooled.shape == (1, 2, 2, 3, 3)
    assert (pooled < 0).all()
    assert pooled[0, 0, 0, 0, 0] == x[0, 0, :2, :2, :2].max()


def test_i3d_batch_norm_learns_a_shift_only_and_resets_it():
    norm = ShiftOnlyBatchNorm3d(4).eval()
    assert set(norm.state_dict()) == {"bias", "running_mean", "running_var", "num_batches_tracked"}
    with torch.no_grad():
        norm.bias.fill_(0.5)
        norm.running_var.fill_(3.0)
    x = torch.randn(2, 4, 1, 2, 2)
    assert torch.allclose(norm(x), x / (3.0 + 1e-3) ** 0.5 + 0.5, atol=1e-6)
    norm.reset_parameters()
    assert not norm.bias.any() and (norm.running_var == 1).all()


@pytest.fixture(scope="module")
def i3d_kinetics():
    torch.manual_seed(0)
    return create_backbone("i3d", weights=I3D_WEIGHTS).eval()


@needs_i3d
def test_i3d_npz_loads_strictly_with_every_array_used(i3d_kinetics):
    raw = read_checkpoint(I3D_WEIGHTS)
    assert len(raw) == 230
    converted = i3d_kinetics.convert_state_dict(raw)
    assert not [k for k in converted if "/" in k], "npz arrays left unconverted"
    head = {k for k in converted if k.startswith("logits.")}
    assert head == set(i3d_kinetics.pretrained_head) == {"logits.weight", "logits.bias"}
    assert i3d_kinetics.pretrained_head["logits.weight"].shape == (400, 1024)
    learned = {k for k in i3d_kinetics.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(converted) - head == learned  # the loader supplies the absent BatchNorm counters
    batch_norms = [m for m in i3d_kinetics.modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(batch_norms) == 57 and all(m.weight is None and m.eps == 1e-3 for m in batch_norms)
    kernel = raw["params/Mixed_4c/Branch_1/Conv3d_0b_3x3/Conv_0/kernel"]
    assert torch.equal(i3d_kinetics.Mixed_4c.Branch_1.Conv3d_0b_3x3.conv.weight, kernel.permute(4, 3, 0, 1, 2))


@needs_i3d
def test_i3d_reproduces_deepmind_kinetics400_logits(i3d_kinetics):
    reference = np.load(I3D_REFERENCE, allow_pickle=False)
    assert "uniform(-1, 1, size=(1,3,16,224,224))" in str(reference["input_spec"])
    clip = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 16, 224, 224)).astype(np.float32)
    expected = torch.from_numpy(reference["logits"])
    head = i3d_kinetics.pretrained_head
    with torch.no_grad():
        features = i3d_kinetics(torch.from_numpy(clip))
        assert features.shape == (1, 1024, 2, 7, 7)
        # medtl3d's head: global average pool + linear
        logits = F.linear(features.mean(dim=(2, 3, 4)), head["logits.weight"], head["logits.bias"])
        # I3D's own head: 2x7x7 average pool (stride 1), 1x1x1 convolution, mean over time
        pooled = F.avg_pool3d(features, (2, 7, 7), stride=1)
        i3d_logits = F.conv3d(pooled, head["logits.weight"][..., None, None, None], head["logits.bias"])
        i3d_logits = i3d_logits.flatten(3).mean(dim=(2, 3))
    max_diff = (logits - expected).abs().max().item()
    print(f"I3D max |logit - reference| = {max_diff:.2e}")
    assert max_diff < 1e-3
    assert torch.allclose(i3d_logits, logits, atol=1e-5)
    assert logits.argmax().item() == expected.argmax().item()


@needs_i3d
def test_i3d_one_channel_input_matches_grey_rgb(i3d_kinetics):
    grey_model = create_backbone("i3d", in_channels=1, weights=I3D_WEIGHTS).eval()
    assert grey_model.weights_report.adapted == ["Conv3d_1a_7x7.conv.weight"]
    grey = torch.rand(1, 1, 8, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = i3d_kinetics(grey.expand(-1, 3, -1, -1, -1))
        assert torch.allclose(grey_model(grey), expected, atol=1e-4)
