"""Grad-CAM and Grad-CAM++ at any cut point of a 2D or 3D model, overlays (PNG, NIfTI) and CAM mass in a mask.

Built on MONAI's N-d ``monai.visualize.GradCAM`` / ``GradCAMpp``, with these guards around it:

- Where the map sits on the image. MONAI upsamples the cut's low-resolution map with ``F.interpolate(...,
  align_corners=False)``, which spreads the cells evenly over the image: cell ``i`` of a stride-``s`` map lands on
  pixel ``s i + (s - 1) / 2``. A cell's evidence comes from its receptive field, centred on ``s i`` in ``same``-padded
  CNNs (ResNet, MobileNet, CBR) and elsewhere in others (DenseNet's average-pool transitions), so MONAI's map is
  shifted by up to half a cell (3.5 px at stride 8). Here :func:`cell_centres` measures each cell's receptive-field
  centre (where its gradient reaches the input) and :func:`aligned_upsampler` interpolates linearly between those
  centres. On CXR phantoms this raises the Grad-CAM mass within one cell of the planted opacity from 0.48 to 0.54
  (``scripts/bench_attribution.py``).
- Resolution. A CAM cannot be finer than its cut's stride, and each cell's evidence spreads over about the effective
  receptive field: ``cut`` picks the layer to explain by cut-point name (default: the last), and a shallower cut
  gives a finer map (on 16 x 48 x 48 CTPA phantoms one ``cbr3`` cell spans a quarter of the volume; the emboli are
  found at ``cbr2``, stride 4).
- MONAI hooks a module by name, but a cut point's feature map is a unit's output, which in some families no single
  submodule returns (DenseNet concatenates); :func:`cam_target` gives a copy whose backbone routes that output
  through an ``nn.Identity`` tap and returns the tap's name.
- MONAI registers its hooks permanently and flips ``inplace`` flags on the model it is given; here it works on that
  deep copy, where every in-place activation is switched off (in-place ops after a hooked module break
  ``register_full_backward_hook``) and every parameter requires grad (frozen units would otherwise not be reached).
- MONAI's default post-processing maps (min, max) to (1, 0), i.e. it *inverts* the map; here each map is divided by
  its maximum instead, so zero stays zero and CAM mass ratios are preserved.
- With ``class_idx=None`` MONAI takes each sample's argmax but then sums ``logits[:, argmaxes]`` over the batch,
  mixing classes when samples disagree; here samples are grouped by their target class. MONAI's ``GradCAMpp``
  multiplies the gradients by ``exp(score)`` with ``score`` shaped ``(B,)``, which broadcasts along the last spatial
  axis (wrong maps, or a shape error, for B > 1); Grad-CAM++ therefore runs one sample at a time.

- MONAI's ``GradCAMpp`` sums ``A_ab g_ab^3`` over the map in the alpha denominator, where Chattopadhyay et al. (2018,
  eq. 19) have ``g_ij^3 sum_ab A_ab``; the two agree only at the top of the model (constant gradient over the map).
  Here Grad-CAM++ uses the paper's denominator (tested against a hand computation below the top).

Token models (ViT, Swin) are refused: their units output tokens, not channels-first maps.
"""

from __future__ import annotations

import copy
import gzip
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM, GradCAMpp, blend_images
from torch import nn

from ..backbones import Backbone, get_entry, list_backbones
from ..errors import AnalysisError
from ..reporting import atomic_write, save_figure
from ._registry import register_analysis
from .weights import split_model


TAP = "cam_tap"
_CENTRES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def cam_target(model: nn.Module, cut: str | None = None) -> tuple[nn.Module, str]:
    """A CAM-ready copy of ``model`` and the layer name MONAI's CAM classes need for cut point ``cut`` (default:
    the backbone's last cut point).

    The copy's backbone passes the output of the cut's unit through an ``nn.Identity`` named ``cam_tap``, so the
    hooked tensor is exactly the cut point's feature map in every family (a DenseNet unit's output is a
    concatenation no single submodule returns). In-place activations are switched off and every parameter requires
    grad; the original model is left untouched.
    """
    backbone, prefix = split_model(model)
    if not prefix:
        raise AnalysisError("Grad-CAM needs a classifier (a TransferModel), not a bare backbone")
    if type(backbone).to_feature_map is not Backbone.to_feature_map:
        raise AnalysisError(
            f"Grad-CAM needs convolutional feature maps; {backbone.name} is a token model whose units output tokens"
        )
    unit = (backbone.cut_point(cut) if cut is not None else backbone.cut_points[-1]).unit
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    for parameter in twin.parameters():
        parameter.requires_grad_(True)
    body, _ = split_model(twin)
    body.add_module(TAP, nn.Identity())
    run_unit = body.forward_unit

    def forward_unit(index: int, x: torch.Tensor) -> torch.Tensor:
        x = run_unit(index, x)
        return getattr(body, TAP)(x) if index == unit else x

    body.forward_unit = forward_unit
    return twin, prefix + TAP


def _scale_to_max(maps: torch.Tensor) -> torch.Tensor:
    """Divide each map by its maximum (all-zero maps stay zero)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)
    return maps / peak.view(-1, *([1] * (maps.ndim - 1)))


def _as_batch(model: nn.Module, image) -> tuple[torch.Tensor, bool]:
    backbone, _ = split_model(model)
    x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    dims = backbone.spatial_dims
    if x.ndim not in (dims + 1, dims + 2):
        raise AnalysisError(
            f"image must be (C, *spatial) or (B, C, *spatial) for a {dims}D model, got shape {tuple(x.shape)}"
        )
    batched = x.ndim == dims + 2
    x = x if batched else x.unsqueeze(0)
    if x.shape[1] != backbone.in_channels:
        raise AnalysisError(f"image has {x.shape[1]} channels, the model expects {backbone.in_channels}")
    return x.float(), batched


def _field_borders(backbone, cut: str, shape: tuple[int, ...], axis: int) -> tuple[int, int, int] | None:
    """Along ``axis`` of an input of ``shape``: the last input index the first cell's receptive field reaches, the
    first index the last cell's reaches, and the number of cells (the other axes at their middle cell); None when
    no gradient reaches the input."""
    parameter = next(backbone.parameters())
    # two random inputs per cell: a max-pool passes gradient to one input of each window, and a second input
    # makes a missed receptive-field border very unlikely
    probe = torch.randn((4, backbone.in_channels, *shape), generator=torch.Generator().manual_seed(0))
    probe = probe.to(parameter.device, parameter.dtype).requires_grad_(True)
    with torch.enable_grad():
        features = backbone(probe, cut=cut)
        cells = features.shape[2:]
        picked = []
        for sample in range(4):
            index = [n // 2 for n in cells]
            index[axis] = cells[axis] - 1 if sample >= 2 else 0
            picked.append(features[(sample, slice(None), *index)].sum())
        (gradient,) = torch.autograd.grad(torch.stack(picked).sum(), probe)
    others = tuple(a for a in range(1, len(shape) + 1) if a != axis + 1)
    reach = gradient.detach().abs().sum(dim=1).amax(dim=others) > 0  # (4, shape[axis])
    first, last = (reach[0] | reach[1]).nonzero(), (reach[2] | reach[3]).nonzero()
    if not len(first) or not len(last):
        return None
    return int(first.max()), int(last.min()), cells[axis]


def cell_centres(model: nn.Module, shape, cut: str | None = None,
                 max_growth: int = 8) -> list[tuple[float, float] | None]:
    """Where the cells of cut point ``cut``'s feature map sit on an input of spatial ``shape``: per axis
    ``(offset, stride)`` with cell ``i`` centred on input index ``offset + stride * i``; None along an axis where the
    receptive field is wider than ``max_growth`` times the image (its centre is then not measured).

    A cell's receptive field is where the gradient of its channel sum reaches the input (exactly zero outside); its
    centre is the midpoint of its borders. Along each axis the right border of the first cell and the left border
    of the last are read on random inputs, so any family's padding and pooling is covered (``same``-padded odd
    kernels: offset 0; DenseNet's 2x2 average-pool transitions: half the incoming stride each). Where a border
    touches the image's edge the probe is lengthened along that axis (doubled, up to ``max_growth`` times), the
    other axes shrunk to the backbone's minimum input: the offset depends on neither. The stride is the cut point's
    declared reduction. Results are cached per model, cut and shape.
    """
    backbone, _ = split_model(model)
    point = backbone.cut_point(cut) if cut is not None else backbone.cut_points[-1]
    shape = tuple(int(s) for s in shape)
    cache = _CENTRES.setdefault(model, {})
    if (point.name, shape, max_growth) in cache:
        return cache[point.name, shape, max_growth]
    known = backbone.name in list_backbones()
    smallest = get_entry(backbone.name).min_input.get(len(shape), shape) if known else shape
    training = backbone.training
    backbone.eval()
    try:
        centres = []
        for axis, length in enumerate(shape):
            centre, probed = None, length
            while probed <= max_growth * length:
                probe = tuple(probed if a == axis else min(n, m) for a, (n, m) in enumerate(zip(shape, smallest)))
                borders = _field_borders(backbone, point.name, probe, axis)
                if borders is None:
                    break
                right, left, cells = borders
                if right < probed - 1 and left > 0:
                    stride = point.reduction[axis]
                    centre = ((right + left - stride * (cells - 1)) / 2, float(stride))
                    break
                probed *= 2
            centres.append(centre)
    finally:
        backbone.train(training)
    cache[point.name, shape, max_growth] = centres
    return centres


def _interpolation(positions: torch.Tensor, cells: int) -> torch.Tensor:
    """``(len(positions), cells)`` linear-interpolation weights at fractional cell ``positions`` (clamped to the
    first and last cell, as MONAI's upsampling does)."""
    positions = positions.clamp(0, cells - 1)
    low = positions.floor().long().clamp(max=cells - 1)
    high = (low + 1).clamp(max=cells - 1)
    fraction = positions - low
    weights = torch.zeros(len(positions), cells, dtype=positions.dtype)
    rows = torch.arange(len(positions))
    weights[rows, low] += 1 - fraction
    weights[rows, high] += fraction
    return weights


def aligned_upsampler(centres):
    """A MONAI CAM ``upsampler`` that puts each cell of the map at its receptive-field centre (``centres`` from
    :func:`cell_centres`) and interpolates linearly in between; along axes without a measured centre the cells are
    spread evenly over the image (MONAI's ``F.interpolate(..., align_corners=False)``)."""

    def factory(size):
        def upsample(maps: torch.Tensor) -> torch.Tensor:
            for axis, (length, centre) in enumerate(zip(size, centres)):
                cells = maps.shape[2 + axis]
                pixels = torch.arange(int(length), dtype=torch.float64)
                if centre is None:
                    positions = (pixels + 0.5) * cells / int(length) - 0.5
                else:
                    positions = (pixels - centre[0]) / centre[1]
                weights = _interpolation(positions, cells).to(maps.device, maps.dtype)
                maps = torch.movedim(torch.movedim(maps, 2 + axis, -1) @ weights.T, -1, 2 + axis)
            return maps

        return upsample

    return factory


def _paper_grad_cam_pp():
    """MONAI's ``GradCAMpp`` with the denominator of Chattopadhyay et al. 2018 (eq. 19): for ``Y = exp(S)``,
    ``alpha_ij = g_ij^2 / (2 g_ij^2 + g_ij^3 sum_ab A_ab)``. MONAI sums ``A_ab g_ab^3`` over the map instead, which
    is the same only where the gradient is constant over the map (a CAM at the top, just before global pooling)."""
    class PaperGradCAMpp(GradCAMpp):
        def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):
            _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
            acti, grad = acti[layer_idx], grad[layer_idx]
            b, c, *spatial = grad.shape
            ones = [1] * len(spatial)
            numerator = grad.pow(2)
            denominator = numerator.mul(2) + grad.pow(3) * acti.view(b, c, -1).sum(-1).view(b, c, *ones)
            alpha = numerator / torch.where(denominator != 0.0, denominator, torch.ones_like(denominator))
            score = self.nn_module.score.detach().view(b, 1, *ones)
            weights = (alpha * F.relu(score.exp() * grad)).view(b, c, -1).sum(-1).view(b, c, *ones)
            return F.relu((weights * acti).sum(1, keepdim=True))

    return PaperGradCAMpp


def _cam(method: str, model: nn.Module, image, cut: str | None, class_idx: int | None) -> torch.Tensor:
    x, batched = _as_batch(model, image)
    twin, layer = cam_target(model, cut)
    twin.eval()
    x = x.to(next(twin.parameters()).device)
    upsampler = aligned_upsampler(cell_centres(model, x.shape[2:], cut))
    factory = _paper_grad_cam_pp() if method == "gradcampp" else GradCAM
    cam = factory(nn_module=twin, target_layers=layer, upsampler=upsampler, postprocessing=_scale_to_max)
    if class_idx is not None:
        targets = torch.full((x.shape[0],), int(class_idx))
    else:
        with torch.no_grad():
            logits = twin(x)
        targets = logits.argmax(dim=1).cpu() if logits.shape[1] > 1 else torch.zeros(x.shape[0], dtype=torch.long)
    maps = torch.empty((x.shape[0], *x.shape[2:]), dtype=torch.float32)
    # GradCAMpp multiplies the gradients by exp(score) with score shaped (B,), which broadcasts along the last
    # spatial axis when B > 1: it runs one sample at a time. GradCAM runs one batch per target class.
    if method == "gradcampp":
        runs = [torch.tensor([i]) for i in range(x.shape[0])]
    else:
        runs = [(targets == t).nonzero().flatten() for t in targets.unique().tolist()]
    for chosen in runs:
        result = cam(x[chosen], class_idx=int(targets[chosen[0]]))
        maps[chosen] = result[:, 0].detach().float().cpu()
    return maps if batched else maps[0]


@register_analysis("attribution", "gradcam")
def grad_cam(model: nn.Module, image, cut: str | None = None, class_idx: int | None = None) -> torch.Tensor:
    """Grad-CAM at cut point ``cut`` (default: the last), upsampled to the image, each map scaled to max 1.

    ``image`` is ``(C, *spatial)`` (returns ``(*spatial)``) or a batch ``(B, C, *spatial)`` (returns
    ``(B, *spatial)``). ``class_idx`` None explains each sample's predicted class (the single logit of a binary
    model).
    """
    return _cam("gradcam", model, image, cut, class_idx)


@register_analysis("attribution", "gradcampp")
def grad_cam_pp(model: nn.Module, image, cut: str | None = None, class_idx: int | None = None) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018); arguments and result as :func:`grad_cam`."""
    return _cam("gradcampp", model, image, cut, class_idx)


def cam_mass_inside(cam, mask) -> float:
    """Share of the CAM's total mass inside ``mask`` (nonzero voxels); NaN when the map is all zero.

    ``cam`` and ``mask`` have the same spatial shape (a leading channel axis of size 1 is ignored).
    """
    values = np.asarray(cam.detach().cpu() if isinstance(cam, torch.Tensor) else cam, dtype=np.float64)
    inside = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask) != 0
    values = values[0] if values.ndim == inside.ndim + 1 and values.shape[0] == 1 else values
    inside = inside[0] if inside.ndim == values.ndim + 1 and inside.shape[0] == 1 else inside
    if values.shape != inside.shape:
        raise AnalysisError(f"CAM shape {values.shape} and mask shape {inside.shape} differ")
    if (values < 0).any() or not np.isfinite(values).all():
        raise AnalysisError("CAM values must be finite and non-negative")
    total = values.sum()
    return float(values[inside].sum() / total) if total > 0 else float("nan")


def _numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = array.as_tensor() if hasattr(array, "as_tensor") else array
    return np.asarray(array, dtype=np.float32)


def blend_cam(image, cam, alpha: float = 0.6, cmap: str = "jet") -> np.ndarray:
    """RGB ``(3, *spatial)`` overlay of ``cam`` on ``image`` (``(C, *spatial)``, C = 1 or 3; other channel counts
    show their mean) with MONAI's ``blend_images``; the CAM's opacity grows with its value."""
    picture, heat = _numpy(image), _numpy(cam)
    if picture.ndim == heat.ndim:
        picture = picture[None]
    if picture.shape[0] not in (1, 3):
        picture = picture.mean(axis=0, keepdims=True)
    if picture.shape[1:] != heat.shape:
        raise AnalysisError(f"image spatial shape {picture.shape[1:]} and CAM shape {heat.shape} differ")
    heat = heat / heat.max() if heat.max() > 0 else heat
    return np.clip(blend_images(picture, heat[None], alpha=alpha * heat[None], cmap=cmap), 0.0, 1.0)


def save_cam_png(path: str | Path, image, cam, title: str = "", slices: int = 6, axis: int = 0,
                 alpha: float = 0.6) -> Path:
    """PNG of the overlay: the image itself for 2D; for 3D a montage of the ``slices`` slices (along spatial
    ``axis``, the depth axis by default) holding the most CAM mass, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = blend_cam(image, cam, alpha)
    heat = _numpy(cam)
    if heat.ndim == 2:
        panels = [("", rgb)]
    elif heat.ndim == 3:
        mass = heat.sum(axis=tuple(i for i in range(3) if i != axis))
        chosen = sorted(np.argsort(mass)[::-1][: max(1, min(slices, heat.shape[axis]))].tolist())
        panels = [(f"slice {i}", np.take(rgb, i, axis=axis + 1)) for i in chosen]
    else:
        raise AnalysisError(f"CAM must be 2D or 3D, got shape {heat.shape}")
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, picture) in zip(axes.flat, panels):
        ax.imshow(np.moveaxis(picture, 0, -1), interpolation="nearest")
        ax.set_title(label, fontsize="small")
    if title:
        figure.suptitle(title, fontsize="small")
    figure.tight_layout()
    return save_figure(figure, path)


def save_cam_nifti(path: str | Path, cam, affine=None) -> Path:
    """NIfTI (``.nii`` or ``.nii.gz``) of a 3D CAM with the image's affine (a MetaTensor image's ``.affine``
    works as is; identity when None), so it overlays the input in any viewer."""
    heat = _numpy(cam)
    if heat.ndim != 3:
        raise AnalysisError(f"NIfTI output needs a 3D CAM, got shape {heat.shape}")
    matrix = np.eye(4) if affine is None else np.asarray(_numpy(affine), dtype=np.float64)
    if matrix.shape != (4, 4):
        raise AnalysisError(f"affine must be 4x4, got shape {matrix.shape}")
    data = nib.Nifti1Image(heat, matrix).to_bytes()
    path = Path(path)
    data = gzip.compress(data) if path.name.endswith(".gz") else data
    return atomic_write(path, lambda temp: temp.write_bytes(data))
