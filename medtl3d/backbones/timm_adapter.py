"""Any timm 2D model as a backbone: ``create_backbone("timm/<timm model name>", in_channels=1, **timm_kwargs)``.

The backbone *is* the timm model (its class extended with the :class:`~medtl3d.backbones.Backbone` interface), so
its ``state_dict`` keys are timm's, timm-layout files load unchanged, and timm's own methods (``forward_features``,
``forward_intermediates``, ``prune_intermediate_layers``) still work on it. Units and cut points come from timm's
metadata and one shape-only pass of ``forward_features`` on the meta device:

- the modules ``forward_features`` calls, flattened through ``nn.Sequential`` containers down to timm's
  ``feature_info`` modules (and one level into those that are sequential stages), in call order; the pass checks
  that each one feeds the next (only ViT's position embedding sits between two of them), otherwise the model is
  refused;
- a **block** cut point at every ``feature_info`` entry, named after its module (``layer2``, ``stages.1``,
  ``features.denseblock2``); a feature tapped inside a module (Xception) cuts after the module that produced it;
- a **layer** cut point after every other parameterised module above the stem (the blocks of a stage, Inception's
  mixed blocks, DenseNet's transitions, the blocks of a ViT);
- isotropic models (ViT, DeiT, DINOv2: every feature at one reduction) have their blocks as layer cuts and block
  cuts ``depthN`` after every quarter of the depth, as :mod:`.transformers` does;
- modules that ``forward_features`` runs after the last feature (a final norm) join the last unit; those that
  change the width (EfficientNet's ``conv_head``) form a last unit with its own block cut. The full backbone
  computes ``forward_features``; whatever the model runs only in ``forward_head`` is the published head.

Weights: a local file in timm layout, or timm's pretrained tags by name: ``weights="d2_in1k"`` (or spelled out,
``weights="timm/convnext_atto.d2_in1k"``) is timm's ``convnext_atto.d2_in1k``, a weights catalogue entry fetched
through timm's hub mechanism.

Strategy support (tested in ``tests/test_timm_backbones.py``; block / layer cut points as built there):

==================  ============================  ===========  =====================================  ===========
family              model tested                  cuts b / l   strategies                             transfusion
==================  ============================  ===========  =====================================  ===========
ConvNeXt            convnext_atto                 4 / 0        random, full, linear_probe, truncate,  refused
ConvNeXt-V2         convnextv2_atto               4 / 0        partial, lwft, stats (every family)    refused
EfficientNet        efficientnet_b0               6 / 15       same                                   refused
RegNet              regnetx_002                   5 / 0        same                                   refused
ResNet-D            resnet18d                     5 / 8        same                                   refused
ViT                 vit_tiny_patch16_224          4 / 12       same                                   refused
DeiT                deit_tiny_patch16_224         4 / 12       same                                   refused
DINOv2 ViT          vit_small_patch14_dinov2      4 / 12       same                                   refused
Swin                swin_tiny_patch4_window7_224  4 / 0        same                                   refused
MaxViT              maxvit_nano_rw_256            5 / 0        same                                   refused
EfficientFormer-V2  efficientformerv2_s0          4 / 0        same                                   refused
MobileNetV3         mobilenetv3_small_050         5 / 12       same                                   refused
MobileNetV4         mobilenetv4_conv_small        5 / 17       same                                   refused
DenseNet            densenet121                   5 / 4        same                                   refused
Inception-v3        inception_v3                  5 / 9        same                                   refused
Xception            legacy_xception               5 / 13       same                                   refused
==================  ============================  ===========  =====================================  ===========

TransFusion is refused for every timm model: rebuilding the units above a cut narrower needs per-stage width
arguments that timm's models do not share (and the transformers' residual streams cannot narrow at all, see
:mod:`.transformers`); use the hand-written families for it. ``full(..., pretrained_head=True)`` needs a published
head that is one linear layer (ResNet, EfficientNet, RegNet, DenseNet, Inception, Xception, Swin, token-pooled
ViT/DeiT/DINOv2); heads with a norm or hidden layer (ConvNeXt, MaxViT, MobileNetV3/V4) or two classifiers
(EfficientFormer-V2) are refused by name. ``xception41`` taps its features inside strided blocks: its cuts sit
after those blocks, at twice timm's stated reduction.
"""

from __future__ import annotations

import difflib
from functools import lru_cache

import timm
import torch
from torch import nn

from ..errors import UnknownBackboneError
from ._base import Backbone, Unit
from ._registry import BackboneEntry

PREFIX = "timm/"


class TimmBackbone(Backbone):
    """Backbone interface put in front of a timm model's class (see :func:`build_timm_backbone`)."""

    layout: str  # "NCHW", "NHWC" or "tokens" (ViT family: prefix tokens, then the patch grid)
    steps_skipped: frozenset  # unit paths that are owned but not called in order (embedding tensors, pos_drop)
    class_token_head: bool

    def forward_unit(self, index: int, x: torch.Tensor) -> torch.Tensor:
        for path in self.units[index].modules:
            if path in self.steps_skipped:
                continue
            x = self._embed(x) if self.layout == "tokens" and path == "patch_embed" else self.get_submodule(path)(x)
        return x

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ViT embedding: patches, then class/register tokens and position embedding (``_pos_embed``)."""
        size = x.shape[-2:]
        x = self.patch_embed(x)
        self.token_grid = self.patch_embed.dynamic_feat_size(size) if self.dynamic_img_size else self.patch_embed.grid_size
        return self._pos_embed(x)

    def to_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NHWC":
            return x.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            height, width = self.token_grid
            return x[:, self.num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
        return x

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.class_token_head:
            return super().forward_pre_logits(x)
        for index in range(len(self.units)):
            x = self.forward_unit(index, x)
        return x[:, 0]


@lru_cache(maxsize=None)
def _backbone_class(model_class: type) -> type:
    return type(f"{model_class.__name__}Backbone", (TimmBackbone, model_class), {"__module__": __name__})


def _check_name(model_name: str) -> None:
    if model_name not in timm.list_models():
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        raise UnknownBackboneError(
            f"unknown timm model {model_name!r}; close matches: {', '.join(PREFIX + c for c in close) or 'none'}"
        )


def _elements(model: nn.Module) -> list[str]:
    """Module paths ``forward_features`` may call in order: ``nn.Sequential`` containers are opened along the way to
    a ``feature_info`` module, and a sequential feature module (a stage) and its sequential siblings one level more."""
    features = [f["module"] for f in model.feature_info]

    def plain(module: nn.Module) -> bool:
        return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward

    def opened(prefix: str, module: nn.Module) -> list[str]:
        stage_parent = any(f.rpartition(".")[0] == prefix and plain(model.get_submodule(f)) for f in features)
        paths = []
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            inside = any(f.startswith(path + ".") for f in features)
            if plain(child) and inside:
                paths += opened(path, child)
            elif plain(child) and stage_parent:
                paths += [f"{path}.{n}" for n, _ in child.named_children()]
            else:
                paths.append(path)
        return paths

    return opened("", model)


def _trace(model: nn.Module, in_channels: int, size: tuple[int, int]) -> tuple:
    """Run ``forward_features`` on a meta input; return the called elements in order, their (input, output), the
    output, each feature module's input (to place taps) and the input."""
    records: dict[str, tuple] = {}
    order: list[str] = []
    feature_inputs: dict[str, object] = {}
    hooks = []
    for path in _elements(model):
        def hook(module, args, output, path=path):
            if path in records:
                raise UnknownBackboneError(f"module {path!r} runs twice in forward_features")
            order.append(path)
            records[path] = (args[0] if args else None, output)
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    for f in model.feature_info:
        def tap(module, args, path=f["module"]):
            feature_inputs[path] = args[0] if args else None
        hooks.append(model.get_submodule(f["module"]).register_forward_pre_hook(tap))
    x = torch.empty(1, in_channels, *size, device="meta")
    try:
        with torch.no_grad():
            out = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return order, records, out, feature_inputs, x


def _input_size(model: nn.Module, kwargs: dict) -> tuple[int, int]:
    """The input size the model was built for: ``img_size`` if given, else the patch embedding's or timm's default."""
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        return (size, size) if isinstance(size, int) else tuple(size)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        return tuple(patch_embed.img_size)
    return tuple(model.pretrained_cfg["input_size"][1:])


@lru_cache(maxsize=64)
def _layout(model_name: str, in_channels: int, kwargs: tuple) -> dict:
    """Units of ``model_name`` built with ``kwargs``, from a shape-only pass on the meta device (cached)."""
    name = PREFIX + model_name
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, in_chans=in_channels, **dict(kwargs))
    embeds = hasattr(model, "_pos_embed") and hasattr(model, "patch_embed")
    size = _input_size(model, dict(kwargs))
    order, records, out, feature_inputs, x = _trace(model, in_channels, size)
    if not order:
        raise UnknownBackboneError(f"{name}: forward_features calls none of its modules; cannot cut it")

    # data flow: each called module must read what the one before it wrote
    previous = x
    for path in order:
        given, output = records[path]
        if given is not previous and not (embeds and path == "pos_drop"):
            raise UnknownBackboneError(
                f"{name}: forward_features is not a sequence of its modules ({path!r} does not read the output of "
                "the module before it), so it cannot be cut into units"
            )
        previous = output
    if out is not previous:
        raise UnknownBackboneError(f"{name}: forward_features returns more than its last module's output")

    # output layout, uniform over the units
    fmt = getattr(model, "output_fmt", "NCHW")
    layout = "tokens" if embeds else ("NHWC" if str(fmt).upper().endswith("NHWC") else "NCHW")

    def channels_and_size(path: str) -> tuple[int, tuple[int, int] | None]:
        output = records[path][1]
        if layout == "NCHW":
            return output.shape[1], tuple(output.shape[2:])
        if layout == "NHWC":
            return output.shape[-1], tuple(output.shape[1:3])
        return output.shape[-1], None

    # block cuts: where each feature_info entry ends in the called order
    block_at: dict[str, tuple[str, dict]] = {}
    for info in model.feature_info:
        module = info["module"]
        if module in records:
            end = module
        elif any(p.startswith(module + ".") for p in order):
            end = [p for p in order if p.startswith(module + ".")][-1]
        else:  # a tap inside a module: after the module whose output it reads, else after the module holding it
            given = feature_inputs.get(module)
            end = next((p for p in order if records[p][1] is given), None)
            if end is None:  # tapped inside a strided module: the cut after it has that module's reduction
                end = next(p for p in order if module.startswith(p + "."))
                info = {**info, "reduction": round(size[0] / records[end][1].shape[2])}
            module = end
        block_at[end] = (module, info)
    isotropic = len({f["reduction"] for f in model.feature_info}) == 1 and len(model.feature_info) > 4
    first = min(order.index(p) for p in block_at)
    last = max(order.index(p) for p in block_at)

    def has_parameters(path: str) -> bool:
        return any(True for _ in model.get_submodule(path).parameters())

    ends = [p for i, p in enumerate(order[: last + 1]) if p in block_at or (i > first and has_parameters(p))]
    if any(records[p][1].ndim != (3 if layout == "tokens" else 4) for p in ends):
        raise UnknownBackboneError(f"{name}: its stages do not all output {layout} maps, so they cannot be cut")
    units, start, reduction = [], 0, 1
    depth = len(ends)
    for index, end in enumerate(ends):
        stop = order.index(end) + 1
        paths = order[start:stop]
        start = stop
        channels, spatial = channels_and_size(end)
        if end in block_at:
            cut_reduction = block_at[end][1]["reduction"]
        else:  # a layer inside a stage: the reduction of the stage end with the same map size, else the ratio
            same = [block_at[b][1]["reduction"] for b in block_at if channels_and_size(b)[1] == spatial]
            cut_reduction = same[0] if same else (round(size[0] / spatial[0]) if spatial else reduction)
        if isotropic:
            block = f"depth{index + 1}" if (index + 1) % max(depth // 4, 1) == 0 else None
            layer = True
        else:
            block = block_at[end][0] if end in block_at else None
            layer = block != end and (index > 0 or end not in block_at)
        if cut_reduction % reduction:
            raise UnknownBackboneError(f"{name}: reduction {cut_reduction} after {end!r} is not a multiple of {reduction}")
        stride = cut_reduction // reduction
        units.append(dict(name=end, modules=paths, channels=int(channels), stride=(stride, stride), block=block,
                          layer=layer))
        reduction = cut_reduction

    trailing = order[last + 1:]
    if trailing:
        channels, _ = channels_and_size(trailing[-1])
        if channels == units[-1]["channels"]:
            units[-1]["modules"] = units[-1]["modules"] + trailing
        else:
            units.append(dict(name=trailing[0], modules=trailing, channels=int(channels), stride=(1, 1),
                              block=trailing[0], layer=False))
    direct = [n for n, _ in model.named_parameters(recurse=False)] + [n for n, _ in model.named_buffers(recurse=False)]
    units[0]["modules"] = direct + units[0]["modules"]
    kept = {p for u in units for p in u["modules"]}
    head = [p for p in _elements(model) if p not in kept and p not in direct]
    return {
        "units": units,
        "layout": layout,
        "skipped": frozenset(direct + (["pos_drop"] if embeds else [])),
        "head": tuple(head),
        "input_size": size,
        "min_input": max(f["reduction"] for f in model.feature_info),
    }


def build_timm_backbone(model_name: str, spatial_dims: int = 2, in_channels: int = 3, **timm_kwargs) -> TimmBackbone:
    """timm's ``model_name`` (random weights) as a backbone: its head removed, units from :func:`_layout`."""
    if spatial_dims != 2:
        raise UnknownBackboneError(f"{PREFIX}{model_name} is a 2D timm model, got spatial_dims={spatial_dims}")
    layout = _layout(model_name, in_channels, tuple(sorted(timm_kwargs.items())))
    model = timm.create_model(model_name, pretrained=False, in_chans=in_channels, **timm_kwargs)
    class_token_head = getattr(model, "global_pool", None) == "token" and getattr(model, "num_prefix_tokens", 0) > 0
    for path in layout["head"]:
        parent, _, child = path.rpartition(".")
        del (model.get_submodule(parent) if parent else model)._modules[child]
    model.__class__ = _backbone_class(type(model))
    model.spatial_dims, model.in_channels = 2, in_channels
    model.layout, model.steps_skipped, model.class_token_head = layout["layout"], layout["skipped"], class_token_head
    model._set_units([Unit(u["name"], tuple(u["modules"]), u["channels"], u["stride"], u["block"], u["layer"])
                      for u in layout["units"]])
    model._remove_empty_containers()
    return model


@lru_cache(maxsize=256)
def timm_entry(name: str) -> BackboneEntry:
    """Registry entry of ``timm/<model name>``: what ``get_entry`` answers for the ``timm/`` prefix."""
    model_name = name[len(PREFIX):]
    _check_name(model_name)
    layout = _layout(model_name, 3, ())
    return BackboneEntry(
        name=name,
        builder=lambda spatial_dims, in_channels, **kwargs: build_timm_backbone(
            model_name, spatial_dims, in_channels, **kwargs),
        spatial_dims=(2,),
        default_input={2: layout["input_size"]},
        min_input={2: (layout["min_input"],) * 2},
        family="timm",
        description=f"timm {model_name}",
        slimmable=False,
        head_keys=layout["head"],
    )


__all__ = ["PREFIX", "TimmBackbone", "build_timm_backbone", "timm_entry"]
