"""Grad-CAM / Grad-CAM++ (MONAI) at cut points, 2D and 3D: localisation on a planted-lesion task, overlays."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

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


def planted_lesions(n: int, shape: tuple[int, ...], side: tuple[int, ...], generator: torch.Generator):
    """Noise images; every other one has a bright box (+4 sd) at a random place. Returns images, labels, masks."""
    images = torch.randn((n, 1, *shape), generator=generator)
    labels = (torch.arange(n) % 2).float()
    masks = torch.zeros((n, *shape), dtype=torch.bool)
    for i in range(1, n, 2):
        start = [int(torch.randint(0, s - k + 1, (1,), generator=generator)) for s, k in zip(shape, side)]
        box = tuple(slice(a, a + k) for a, k in zip(start, side))
        masks[(i, *box)] = True
        images[(i, 0, *box)] += 4.0
    return images, labels, masks


def trained_lesion_model(dims: int, shape, side, seed: int = 0):
    """A TruncatedTL-style model (cbr_tiny up to cbr1, 8 channels) trained a few CPU epochs on planted lesions."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train_x, train_y, _ = planted_lesions(128, shape, side, generator)
    test_x, test_y, test_masks = planted_lesions(32, shape, side, generator)
    body = build_backbone("cbr_tiny", dims, 1, slim_from=0, width_factor=8)
    model = apply_strategy(body, "truncate", 1, cut="cbr1")
    optimizer = torch.optim.Adam(model.parameters(), 2e-2)
    for _ in range(8):
        model.train()
        for batch in torch.randperm(len(train_x), generator=generator).split(16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(train_x[batch])[:, 0], train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float(((model(test_x)[:, 0] > 0).float() == test_y).float().mean())
    positives = test_y.bool()
    return model, accuracy, test_x[positives], test_masks[positives]


@pytest.mark.parametrize("dims, shape, side", [(2, (32, 32), (6, 6)), (3, (12, 24, 24), (4, 6, 6))])
def test_cam_mass_falls_inside_planted_lesion(dims, shape, side, tmp_path):
    model, accuracy, images, masks = trained_lesion_model(dims, shape, side)
    assert accuracy >= 0.9
    dilated = [ndimage.binary_dilation(m.numpy(), iterations=2) for m in masks]  # the CAM is at stride 2
    area_share = float(np.mean([d.mean() for d in dilated]))
    results = {}
    for name in ("gradcam", "gradcampp"):
        cams = get_analysis("attribution", name)(model, images)  # default cut: the model's last cut point
        assert cams.shape == (len(images), *shape)
        assert float(cams.amax()) == pytest.approx(1.0) and float(cams.amin()) >= 0.0
        results[name] = float(np.mean([cam_mass_inside(c, d) for c, d in zip(cams, dilated)]))
    print(f"\n{dims}D CAM mass inside dilated lesion: Grad-CAM {results['gradcam']:.3f}, "
          f"Grad-CAM++ {results['gradcampp']:.3f}, lesion area share {area_share:.3f}, accuracy {accuracy:.2f}")
    assert results["gradcam"] > 0.5 and results["gradcam"] > 5 * area_share
    assert results["gradcampp"] > 0.4 and results["gradcampp"] > 4 * area_share
    # overlays: PNG (a montage of the slices with the most CAM mass in 3D), NIfTI with the image's affine in 3D
    png = save_cam_png(tmp_path / "cam.png", images[0], cams[0], title=f"{dims}D")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if dims == 3:
        affine = np.diag([0.7, 0.7, 2.5, 1.0])
        nifti = nib.load(save_cam_nifti(tmp_path / "cam.nii.gz", cams[0], affine))
        np.testing.assert_allclose(nifti.affine, affine)
        np.testing.assert_allclose(np.asarray(nifti.dataobj), cams[0].numpy(), atol=1e-6)
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
