"""Grad-CAM / Grad-CAM++ (MONAI) at cut points, 2D and 3D: on constructed models whose answer is known exactly (the
map peaks where the score's evidence is, is exactly zero where no evidence or gradient reaches, and equals the map
computed from the definitions), receptive-field placement, overlays, errors. How well a *trained* model's CAM
localises is measured by scripts/bench_attribution.py, not asserted here: it depends on the CPU and thread count."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medtl3d.analysis._registry import get_analysis
from medtl3d.analysis.attribution import (
    aligned_upsampler,
    cam_mass_inside,
    cam_target,
    cell_centres,
    grad_cam,
    grad_cam_pp,
    save_cam_nifti,
    save_cam_png,
)
from medtl3d.backbones import build_backbone
from medtl3d.errors import AnalysisError
from medtl3d.strategies import TransferModel, apply_strategy


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------- correctness on constructed models
# Every convolution passes channel i on unchanged (a Dirac kernel, zero bias), batch norms are at their identity
# initialisation (eval mode): a cut's feature map c is the max-pooled input channel c, zero wherever that channel is
# zero within the receptive field. The head reads channel 0 with weight 100 (the lesion that drives the score),
# channel 3 with 50, channel 1 with 0 (its gradient is zero) and channel 2 with -100 (negative evidence); weights
# this large make MONAI's 1e-7 stabiliser in the Grad-CAM++ denominator negligible.
HEAD_WEIGHTS = (100.0, 0.0, -100.0, 50.0)


def constructed_model(dims: int, strategy: str, cut: str | None):
    """cbr_tiny (slimmed top where ``strategy`` is transfusion, cut off above ``cut`` where it is truncate) with the
    hand-set weights above, in eval mode."""
    slim = {} if strategy == "transfusion" else {"slim_from": 0, "width_factor": 16}  # transfusion slims itself
    body = build_backbone("cbr_tiny", dims, len(HEAD_WEIGHTS), **slim)
    model = apply_strategy(body, strategy, 1, **({"cut": cut} if cut else {})).eval()
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.dirac_(module.weight)
                nn.init.zeros_(module.bias)
        model.head.weight.zero_()
        model.head.weight[0, :len(HEAD_WEIGHTS)] = torch.tensor(HEAD_WEIGHTS)
        model.head.bias.fill_(0.25)
    return model


def lesion_image(shape, centres):
    """One image (C, *shape): in channel c a 3^d box of value 1 around ``centres[c]`` with 2 at its centre."""
    image = torch.zeros(len(centres), *shape)
    for channel, centre in enumerate(centres):
        image[(channel, *(slice(p - 1, p + 2) for p in centre))] = 1.0
        image[(channel, *centre)] = 2.0
    return image


def hand_cam(model, image, cut: str, method: str) -> torch.Tensor:
    """The map computed from the definitions: feature maps A at ``cut`` and the gradient g of the logit with
    respect to them (autograd through the rest of the model); Grad-CAM ReLU(sum_c mean(g_c) A_c), Grad-CAM++
    ReLU(sum_c sum_ij a_ij ReLU(g_ij) A_c) with a = g^2 / (2 g^2 + sum(A_c) g^3) (Chattopadhyay et al. 2018; their
    exp(score) factor cancels in the scaling). Upsampled with the aligned upsampler, scaled to max 1."""
    backbone = model.backbone
    unit = backbone.cut_point(cut).unit
    features = backbone(image[None], cut=cut).detach().requires_grad_(True)
    x = features
    for index in range(unit + 1, len(backbone.units)):
        x = backbone.forward_unit(index, x)
    logit = model.head(model.pool(x).flatten(1))[0, 0]
    (gradient,) = torch.autograd.grad(logit, features)
    features, gradient = features.detach()[0], gradient[0]
    spatial = tuple(range(1, features.ndim))
    if method == "gradcam":
        weights = gradient.mean(dim=spatial)
    else:
        denominator = 2 * gradient ** 2 + features.sum(dim=spatial, keepdim=True) * gradient ** 3
        alpha = torch.where(denominator != 0, gradient ** 2 / denominator.where(denominator != 0, 1.0), 0.0)
        weights = (alpha * gradient.clamp_min(0)).sum(dim=spatial)
    cells = torch.relu(torch.einsum("c...,c->...", features, weights))
    upsample = aligned_upsampler(cell_centres(model, image.shape[1:], cut))(image.shape[1:])
    cam = upsample(cells[None, None])[0, 0]
    return cam / cam.max()


@pytest.mark.parametrize("dims, strategy, cut, explained, shape, centres", [
    # the whole backbone, CAM at its top (stride 16)
    (2, "random", None, "cbr4", (128, 128), [(32, 32), (96, 32), (96, 96), (32, 96)]),
    # slimmed top above cbr2 (TransFusion), CAM below it: the gradient comes through the slimmed units
    (2, "transfusion", "cbr2", "cbr2", (64, 64), [(16, 16), (48, 16), (48, 48), (16, 48)]),
    # truncated top, CAM at the truncated model's last layer (stride 4)
    (3, "truncate", "cbr2", "cbr2", (16, 32, 32), [(4, 8, 8), (12, 24, 8), (12, 24, 24), (4, 8, 24)]),
    # truncated top, CAM one unit below it: the gradient passes a conv block and a max-pool first
    (3, "truncate", "cbr3", "cbr2", (16, 32, 32), [(4, 8, 8), (12, 24, 8), (12, 24, 24), (4, 8, 24)]),
])
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_cam_of_a_constructed_model_is_the_hand_computed_map(dims, strategy, cut, explained, shape, centres,
                                                             method):
    model = constructed_model(dims, strategy, cut)
    image = lesion_image(shape, centres)
    cam_cut = None if explained == model.backbone.cut_points[-1].name else explained
    cam = get_analysis("attribution", method)(model, image, cut=cam_cut)
    torch.testing.assert_close(cam, hand_cam(model, image, explained, method), rtol=1e-4, atol=1e-5)
    # the peak is in the lesion that drives the score (a Dirac-kernel model's measured cell centres may be off by
    # half a pixel: max-pools pass the probe's gradient to one input per window)
    peak = np.unravel_index(int(cam.argmax()), shape)
    assert max(abs(int(a) - b) for a, b in zip(peak, centres[0])) <= 1 and float(cam.max()) == 1.0
    # exactly zero two cells (and a pixel) away from the lesions of positive weight: a cell's evidence reaches one
    # cell, its interpolation another; the zero-gradient and negative lesions (channels 1 and 2) add nothing
    stride = model.backbone.cut_point(explained).reduction
    grid = np.indices(shape)
    near = np.zeros(shape, dtype=bool)
    for centre in (centres[0], centres[3]):
        near |= np.all([np.abs(g - p) <= 2 * s for g, p, s in zip(grid, centre, stride)], axis=0)
    assert cam[torch.from_numpy(~near)].abs().max() == 0.0
    assert float(cam[centres[3]]) > 0  # the second positive lesion shows, below the first


@pytest.mark.parametrize("dims", [2, 3])
def test_overlays_are_written_png_and_nifti_with_the_affine(dims, tmp_path):
    """PNG (a montage of the slices with the most CAM mass in 3D); NIfTI with the image's affine in 3D."""
    shape = (64, 64) if dims == 2 else (16, 32, 32)
    image = lesion_image(shape, [tuple(n // 2 for n in shape)] * len(HEAD_WEIGHTS))
    cam = grad_cam(constructed_model(dims, "truncate", "cbr2"), image)
    png = save_cam_png(tmp_path / "cam.png", image, cam, title=f"{dims}D")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if dims == 3:
        affine = np.diag([0.7, 0.7, 2.5, 1.0])
        nifti = nib.load(save_cam_nifti(tmp_path / "cam.nii.gz", cam, affine))
        np.testing.assert_allclose(nifti.affine, affine)
        np.testing.assert_allclose(np.asarray(nifti.dataobj), cam.numpy(), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["cam.nii.gz", "cam.png"] if dims == 3 else ["cam.png"])


@pytest.mark.parametrize("name, dims, shape, expected", [
    ("cbr_tiny", 2, (64, 64), {"cbr1": 0.0, "cbr3": 0.0, "cbr4": 0.0}),  # same-padded odd kernels and pools
    ("cbr_tiny", 3, (16, 32, 32), {"cbr2": 0.0, "cbr3": 0.0}),  # receptive field deeper than the volume: lengthened
    ("densenet121", 2, (64, 64), {"stem": 0.0, "transition1": 2.0, "transition2": 6.0}),  # 2x2 average pools
])
def test_cell_centres_are_the_receptive_field_centres(name, dims, shape, expected):
    body = build_backbone(name, dims, 1, **({"slim_from": 0, "width_factor": 8} if name == "cbr_tiny" else {}))
    model = apply_strategy(body, "random", 1).train()
    for cut, offset in expected.items():
        stride = model.backbone.cut_point(cut).reduction
        assert cell_centres(model, shape, cut) == [(offset, float(s)) for s in stride], cut
    assert model.training  # the probe runs in eval mode and restores the mode


def test_aligned_upsampler_places_cells_at_their_centres():
    cells = torch.zeros(1, 1, 4, 4)
    cells[0, 0, 1, 2] = 1.0
    aligned = aligned_upsampler([(0.0, 8.0), (2.0, 8.0)])((32, 32))(cells)[0, 0]
    assert divmod(int(aligned.argmax()), 32) == (8, 18) and float(aligned.max()) == 1.0
    assert float(aligned[8, 10]) == pytest.approx(0.0) and float(aligned[12, 18]) == pytest.approx(0.5)  # linear
    torch.testing.assert_close(aligned_upsampler([None, None])((32, 32))(cells),  # unmeasured: MONAI's even spread
                               torch.nn.functional.interpolate(cells, size=(32, 32), mode="bilinear"))


def test_cam_target_taps_the_cut_feature_map_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = apply_strategy(build_backbone("cbr_tiny", 2, 1, slim_from=0, width_factor=16), "random", 3)
    x = torch.randn(2, 1, 32, 32)
    twin, layer = cam_target(model, "cbr2")
    assert layer == "backbone.cam_tap"
    captured = {}
    twin.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        logits = twin.eval()(x)
        model.eval()
        torch.testing.assert_close(captured["out"], model.backbone(x, cut="cbr2"))
        torch.testing.assert_close(logits, model(x))
    assert not hasattr(model.backbone, "cam_tap")
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert model.backbone.CBR1.relu.inplace  # in-place activations are switched off in the copy only


def test_batched_cams_match_one_by_one_with_different_target_classes():
    torch.manual_seed(0)
    model = apply_strategy(build_backbone("cbr_tiny", 2, 1, slim_from=0, width_factor=16), "random", 3).eval()
    x = torch.randn(4, 1, 32, 32) * torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1, 1)
    with torch.no_grad():
        model.head.bias -= model(x).mean(dim=0)  # centre each class's logit over the batch: the argmax varies
        predicted = model(x).argmax(dim=1)
    assert len(predicted.unique()) > 1  # the samples explain different classes
    for method in (grad_cam, grad_cam_pp):
        batch = method(model, x, cut="cbr2")
        single = torch.stack([method(model, x[i], cut="cbr2") for i in range(4)])
        torch.testing.assert_close(batch, single)
    one_class = grad_cam(model, x, cut="cbr2", class_idx=0)
    torch.testing.assert_close(one_class[1], grad_cam(model, x[1], cut="cbr2", class_idx=0))


def test_cam_mass_inside_hand_computed_and_errors():
    cam = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert cam_mass_inside(cam, np.array([[1, 0], [0, 1]])) == pytest.approx(5 / 10)
    assert cam_mass_inside(cam[None], np.array([[0, 0], [1, 1]])[None]) == pytest.approx(7 / 10)
    assert np.isnan(cam_mass_inside(torch.zeros(2, 2), np.ones((2, 2))))
    with pytest.raises(AnalysisError, match="shape"):
        cam_mass_inside(cam, np.ones((3, 3)))
    model = apply_strategy(build_backbone("cbr_tiny", 2, 1, slim_from=0, width_factor=16), "random", 1)
    with pytest.raises(AnalysisError, match="channels"):
        grad_cam(model, torch.randn(3, 32, 32))
    with pytest.raises(AnalysisError, match="shape"):
        grad_cam(model, torch.randn(32, 32))
    with torch.device("meta"):
        vit = TransferModel(build_backbone("deit_small", 2, 1), 2)
    with pytest.raises(AnalysisError, match="token"):
        grad_cam(vit, torch.randn(1, 224, 224))
