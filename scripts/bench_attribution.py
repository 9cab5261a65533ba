"""How well Grad-CAM / Grad-CAM++ of a classifier trained on image labels only localise the planted lesions of CXR
(2D) and CTPA (3D) phantoms, over several seeds, as a Markdown table.

A learned quality after a short CPU training depends on the seed, the thread count, BLAS and the CPU, so it is
measured here, not asserted in the test suite (issue 14); the correctness of the CAM itself is tested on constructed
models in ``tests/test_attribution.py``. The README quotes this script's numbers.

Phantoms are read through the presets (image and lesion mask through the same spatial transforms). Model:
TruncatedTL-style ``cbr_tiny`` (slimmed by ``width_factor``) truncated at ``cbr3``, one logit, trained from scratch
with Adam and a one-cycle schedule on all but the last ``test`` cases. The CAM explains that logit on the held-out
positives; its cells are placed at their receptive fields' centres. Per case: the share of the CAM's mass inside the
lesion dilated by one feature cell of the explained layer along each axis (a box of +-stride: a CAM cannot place
evidence more finely), the area share of that box (what a CAM blind to the lesion scores) and whether the CAM's
maximum lies inside (pointing game); the table gives their means over the held-out positives.

- 2D: 400 CXR phantoms of 64 px, CAM at ``cbr3`` (stride 8), width / 4, 30 epochs, 80 held out.
- 3D: 160 CTPA phantoms of 16 x 48 x 48 (a 64 mm cube) with ``rv_strain=False`` (the emboli are the only class
  evidence), CAM at ``cbr2`` (stride 4; one ``cbr3`` cell covers a quarter of the volume), width / 8, 24 epochs,
  40 held out.

``--quick`` halves the cases and the epochs (a smoke run: the numbers are not the README's).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose
from scipy import ndimage

from medtl3d.analysis.attribution import cam_mass_inside, grad_cam, grad_cam_pp
from medtl3d.backbones import create_backbone
from medtl3d.data.io import LoadCased
from medtl3d.data.phantoms import generate_ctpa, generate_cxr
from medtl3d.data.presets import preset
from medtl3d.engine.metrics import classification_metrics
from medtl3d.reporting import markdown_table, write_table
from medtl3d.strategies import apply_strategy

# name: phantom generator and its arguments, preset and its arguments, held-out cases, CAM cut, training arguments
STUDIES = {
    "cxr": dict(generate=lambda root, n, seed: generate_cxr(root, n, size=64, seed=seed), n=400,
                preset=("cxr", {"size": 64}), test=80, cut="cbr3",
                training={"width_factor": 4, "epochs": 30, "batch": 16}),
    "ctpa": dict(generate=lambda root, n, seed: generate_ctpa(root, n, shape=(16, 48, 48), spacing=(4.0, 4 / 3, 4 / 3),
                                                              seed=seed, rv_strain=False), n=160,
                 preset=("ct", {"size": 48}), test=40, cut="cbr2",
                 training={"width_factor": 8, "epochs": 24, "batch": 8}),
}


def load_phantoms(datalist: Path, preset_name: str, **options):
    """Images (N, 1, *S), lesion masks (N, *S) and labels of generated phantoms, through the preset."""
    root = datalist.parent
    items = json.loads(datalist.read_text())["training"]
    pipeline = Compose([LoadCased(keys=["image", "lesion"]),
                        preset(preset_name, train=False, label_key="lesion", **options)])
    cases = [pipeline({key: str(root / item[key]) for key in ("image", "lesion")}) for item in items]
    images = torch.stack([case["image"].as_tensor() for case in cases]).float()
    masks = torch.stack([case["lesion"].as_tensor()[0] for case in cases]) > 0
    labels = torch.tensor([item["label"] for item in items], dtype=torch.float32)
    if not bool((masks.flatten(1).any(1) == labels.bool()).all()):
        raise ValueError(f"{datalist}: a lesion mask disagrees with its label")
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
        result[f"{name}_finite"] = bool(torch.isfinite(cams).all()) and cams.shape == lesions.shape
        result[f"{name}_mass"] = float(np.mean([cam_mass_inside(c, n) for c, n in zip(cams, near)]))
        result[f"{name}_peak"] = float(np.mean([n.flat[int(c.argmax())] for c, n in zip(cams, near)]))
    return result


def run_study(name: str, seed: int, root: Path, quick: bool = False) -> dict:
    """One row: phantoms and training both from ``seed``."""
    study = STUDIES[name]
    n, test, training = study["n"], study["test"], dict(study["training"])
    if quick:
        n, test, training["epochs"] = n // 2, test // 2, training["epochs"] // 2
    start = time.perf_counter()
    preset_name, options = study["preset"]
    images, masks, labels = load_phantoms(study["generate"](root / f"{name}{seed}", n, seed), preset_name, **options)
    result = localisation(images, masks, labels, test, study["cut"], seed=seed, **training)
    return {"phantoms": name, "seed": seed, "cut": study["cut"], **result,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default="cxr,ctpa", help="comma-separated: cxr (2D), ctpa (3D)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (phantoms and training)")
    parser.add_argument("--quick", action="store_true", help="half the cases and epochs (smoke run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, help="write bench_attribution.{csv,json,md} here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        for name in args.studies.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(run_study(name, seed, Path(temp), args.quick))
                print(json.dumps(rows[-1]), flush=True)
    columns = ["phantoms", "seed", "cut", "auroc", "positives", "area_share", "gradcam_mass", "gradcam_peak",
               "gradcampp_mass", "gradcampp_peak", "seconds"]
    title = (f"CAM mass / peak within one cell of the lesion, held-out positives, {args.threads} threads"
             + (", --quick" if args.quick else ""))
    print(markdown_table(rows, columns, title))
    if args.output:
        write_table(args.output, "bench_attribution", rows, metadata={k: str(v) for k, v in vars(args).items()},
                    title=title, columns=columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
